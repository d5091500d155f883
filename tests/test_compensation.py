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


# ---------------------------------------------------------------- mask chosen inside the sweep
def _sparsegpt_reference(W, H, prunen, prunem, blocksize=128, percdamp=0.01, sparsity=0.5, row_scale=None):
    """SparseGPT's loop (Frantar & Alistarh, 2023), restated: the mask of each group of
    prunem columns (N:M), or of each block (unstructured, prunen = 0), is chosen from
    w^2 / [H^-1]_jj^2 of the weights updated so far."""
    W = W.clone().float()
    cols = W.shape[1]
    H = H.clone()
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            if row_scale is not None:
                tmp = tmp * row_scale.reshape(-1, 1) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if prunen and i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / (torch.diag(Hinv1)[i : i + prunem].reshape(1, -1)) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, mask


@pytest.mark.parametrize("nm,block", [((2, 4), 16), ((2, 4), 128), ((4, 8), 32)])
def test_adaptive_mask_at_sparsegpt_point_is_sparsegpt(nm, block):
    from crepe_plugin.core import CRePEConfig, compensate_adaptive_nm, crepe_saliency

    W, _, hs, _ = _problem(rows=40, cols=64, seed=3)
    sgpt = CRePEConfig(row_coef=1.0, col_coef=0.0, neighbor_coef=0.0, act_exponent=1.0)
    Wa, mask = compensate_adaptive_nm(W, hs.H, *nm, crepe_saliency(W, sgpt), dampening_frac=0.01, block_size=block)
    Wr, mask_r = _sparsegpt_reference(W, hs.H, *nm, blocksize=block)
    assert torch.equal(mask, mask_r)
    torch.testing.assert_close(Wa, Wr, rtol=1e-4, atol=1e-4)
    assert is_nm(Wa, *nm)
    assert bool((Wa[mask] == 0).all()) and int(mask.sum()) == W.numel() * nm[0] // nm[1]


def test_adaptive_mask_differs_from_fixed_and_lowers_error_after_refinement():
    from crepe_plugin.core import CRePEConfig, compensate_adaptive_nm, crepe_saliency

    W, X, hs, _ = _problem(rows=64, cols=96, seed=5)
    cfg = CRePEConfig(row_coef=1.4, col_coef=1.8, neighbor_coef=0.2, kernel_size=3, act_exponent=0.7)
    fixed_mask = prune_mask(crepe_scores(W, hs.input_sq_norm(), cfg), 0.5, "2:4")
    fixed = refine_fixed_mask(W, compensate_fixed_mask(W, hs.H, fixed_mask), hs.H, fixed_mask, 50)
    Wa, mask = compensate_adaptive_nm(W, hs.H, 2, 4, crepe_saliency(W, cfg))
    adaptive = refine_fixed_mask(W, Wa, hs.H, mask, 50)
    assert is_nm(adaptive, 2, 4) and not torch.equal(mask, fixed_mask)
    assert _err(W, adaptive, X) < _err(W, fixed, X)


@pytest.mark.parametrize("sparsity,block", [(0.5, 16), (0.7, 64)])
def test_adaptive_unstructured_follows_sparsegpts_blocks(sparsity, block):
    """Unstructured, matrix scope: the row term divides each row by its own sum, so
    (row 1, col 0, a 1) is SparseGPT's per-block rule on |w| / rowsum."""
    from crepe_plugin.core import CRePEConfig, compensate_adaptive_unstructured, crepe_saliency

    W, _, hs, _ = _problem(rows=40, cols=64, seed=4)
    sgpt = CRePEConfig(row_coef=1.0, col_coef=0.0, neighbor_coef=0.0, act_exponent=1.0)
    Wa, mask = compensate_adaptive_unstructured(W, hs.H, sparsity, crepe_saliency(W, sgpt), "matrix", 0.01, block)
    rowsum = W.abs().sum(1)
    Wr, mask_r = _sparsegpt_reference(W, hs.H, 0, 0, blocksize=block, sparsity=sparsity, row_scale=1 / rowsum)
    assert torch.equal(mask, mask_r)
    torch.testing.assert_close(Wa, Wr, rtol=1e-4, atol=1e-4)
    assert bool((Wa[mask] == 0).all())


def test_adaptive_unstructured_row_scope_prunes_each_row_equally():
    from crepe_plugin.core import CRePEConfig, compensate_adaptive_unstructured, crepe_saliency

    W, _, hs, _ = _problem(rows=24, cols=64, seed=6)
    _, mask = compensate_adaptive_unstructured(W, hs.H, 0.5, crepe_saliency(W, CRePEConfig()), "row", 0.01, 32)
    assert torch.equal(mask.sum(1), torch.full((24,), 32))


@pytest.mark.parametrize("structure,sparsity", [("2:4", None), ("0:0", 0.6)])
def test_prune_layer_is_the_score_mask_and_compensation_composed(structure, sparsity):
    """``core.prune_layer`` (the modifier's per-Linear step) is exactly: CRePE's score and the
    structure's mask; then, with reconstruction, OBS on that mask (or the adaptive sweep) and CG."""
    from crepe_plugin.core import (CRePEConfig, LayerStats, PruneConfig, Reconstruction, compensate_adaptive_nm,
                                   compensate_adaptive_unstructured, crepe_saliency, prune_layer)  # fmt: skip

    W, _, hs, ns = _problem(seed=7)
    score = CRePEConfig(row_coef=2.0, neighbor_coef=0.2, act_exponent=0.8)
    sp = sparsity if sparsity is not None else 0.5
    mask = prune_mask(crepe_scores(W, ns.value(), score), sp, structure, "row")
    pruned, got = prune_layer(W, LayerStats(ns.value()), PruneConfig(score=score, structure=structure, scope="row"), sparsity)
    assert torch.equal(got, mask) and torch.equal(pruned, W.masked_fill(mask, 0))

    fixed = PruneConfig(score=score, structure=structure, scope="row", reconstruction=Reconstruction(refine_steps=5))
    pruned, got = prune_layer(W, LayerStats(hs.input_sq_norm(), hs.H), fixed, sparsity)
    mask = prune_mask(crepe_scores(W, hs.input_sq_norm(), score), sp, structure, "row")
    want = refine_fixed_mask(W, compensate_fixed_mask(W, hs.H, mask), hs.H, mask, 5)
    assert torch.equal(got, mask) and torch.equal(pruned, want)

    adaptive = fixed.model_copy(update={"reconstruction": Reconstruction(mask_selection="adaptive", refine_steps=5)})
    pruned, got = prune_layer(W, LayerStats(hs.input_sq_norm(), hs.H), adaptive, sparsity)
    sal = crepe_saliency(W, score)
    if sparsity is None:
        start, mask = compensate_adaptive_nm(W, hs.H, 2, 4, sal)
    else:
        start, mask = compensate_adaptive_unstructured(W, hs.H, sparsity, sal, "row")
    assert torch.equal(got, mask) and torch.equal(pruned, refine_fixed_mask(W, start, hs.H, mask, 5))
    with pytest.raises(CalibrationError, match="Hessian"):
        prune_layer(W, LayerStats(ns.value()), fixed, sparsity, layer_name="l0")
