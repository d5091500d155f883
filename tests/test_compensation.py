"""Fixed-mask error compensation: exactness, error reduction, numerics."""

import pytest
import torch

from crepe_plugin import crepe_scores, is_nm, prune_mask
from crepe_plugin.core import CalibrationError, HessianStats, InputNormStats, compensate_fixed_mask, refine_fixed_mask


def _problem(rows=48, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs, as in real activations
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 * 3 + torch.eye(cols)
    X = torch.randn(2, tokens // 2, cols, generator=g) @ mix
    W = torch.randn(rows, cols, generator=g)
    hs, ns = HessianStats(cols), InputNormStats(cols)
    for b in X:
        hs.update(b.unsqueeze(0))
        ns.update(b.unsqueeze(0))
    return W, X.reshape(-1, cols), hs, ns


def _err(W, Wq, X):
    return float(((X @ (W - Wq).t()) ** 2).sum())


def test_hessian_diagonal_is_the_score_statistic():
    _, _, hs, ns = _problem()
    torch.testing.assert_close(hs.input_sq_norm(), ns.value(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("structure", ["2:4", "4:8", "0:0"])
def test_reconstruction_keeps_mask_and_lowers_error(structure):
    W, X, hs, _ = _problem()
    mask = prune_mask(crepe_scores(W, hs.input_sq_norm()), 0.5, structure)
    Wr = compensate_fixed_mask(W, hs.H, mask, dampening_frac=0.01, block_size=16)
    assert bool((Wr[mask] == 0).all())
    if structure != "0:0":
        n, m = map(int, structure.split(":"))
        assert is_nm(Wr, n, m)
    plain = W.masked_fill(mask, 0)
    assert _err(W, Wr, X) < 0.9 * _err(W, plain, X)
    # never better than the exact per-row least-squares optimum on the same mask
    exact = W.clone()
    H = X.t() @ X
    for r in range(W.shape[0]):
        k = ~mask[r]
        exact[r] = 0
        exact[r, k] = torch.linalg.solve(H[k][:, k] + 1e-6 * torch.eye(int(k.sum())), H[k] @ W[r])
    assert _err(W, exact, X) <= _err(W, Wr, X) * 1.0001
    # conjugate-gradient refinement reaches the exact optimum on the same mask
    Wc = refine_fixed_mask(W, Wr, hs.H, mask, steps=60, dampening_frac=1e-7)
    assert bool((Wc[mask] == 0).all())
    assert _err(W, Wc, X) <= _err(W, exact, X) * 1.01 < _err(W, Wr, X)


def test_block_size_does_not_change_result():
    W, _, hs, _ = _problem(seed=1)
    mask = prune_mask(crepe_scores(W, hs.input_sq_norm()), structure="2:4")
    a = compensate_fixed_mask(W, hs.H, mask, block_size=1)
    b = compensate_fixed_mask(W, hs.H, mask, block_size=64)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_singular_hessian_dead_inputs_stay_finite():
    W, X, _, _ = _problem(cols=32, tokens=8)  # 8 tokens << 32 inputs: rank deficient
    X[:, 5] = 0  # a dead input
    hs = HessianStats(32)
    hs.update(X.unsqueeze(0))
    mask = prune_mask(crepe_scores(W, hs.input_sq_norm()), structure="2:4")
    Wr = compensate_fixed_mask(W, hs.H, mask, dampening_frac=1e-8)
    assert torch.isfinite(Wr).all() and is_nm(Wr, 2, 4)


def test_bad_hessian_is_a_clear_error():
    W = torch.randn(4, 8)
    with pytest.raises(CalibrationError, match="layer 'l'"):
        compensate_fixed_mask(W, torch.eye(4), torch.zeros(4, 8, dtype=torch.bool), layer_name="l")
    H = torch.eye(8)
    H[0, 0] = float("nan")
    with pytest.raises(Exception, match="layer 'l'"):
        compensate_fixed_mask(W, H, torch.zeros(4, 8, dtype=torch.bool), layer_name="l")


def test_quantize_callback_keeps_mask_and_grid():
    W, X, hs, _ = _problem(seed=2)
    mask = prune_mask(crepe_scores(W, hs.input_sq_norm()), structure="2:4")
    step = 0.25
    Wq = compensate_fixed_mask(W, hs.H, mask, quantize=lambda col, i: torch.round(col / step) * step)
    assert is_nm(Wq, 2, 4)
    assert torch.allclose(Wq / step, torch.round(Wq / step), atol=1e-5)
    naive = torch.round(W.masked_fill(mask, 0) / step) * step
    assert _err(W, Wq, X) < _err(W, naive, X)
