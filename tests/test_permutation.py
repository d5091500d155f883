"""Channel permutation: core search (reallocation + Hungarian) and the folded modifier."""

import json
from pathlib import Path

import pytest
import torch

from crepe_plugin.core import LayerShapeError, is_nm
from crepe_plugin.core.permutation import find_permutation, hungarian_refine, kept_importance, reallocate, stacked_head_scores

ROOT = Path(__file__).resolve().parents[1]


def _scores(rows=48, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    # channels of very different strength: what permutation can exploit
    return torch.rand(rows, cols, generator=g) * torch.rand(1, cols, generator=g).pow(3) * 10


def _is_perm(p, n):
    return torch.equal(torch.sort(p).values, torch.arange(n))


def test_reallocation_and_hungarian_keep_more_importance():
    S = _scores()
    ident = kept_importance(S, 2, 4)
    r = reallocate(S, 4)
    assert _is_perm(r, 96)
    h = hungarian_refine(S, r, 2, 4, block_groups=8)
    assert _is_perm(h, 96)
    kr, kh = kept_importance(S[:, r], 2, 4), kept_importance(S[:, h], 2, 4)
    assert kr > ident and kh >= kr
    best = find_permutation(S, 2, 4, block_groups=8)
    assert kept_importance(S[:, best], 2, 4) == pytest.approx(kh)
    # never worse than the stored order
    flat = torch.ones(8, 16)
    assert torch.equal(find_permutation(flat, 2, 4), torch.arange(16))


def test_hungarian_position_step_is_optimal_on_a_small_case():
    """One position's assignment equals the best of all placements (brute force)."""
    import itertools

    S = _scores(rows=6, cols=12, seed=3)
    perm = torch.arange(12)
    out = hungarian_refine(S, perm, 2, 4, block_groups=3, rounds=1)
    # brute force over position 0 only, others fixed, as the first step does
    lay = perm.view(3, 4)
    best = max(
        kept_importance(S[:, torch.cat([torch.cat([lay[g, :0], lay[list(pp)[g], :1], lay[g, 1:]]) for g in range(3)])], 2, 4)
        for pp in itertools.permutations(range(3))
    )
    after_first = hungarian_refine(S, perm, 2, 4, block_groups=3, rounds=1)
    assert kept_importance(S[:, out], 2, 4) >= best - 1e-9
    assert _is_perm(after_first, 12)


def test_shape_errors_name_the_layer():
    with pytest.raises(LayerShapeError, match="layer 'x'.*divisible"):
        reallocate(torch.rand(4, 10), 4, "x")


def test_stacked_head_scores_for_gqa():
    S = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 12)  # 4 heads of dim 3, 2 KV heads
    blocks = stacked_head_scores(S, 4, 2, 3)
    assert len(blocks) == 2 and blocks[0].shape == (4, 3)
    assert torch.equal(blocks[1], torch.cat([S[:, 6:9], S[:, 9:12]]))


llmc = pytest.importorskip("llmcompressor")


def test_folded_permutation_keeps_logits_and_gains_importance(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from crepe_plugin.checkpoint.record import RECORD_KEY
    from crepe_plugin.testing import save_tiny_llama

    from .test_modifiers import _recipe, _run

    src = save_tiny_llama(tmp_path / "m", layers=2)
    q_only = "    CRePEPruningModifier:\n      mask_structure: '2:4'\n      targets: ['re:.*q_proj$']\n"
    perm_body = "    ChannelPermutationModifier:\n      block_groups: 4\n"
    _run(str(src), _recipe(q_only), tmp_path / "plain")
    _run(str(src), _recipe(perm_body + q_only), tmp_path / "perm")
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "perm" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # same architecture
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert any("down_proj" in k for k in moved) and any("o_proj" in k for k in moved) and any("v_proj" in k for k in moved)
    assert not any("q_proj" in k or "k_proj" in k for k in moved)
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    la = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()(ids).logits
    lb = AutoModelForCausalLM.from_pretrained(tmp_path / "perm").eval()(ids).logits
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
    rec = json.loads((tmp_path / "perm" / "config.json").read_text())[RECORD_KEY]
    gains = rec["permuted"]["kept_importance_gain"]
    assert set(gains) == {f"model.layers.{i}.{p}" for i in range(2) for p in ("mlp.down_proj", "self_attn.o_proj")}
    assert all(g >= 0 for g in gains.values()) and max(gains.values()) > 0


def test_cp_recipe_saves_exact_2of4_in_stored_order(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from crepe_plugin.checkpoint.verify import verify_checkpoint

    from .test_modifiers import _run

    out = tmp_path / "out"
    _run(str(tiny_model_dir), (ROOT / "recipes" / "crepe_cp_2of4.yaml").read_text(), out)
    sd = load_file(out / "model.safetensors")
    ws = [v for k, v in sd.items() if k.endswith("proj.weight")]
    assert len(ws) == 2 * 7 and all(is_nm(w, 2, 4) for w in ws)
    assert verify_checkpoint(out).ok


def test_permutation_needs_an_nm_pruner_after_it():
    from crepe_plugin.core import PruningError
    from crepe_plugin.testing import tiny_llama

    from .test_modifiers import _recipe, _run

    with pytest.raises(PruningError, match="only helps N:M"):
        _run(tiny_llama(), _recipe("    ChannelPermutationModifier: {}\n    CRePEPruningModifier:\n      sparsity: 0.5\n"))
    with pytest.raises(PruningError, match="before an N:M pruning"):
        _run(tiny_llama(), _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n    ChannelPermutationModifier: {}\n"))
