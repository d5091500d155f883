"""OWL allocation and DSnoT refinement: core math and the recipe modifiers."""

import json
from pathlib import Path

import pytest
import torch

from crepe_plugin.core import PruningError, dsnot_refine, expected_error, is_nm, outlier_ratio, owl_sparsities, prune_mask

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ OWL (core)
def test_outlier_ratio_counts_entries_above_m_times_mean():
    t = torch.ones(100)
    t[:3] = 100.0  # mean = (97 + 300) / 100 = 3.97; 100 > 5 * 3.97
    assert outlier_ratio([t[:50], t[50:]], 5.0) == pytest.approx(0.03)
    assert outlier_ratio([torch.ones(10)], 5.0) == 0.0


def test_owl_sparsities_mean_range_and_order():
    ratios = [0.01, 0.05, 0.02, 0.09]
    sp = owl_sparsities(ratios, 0.7, 0.08)
    assert sum(sp) / len(sp) == pytest.approx(0.7)
    assert max(sp) - min(sp) == pytest.approx(0.16)
    # more outliers -> lower sparsity
    assert sorted(range(4), key=lambda i: sp[i]) == sorted(range(4), key=lambda i: -ratios[i])
    assert owl_sparsities([0.3, 0.3], 0.5, 0.08) == pytest.approx([0.5, 0.5])
    with pytest.raises(PruningError, match="owl_lmbda"):
        owl_sparsities(ratios, 0.95, 0.08)
    with pytest.raises(PruningError, match="target"):
        owl_sparsities(ratios, 1.2, 0.08)


# ------------------------------------------------------------------ DSnoT (core)
def _layer(seed=0, rows=64, cols=128):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, cols, generator=g) * torch.rand(cols, generator=g) + torch.randn(cols, generator=g)
    W = torch.randn(rows, cols, generator=g)
    return W, X


@pytest.mark.parametrize("structure", ["2:4", "0:0"])
def test_dsnot_keeps_counts_and_cuts_expected_error(structure):
    W, X = _layer()
    s = (X**2).sum(0)
    mask = prune_mask(W.abs() * s.sqrt(), 0.5, structure, "row")
    n, m = (2, 4) if structure == "2:4" else (0, 0)
    new = dsnot_refine(W, mask, X.mean(0), X.var(0, unbiased=False), s, n, m)
    assert torch.equal(new.sum(1), mask.sum(1))  # same number pruned in every row
    if n:
        assert is_nm(W.masked_fill(new, 0), 2, 4)
    assert (new != mask).any()
    before = expected_error(W, mask, X.mean(0)).abs().mean()
    after = expected_error(W, new, X.mean(0)).abs().mean()
    assert after < 0.5 * before
    # and the actual output error on the calibration inputs falls too
    err = lambda mk: ((X @ (W * mk).t()) ** 2).sum()  # noqa: E731
    assert err(new.float()) < err(mask.float())


def test_dsnot_rejects_bad_shapes():
    W, X = _layer(cols=130)
    mask = torch.zeros_like(W, dtype=torch.bool)
    with pytest.raises(PruningError, match="layer 'x'.*divisible"):
        dsnot_refine(W, mask, X.mean(0), X.var(0), (X**2).sum(0), 2, 4, layer_name="x")
    with pytest.raises(PruningError, match="does not match"):
        dsnot_refine(W, mask[:, :8], X.mean(0), X.var(0), (X**2).sum(0), layer_name="x")


# ------------------------------------------------------------------ recipes
llmc = pytest.importorskip("llmcompressor")


def _sparsity_per_layer(out: Path) -> dict[int, float]:
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    per: dict[int, list] = {}
    for k, v in sd.items():
        if ".layers." in k and k.endswith("proj.weight"):
            per.setdefault(int(k.split(".layers.")[1].split(".")[0]), []).append(v)
    return {i: float(sum((w == 0).sum() for w in ws) / sum(w.numel() for w in ws)) for i, ws in per.items()}


def test_owl_recipe_gives_nonuniform_layers_at_the_target_mean(tmp_path):
    from crepe_plugin.checkpoint.record import RECORD_KEY
    from crepe_plugin.testing import save_tiny_llama

    from .test_modifiers import _run

    model = save_tiny_llama(tmp_path / "m", layers=4)
    out = tmp_path / "out"
    _run(str(model), (ROOT / "recipes" / "crepe_owl_unstructured70.yaml").read_text(), out)
    per = _sparsity_per_layer(out)
    assert len(per) == 4
    assert sum(per.values()) / 4 == pytest.approx(0.7, abs=0.01)
    assert max(per.values()) - min(per.values()) > 0.02  # not uniform
    assert all(0.7 - 0.08 - 0.01 <= s <= 0.7 + 0.08 + 0.01 for s in per.values())
    rec = json.loads((out / "config.json").read_text())[RECORD_KEY]
    assert len({round(v["sparsity"], 2) for v in rec["modules"].values()}) > 1


def test_owl_hands_sparsities_to_llmcompressor_wanda(tmp_path):
    from crepe_plugin.testing import save_tiny_llama

    from .test_modifiers import _recipe, _run

    model = save_tiny_llama(tmp_path / "m", layers=4)
    out = tmp_path / "out"
    _run(str(model), _recipe(
        "    OWLAllocationModifier:\n      owl_m: 5\n      owl_lmbda: 0.08\n"
        "    WandaPruningModifier:\n      sparsity: 0.6\n      mask_structure: '0:0'\n      ignore: ['re:.*lm_head']\n"
    ), out)  # fmt: skip
    per = _sparsity_per_layer(out)
    assert sum(per.values()) / 4 == pytest.approx(0.6, abs=0.01)
    assert max(per.values()) - min(per.values()) > 0.02


def test_owl_rejects_nm_and_a_missing_pruner():
    from crepe_plugin.testing import tiny_llama

    from .test_modifiers import _recipe, _run

    with pytest.raises(PruningError, match="unstructured sparsity only"):
        _run(tiny_llama(), _recipe("    OWLAllocationModifier: {}\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"))
    with pytest.raises(PruningError, match="no pruning modifier follows"):
        _run(tiny_llama(), _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n    OWLAllocationModifier: {}\n"))


def test_dsnot_recipe_keeps_2of4_and_changes_the_mask(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from .test_modifiers import _run

    plain, refined = tmp_path / "plain", tmp_path / "dsnot"
    _run(str(tiny_model_dir), (ROOT / "recipes" / "crepe_2of4.yaml").read_text(), plain)
    _run(str(tiny_model_dir), (ROOT / "recipes" / "crepe_dsnot_2of4.yaml").read_text(), refined)
    a, b = load_file(plain / "model.safetensors"), load_file(refined / "model.safetensors")
    dense = load_file(tiny_model_dir / "model.safetensors")
    ws = [k for k in b if k.endswith("proj.weight")]
    assert ws and all(is_nm(b[k], 2, 4) for k in ws)
    assert any(not torch.equal(a[k] == 0, b[k] == 0) for k in ws)  # DSnoT swapped something
    # kept weights keep their dense values
    assert all(torch.equal(b[k][b[k] != 0], dense[k][b[k] != 0]) for k in ws)


def test_dsnot_rejects_weight_updating_pruners():
    from crepe_plugin.testing import tiny_llama

    from .test_modifiers import _recipe, _run

    with pytest.raises(PruningError, match="reconstruct"):
        _run(tiny_llama(), _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n      reconstruct: true\n    DSnoTModifier: {}\n"))
    with pytest.raises(PruningError, match="after CRePE"):
        _run(tiny_llama(), _recipe("    DSnoTModifier: {}\n"))
