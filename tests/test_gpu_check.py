"""The comparison the GPU check (scripts/gpu_compress.py) makes between CUDA and CPU masks, on
masks made here: codes, row hashes, sampled rows and tie counting must find exactly the groups
that differ, and call a difference a tie only where the reference's decision was that close."""

import importlib.util
from pathlib import Path

import numpy as np
import torch

from crepe_plugin.core.masks import nm_mask

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_compress", ROOT / "scripts" / "gpu_compress.py")
gc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gc)


def _reference(scores: torch.Tensor) -> tuple[dict, np.ndarray]:
    """What `reference` stores for one layer, from the scores the CPU pruned with."""
    pruned = nm_mask(scores, 2, 4)
    byte = gc.combine(gc.mask_codes(pruned), gc.group_margins(scores))
    codes, _ = gc.split(byte)
    ref = {"shape": np.asarray(byte.shape), "rowhash": gc.row_hash(codes), "sampled": byte[:: gc.SAMPLE_EVERY]}
    return ref, byte


def test_codes_round_trip_and_reject_non_2of4():
    scores = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    pruned = nm_mask(scores, 2, 4)
    codes = gc.mask_codes(pruned)
    assert codes.shape == (64, 8) and codes.max() <= 5
    kept = np.array([[3, 5, 6, 9, 10, 12][c] for c in codes.ravel()]).reshape(codes.shape)
    bits = np.stack([(kept >> i) & 1 for i in range(4)], -1).reshape(64, 32).astype(bool)
    assert np.array_equal(bits, ~pruned.numpy())
    bad = pruned.clone()
    bad[3, 0:4] = True  # a group with nothing kept
    assert gc.mask_codes(bad)[3, 0] == gc.INVALID


def test_compare_finds_each_differing_group_and_classes_ties_by_the_reference_margin():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(96, 64, generator=g).abs()
    scores[0, :4] = torch.tensor([0.01, 1.0, 1.0 + 1e-6, 5.0])  # group 0 of row 0: a near tie decides its 2nd prune
    ref, byte = _reference(scores)
    run_codes = gc.split(byte)[0].copy()
    out = gc.compare_masks({"r": {"layer": ref}}, {"r": {"layer": run_codes}})["r"]
    assert out["rows_differ"] == 0 and out["sampled"]["differ"] == 0

    # the run keeps the other element of the near tie (row 0, sampled), and flips a clear group in row 1 (not sampled)
    ref_codes = gc.split(byte)[0]
    pruned = nm_mask(scores, 2, 4)
    assert pruned[0, :4].tolist() == [True, True, False, False]
    pruned[0, 1], pruned[0, 2] = False, True  # the other side of the tie
    run_codes = gc.mask_codes(pruned)
    assert run_codes[0, 0] != ref_codes[0, 0]
    run_codes[1, 5] = (ref_codes[1, 5] + 1) % 6
    out = gc.compare_masks({"r": {"layer": ref}}, {"r": {"layer": run_codes}})["r"]
    assert out["rows_differ"] == 2 and out["rows"] == 96
    s = out["sampled"]
    assert (s["differ"], s["ties"], s["not_ties"]) == (1, 1, 0)  # only row 0 is a sampled row (every 16th)
    full = gc._diff_summary(byte, run_codes)
    assert (full["differ"], full["ties"], full["not_ties"]) == (2, 1, 1)
    assert out["layers_missing_in_run"] == [] and gc.compare_masks({"r": {"layer": ref}}, {"r": {}})["r"]["layers_missing_in_run"] == ["layer"]
