"""Fixed-mask error compensation (OBS / SparseGPT-style). Pure torch.

One implementation serves weight reconstruction after CRePE / RIA / Wanda (``quantize``
is None) and mask-preserving GPTQ (``quantize`` rounds each column): pruned positions
stay exactly zero, and the error of every column is spread over the columns not yet
processed through the inverse Hessian's Cholesky factor, blockwise.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import CalibrationError, NonFiniteError, _where
from .masks import check_nm_width, unstructured_mask

__all__ = ["inverse_hessian_factor", "compensate_fixed_mask", "compensate_adaptive_nm", "compensate_adaptive_unstructured", "refine_fixed_mask", "Saliency"]


def _damped_hessian(H: torch.Tensor, dampening_frac: float) -> torch.Tensor:
    """H + dampening_frac * mean(diag H) * I, as a float32 copy.

    Dead inputs (zero diagonal: never active in calibration) get H_jj = 1 first so H stays
    invertible; their weights are irrelevant to the calibration error.
    """
    Hd = H.to(torch.float32).clone()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1.0
    Hd.diagonal().add_(dampening_frac * float(torch.diagonal(Hd).mean()))
    return Hd


def inverse_hessian_factor(
    H: torch.Tensor, dampening_frac: float = 0.01, layer_name: str | None = None, max_tries: int = 6
) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1 (see ``_damped_hessian``).

    If the damped Hessian is not positive definite, dampening grows tenfold per try.
    """
    if not bool(torch.isfinite(H).all()):
        raise NonFiniteError(f"{_where(layer_name)}: the input Hessian holds NaN/Inf (non-finite activations)")
    frac = dampening_frac
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(_damped_hessian(H, frac))
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                return U
        frac = max(frac, 1e-6) * 10
    raise CalibrationError(
        f"{_where(layer_name)}: the input Hessian is not positive definite even with dampening "
        f"{frac / 10:g}; give more calibration data or raise dampening_frac"
    )


def compensate_fixed_mask(
    weight: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    dampening_frac: float = 0.01,
    block_size: int = 128,
    quantize: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    layer_name: str | None = None,
) -> torch.Tensor:
    """Update the kept weights of ``weight`` (out, in) to minimise ||(W - W') X||^2 with
    the pruned set fixed by ``mask`` (True = pruned); returns W' (float32), exactly zero
    where ``mask`` is True.

    quantize(column, index) -> rounded column (float): applied to every kept column in
    order (GPTQ); its rounding error is compensated the same way.
    Vectorised over rows; sequential over columns within a block, as OBS requires.
    """
    return _obs_sweep(weight, H, mask, None, dampening_frac, block_size, quantize, layer_name)[0]


Saliency = Callable[[torch.Tensor, slice, torch.Tensor], torch.Tensor]
"""saliency(current weights of an M-group (rows, M), its input columns, 1 / U_jj (M,)) -> scores
(rows, M); higher is kept."""


def compensate_adaptive_nm(
    weight: torch.Tensor,
    H: torch.Tensor,
    n: int,
    m: int,
    saliency: Saliency,
    dampening_frac: float = 0.01,
    block_size: int = 128,
    layer_name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M pruning with the mask chosen inside the OBS sweep (as SparseGPT does): each group
    of M inputs is masked when the sweep reaches it, from ``saliency`` of the weights as
    updated by the compensation of the groups before it. Returns (W', mask)."""
    check_nm_width(weight.shape[1], m, layer_name, n=n)
    block_size = max(m, block_size - block_size % m)
    return _obs_sweep(weight, H, None, ("nm", n, m, saliency), dampening_frac, block_size, None, layer_name)


def compensate_adaptive_unstructured(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    saliency: Saliency,
    scope: str = "matrix",
    dampening_frac: float = 0.01,
    block_size: int = 128,
    layer_name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unstructured pruning with the mask of each block of ``block_size`` inputs chosen when
    the OBS sweep reaches it (as SparseGPT does): ``scope`` 'matrix' prunes the lowest
    ``sparsity`` of the block's saliencies, 'row' the lowest ``sparsity`` of each row's.
    Returns (W', mask)."""
    if scope not in ("matrix", "row"):
        raise ValueError(f"scope must be 'matrix' or 'row', got {scope!r}")
    return _obs_sweep(weight, H, None, (scope, sparsity, None, saliency), dampening_frac, block_size, None, layer_name)


def _obs_sweep(weight, H, mask, adaptive, dampening_frac, block_size, quantize, layer_name):
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise CalibrationError(f"{_where(layer_name)}: Hessian {tuple(H.shape)} does not match {cols} inputs")
    U = inverse_hessian_factor(H.to(W.device, torch.float32), dampening_frac, layer_name)
    if adaptive is not None:
        kind, n, m, saliency = adaptive
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
        inv_d = 1.0 / torch.diagonal(U)
    keep = ~mask  # dead inputs keep their weights: they cost nothing on calibration data
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        K1 = keep[:, i1:i2]
        Err1 = torch.zeros_like(W1)
        if adaptive is not None and kind != "nm":  # unstructured: the whole block at its start
            K1.copy_(~unstructured_mask(saliency(W1, slice(i1, i2), inv_d[i1:i2]), n, kind, layer_name=layer_name))
        for i in range(i2 - i1):
            if adaptive is not None and kind == "nm" and i % m == 0:
                cols_g = slice(i1 + i, i1 + i + m)
                sc = saliency(W1[:, i : i + m], cols_g, inv_d[cols_g])
                pruned = torch.topk(sc, n, dim=1, largest=False).indices
                K1[:, i : i + m] = True
                K1[:, i : i + m].scatter_(1, pruned, False)
            w = W1[:, i]
            q = w * K1[:, i]
            if quantize is not None:
                q = quantize(q, i1 + i) * K1[:, i]
            err = (w - q) / U1[i, i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:].sub_(Err1 @ U[i1:i2, i2:])
    mask = ~keep
    W.masked_fill_(mask, 0.0)
    if not bool(torch.isfinite(W).all()):
        raise NonFiniteError(f"{_where(layer_name)}: reconstruction produced non-finite weights")
    return W, mask


def refine_fixed_mask(
    weight: torch.Tensor,
    start: torch.Tensor,
    H: torch.Tensor,
    mask: torch.Tensor,
    steps: int = 25,
    dampening_frac: float = 0.01,
    layer_name: str | None = None,
) -> torch.Tensor:
    """Conjugate-gradient refinement of the exact fixed-mask least squares.

    Minimises tr((W - W') Hd (W - W')^T) over W' with W'[mask] = 0, Hd = H + damp I,
    starting from ``start`` (e.g. the OBS result). Every row is its own quadratic on its
    kept set; CG runs on all rows at once (one (rows x in) @ (in x in) matmul per step)
    and converges to the exact per-row optimum, which sequential OBS only approximates.
    """
    W = weight.detach().to(torch.float32)
    Hd = _damped_hessian(H.to(W.device), dampening_frac)
    keep = (~mask).to(torch.float32)
    X = start.detach().to(torch.float32).clone().mul_(keep)
    R = ((W - X) @ Hd).mul_(keep)  # minus the gradient, restricted to kept weights
    P = R.clone()
    rr = (R * R).sum(1)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(steps):
        HP = (P @ Hd).mul_(keep)
        alpha = rr / (P * HP).sum(1).clamp_min(tiny)
        X.add_(alpha.unsqueeze(1) * P)
        R.sub_(alpha.unsqueeze(1) * HP)
        rr_new = (R * R).sum(1)
        beta = rr_new / rr.clamp_min(tiny)
        P = R + beta.unsqueeze(1) * P
        rr = rr_new
    X.masked_fill_(mask, 0.0)
    if not bool(torch.isfinite(X).all()):
        raise NonFiniteError(f"{_where(layer_name)}: refinement produced non-finite weights")
    return X
