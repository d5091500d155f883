"""Core math: scores, masks and statistics against independent references."""

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from crepe_plugin import RIA_CONFIG, CRePEConfig, crepe_scores, is_nm, prune_mask
from crepe_plugin.core import (
    CalibrationError,
    InputNormStats,
    LayerShapeError,
    NonFiniteError,
    PruningError,
    neighborhood,
    parse_structure,
    weight_out_in,
)
from crepe_plugin.core.masks import _kth_smallest


# ---------------------------------------------------------------- independent references
def ria_reference(W, scaler_row, a=0.5, prune_n=0, prune_m=0, sparsity=0.5, per_outneuron=False):
    """RIA's official prune_ria, restated with its loops (mask True = pruned)."""
    W_metric = (
        torch.abs(W) / torch.sum(torch.abs(W), dim=0)
        + torch.abs(W) / torch.sum(torch.abs(W), dim=1).reshape(-1, 1)
    ) * (torch.sqrt(scaler_row.reshape((1, -1)))) ** a
    W_mask = torch.zeros_like(W_metric) == 1
    if prune_n != 0:
        for ii in range(W_metric.shape[1]):
            if ii % prune_m == 0:
                tmp = W_metric[:, ii : (ii + prune_m)].float()
                W_mask.scatter_(1, ii + torch.topk(tmp, prune_n, dim=1, largest=False)[1], True)
    elif per_outneuron:
        sort_res = torch.sort(W_metric, dim=-1, stable=True)
        indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
        W_mask.scatter_(1, indices, True)
    else:
        thresh = torch.sort(W_metric.flatten())[0][int(W.shape[0] * W.shape[1] * sparsity)]
        W_mask = W_metric <= thresh
    return W_mask


def window_reference(x, k, kernel, border):
    """2-D correlation with an explicit k x k kernel via F.pad + conv2d."""
    if kernel == "box":
        k1 = torch.ones(k, dtype=torch.float64)
    else:
        sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
        t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
        k1 = torch.exp(-(t**2) / (2 * sigma**2))
    k2 = torch.outer(k1, k1)
    k2 = (k2 / k2.sum()).to(x.dtype)
    r = k // 2
    x4 = x[None, None]
    if border in ("zero", "mean"):
        num = F.conv2d(F.pad(x4, (r, r, r, r)), k2[None, None])[0, 0]
        if border == "zero":
            return num
        cov = F.conv2d(F.pad(torch.ones_like(x4), (r, r, r, r)), k2[None, None])[0, 0]
        return num / cov
    return F.conv2d(F.pad(x4, (r, r, r, r), mode=border), k2[None, None])[0, 0]


def _layer(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, cols, generator=g))
    s = torch.rand(cols, generator=g) * 10 + 0.01
    return W, s


# ---------------------------------------------------------------- RIA equality
@pytest.mark.parametrize("shape", [(64, 128), (96, 256), (33, 64)])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_ria_nm_equals_reference(shape, nm):
    W, s = _layer(*shape, seed=shape[0] + nm[1])
    ours = prune_mask(crepe_scores(W, s, RIA_CONFIG), structure=f"{nm[0]}:{nm[1]}")
    assert torch.equal(ours, ria_reference(W, s, prune_n=nm[0], prune_m=nm[1]))
    assert int(ours.sum()) == W.numel() * nm[0] // nm[1]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_ria_unstructured_matrix_equals_reference(sparsity):
    W, s = _layer(80, 96, seed=3)
    ours = prune_mask(crepe_scores(W, s, RIA_CONFIG), sparsity, "0:0", "matrix")
    assert torch.equal(ours, ria_reference(W, s, sparsity=sparsity))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.6])
def test_ria_unstructured_row_equals_reference(sparsity):
    W, s = _layer(40, 100, seed=5)
    ours = prune_mask(crepe_scores(W, s, RIA_CONFIG), sparsity, "0:0", "row")
    assert torch.equal(ours, ria_reference(W, s, sparsity=sparsity, per_outneuron=True))


def test_ria_scores_bit_exact():
    W, s = _layer(50, 72, seed=9)
    ref = (W.abs() / W.abs().sum(0) + W.abs() / W.abs().sum(1, keepdim=True)) * torch.sqrt(s) ** 0.5
    assert torch.equal(crepe_scores(W, s, RIA_CONFIG), ref)


def test_act_exponent_matches_ria_a():
    W, s = _layer(32, 64, seed=11)
    ours = prune_mask(crepe_scores(W, s, CRePEConfig(act_exponent=1.0)), structure="2:4")
    assert torch.equal(ours, ria_reference(W, s, a=1.0, prune_n=2, prune_m=4))


def test_ria_config_is_ria():
    cfg = RIA_CONFIG
    assert cfg.is_ria and cfg.neighbor_coef == 0.0 and cfg.act_exponent == 0.5


# ---------------------------------------------------------------- CRePE terms
def test_coefficients_change_mask_and_row_term_alone():
    W, s = _layer(64, 128, seed=2)
    only_row = crepe_scores(W, s, CRePEConfig(col_coef=0.0))
    expected = W.abs() / W.abs().sum(1, keepdim=True) * torch.sqrt(s) ** 0.5
    torch.testing.assert_close(only_row, expected)
    assert not torch.equal(prune_mask(only_row), prune_mask(crepe_scores(W, s, RIA_CONFIG)))


@pytest.mark.parametrize("kernel", ["box", "gaussian"])
@pytest.mark.parametrize("border", ["mean", "zero", "reflect", "replicate"])
@pytest.mark.parametrize("k", [3, 5, 7])
def test_neighborhood_matches_conv_reference(kernel, border, k):
    x = torch.rand(23, 41, dtype=torch.float64)
    torch.testing.assert_close(neighborhood(x, k, kernel, border), window_reference(x, k, kernel, border))


def test_neighborhood_tiny_map_is_finite():
    x = torch.rand(2, 4)
    for border in ("mean", "zero", "reflect", "replicate"):
        out = neighborhood(x, 7, "box", border)
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_neighbor_term_enters_scores():
    W, s = _layer(32, 64, seed=4)
    cfg = CRePEConfig(neighbor_coef=0.5, kernel_size=3)
    ri = W.abs() / W.abs().sum(0) + W.abs() / W.abs().sum(1, keepdim=True)
    expected = (ri + 0.5 * window_reference(ri, 3, "box", "mean")) * torch.sqrt(s) ** 0.5
    torch.testing.assert_close(crepe_scores(W, s, cfg), expected)
    cfg_s = CRePEConfig(neighbor_coef=0.5, kernel_size=3, neighbor_map="score")
    base = ri * torch.sqrt(s) ** 0.5
    torch.testing.assert_close(crepe_scores(W, s, cfg_s), base + 0.5 * window_reference(base, 3, "box", "mean"))


def test_scores_are_device_consistent_and_float64_ok():
    W, s = _layer(16, 32, seed=8)
    cfg = CRePEConfig(neighbor_coef=0.3, kernel="gaussian", kernel_size=5)
    a = crepe_scores(W, s, cfg)
    b = crepe_scores(W.double(), s.double(), cfg)
    assert b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
    if torch.cuda.is_available():
        torch.testing.assert_close(crepe_scores(W.cuda(), s.cuda(), cfg).cpu(), a)


# ---------------------------------------------------------------- masks
def test_nm_mask_ties_prune_exactly_n():
    scores = torch.zeros(8, 16)
    mask = prune_mask(scores, structure="2:4")
    assert is_nm(torch.where(mask, 0.0, 1.0), 2, 4)
    assert int(mask.sum()) == 8 * 16 // 2


def test_kth_smallest_large_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5_000_000, generator=g)
    for k in (0, 123, 2_500_000, 4_999_999):
        assert _kth_smallest(x, k) == torch.kthvalue(x, k + 1).values
    xs = torch.sort(x).values  # adversarial layout for the strided sample
    assert _kth_smallest(xs, 1_000_000) == xs[1_000_000]


def test_unstructured_zero_sparsity_prunes_nothing():
    W, s = _layer()
    assert not prune_mask(crepe_scores(W, s), 0.0, "0:0").any()


@pytest.mark.parametrize("bad", ["3:2", "2:2", "0:4", "abc", "2-4"])
def test_bad_structure(bad):
    with pytest.raises(PruningError):
        parse_structure(bad)


def test_parse_structure():
    assert parse_structure("2:4") == (2, 4)
    assert parse_structure("0:0") == (0, 0)
    assert parse_structure("unstructured") == (0, 0)


# ---------------------------------------------------------------- numerics and bad input
def test_zero_row_and_column_give_finite_scores():
    W, s = _layer(16, 32)
    W[3] = 0
    W[:, 5] = 0
    s[7] = 0
    sc = crepe_scores(W, s, CRePEConfig(neighbor_coef=0.2))
    assert torch.isfinite(sc).all()
    assert is_nm(W.masked_fill(prune_mask(sc), 0), 2, 4)


@pytest.mark.parametrize("val", [float("nan"), float("inf")])
def test_nonfinite_weight_names_layer(val):
    W, s = _layer(16, 32)
    W[2, 3] = val
    with pytest.raises(NonFiniteError, match="model.layers.3.mlp.up_proj"):
        crepe_scores(W, s, layer_name="model.layers.3.mlp.up_proj")


def test_bad_statistics():
    W, s = _layer(16, 32)
    with pytest.raises(CalibrationError, match="layer 'x'"):
        crepe_scores(W, s[:10], layer_name="x")
    with pytest.raises(CalibrationError):
        crepe_scores(W, None, layer_name="x")
    s2 = s.clone()
    s2[0] = float("nan")
    with pytest.raises(NonFiniteError):
        crepe_scores(W, s2, layer_name="x")
    assert torch.isfinite(crepe_scores(W, None, CRePEConfig(act_exponent=0.0))).all()


def test_indivisible_shape_names_layer_and_suggests_ignore():
    W, s = _layer(16, 30)
    with pytest.raises(LayerShapeError, match=r"layer 'model.layers.0.mlp.down_proj'.*ignore"):
        prune_mask(crepe_scores(W, s), structure="2:4", layer_name="model.layers.0.mlp.down_proj")


@pytest.mark.parametrize(
    "kwargs", [{"kernel_size": 4}, {"kernel_size": 0}, {"row_coef": -1.0}, {"neighbor_coef": math.nan}, {"kernel": "disc"}]
)
def test_config_validation(kwargs):
    with pytest.raises(ValidationError):
        CRePEConfig(**kwargs)


def test_conv1d_weight_layout():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=24, nx=32)  # weight (in=32, out=24)
    lin = torch.nn.Linear(32, 24, bias=False)
    lin.weight.data.copy_(conv.weight.data.t())
    s = torch.rand(32)
    assert torch.equal(
        prune_mask(crepe_scores(weight_out_in(conv), s)), prune_mask(crepe_scores(weight_out_in(lin), s))
    )


# ---------------------------------------------------------------- statistics
def test_input_norm_stats_match_wanda_formula():
    torch.manual_seed(0)
    batches = [torch.randn(2, 7, 12, dtype=torch.bfloat16) for _ in range(3)]
    st = InputNormStats(12)
    for b in batches:
        st.update(b)
    # Wanda/RIA: running mean over samples of sum over tokens of x^2
    ref = torch.zeros(12)
    n = 0
    for b in batches:
        inp = b.reshape(-1, 12).t().float()
        ref *= n / (n + b.shape[0])
        n += b.shape[0]
        ref += torch.norm(inp, p=2, dim=1) ** 2 / n
    torch.testing.assert_close(st.value(), ref)
    assert st.value().dtype == torch.float32


def test_empty_stats_is_error():
    with pytest.raises(CalibrationError, match="layer 'l'"):
        InputNormStats(4).value("l")


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    from crepe_plugin.core.files import atomic_write

    f = tmp_path / "best.json"
    atomic_write(f, "one")
    temps = []

    def half_then_fail(tmp):
        temps.append(tmp)
        tmp.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(f, half_then_fail)
    assert f.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["best.json"]
    atomic_write(f, lambda tmp: (temps.append(tmp), tmp.write_text("two")))
    assert f.read_text() == "two" and temps[0] != temps[1]  # a fresh temporary name per write
    assert temps[0].suffix == ".json"  # a writer that picks its format by suffix (savefig) sees the target's
    d = tmp_path / "model"
    d.mkdir()
    (d / "old.bin").write_text("x")
    atomic_write(d, lambda tmp: (tmp.mkdir(), (tmp / "new.bin").write_text("y")))  # a directory replaces one
    assert sorted(p.name for p in d.iterdir()) == ["new.bin"]
