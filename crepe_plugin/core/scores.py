"""CRePE / RIA importance scores. Pure torch: no llm-compressor, no transformers.

All ops are vectorised and run alike on CPU and GPU.
"""

from __future__ import annotations

import math

import torch

from .config import RIA_CONFIG, CRePEConfig
from .errors import CalibrationError, NonFiniteError, _where

__all__ = ["crepe_scores", "crepe_saliency", "relative_importance", "neighborhood", "window_kernel_1d", "check_finite",
           "linear_scores"]


def check_finite(t: torch.Tensor, what: str, layer: str | None = None) -> None:
    """Raise NonFiniteError naming the layer if ``t`` holds NaN or Inf."""
    if not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteError(
            f"{_where(layer)}: {what} contains {n_nan} NaN and {n_inf} Inf values; "
            "fix the model (or add the layer to `ignore`) before pruning"
        )


def _safe_den(s: torch.Tensor) -> torch.Tensor:
    # An all-zero row/column has |W| = 0 everywhere, so 0 / tiny = 0 (finite). For any
    # non-zero sum the clamp is a no-op, which keeps RIA's scores bit-exact.
    return s.clamp_min(torch.finfo(s.dtype).tiny)


def relative_importance(w_abs: torch.Tensor, row_coef: float = 1.0, col_coef: float = 1.0) -> torch.Tensor:
    """col_coef * |W|/colsum + row_coef * |W|/rowsum, with W laid out (out, in).

    colsum_j = sum_i |W_ij| (dim=0), rowsum_i = sum_j |W_ij| (dim=1), as RIA's code.
    The term order (column term first) matches RIA so that RIA's scores are bit-exact.
    ``w_abs`` is overwritten (it is a scratch buffer): pass a copy you own.
    """
    colsum = _safe_den(w_abs.sum(dim=0, keepdim=True))
    rowsum = _safe_den(w_abs.sum(dim=1, keepdim=True))
    ri = torch.div(w_abs, colsum)
    if col_coef != 1.0:
        ri.mul_(col_coef)
    torch.div(w_abs, rowsum, out=w_abs)
    if row_coef != 1.0:
        w_abs.mul_(row_coef)
    return ri.add_(w_abs)


def window_kernel_1d(kernel_size: int, kernel: str, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised, symmetric 1-D window; the 2-D kernel is its outer product (separable)."""
    if kernel == "box":
        k = torch.ones(kernel_size, dtype=torch.float64)
    elif kernel == "gaussian":
        # OpenCV's default sigma for a given aperture
        sigma = 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8
        x = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
        k = torch.exp(-(x**2) / (2 * sigma * sigma))
    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected 'box' or 'gaussian'")
    return (k / k.sum()).to(dtype=dtype, device=device)


def _outside_index(n: int, d: int, side: int, border: str, device) -> torch.Tensor:
    """Source indices for the cells whose neighbour at offset side*d (d <= n) is outside [0, n)."""
    q = (torch.arange(n - d, n, device=device) + d) if side > 0 else (torch.arange(0, d, device=device) - d)
    if border == "replicate":
        return q.clamp(0, n - 1)
    return torch.where(q < 0, -q, 2 * (n - 1) - q)  # reflect, edge not repeated


def _window_1d(x: torch.Tensor, k1: torch.Tensor, dim: int, border: str, log: bool = False) -> torch.Tensor:
    """Correlate x with the symmetric 1-D window k1 along dim, by shifted in-place adds:
    out[p] = sum_t k1[r + t] * x[p + t], with x outside [0, n) given by ``border``.
    ``log``: x holds logarithms and so does the result (the sum taken by logaddexp)."""
    r = k1.numel() // 2
    n = x.shape[dim]
    if border == "reflect" and n <= r:
        border = "replicate"  # a side shorter than the radius cannot be mirrored
    w = k1.tolist()

    def add(tgt: torch.Tensor, src: torch.Tensor, alpha: float) -> None:
        if log:
            tgt.copy_(torch.logaddexp(tgt, src + math.log(alpha)))
        else:
            tgt.add_(src, alpha=alpha)

    out = x + math.log(w[r]) if log else x * w[r]
    for d in range(1, r + 1):
        if d < n:
            add(out.narrow(dim, 0, n - d), x.narrow(dim, d, n - d), w[r + d])
            add(out.narrow(dim, d, n - d), x.narrow(dim, 0, n - d), w[r - d])
        if border in ("zero", "mean"):
            continue
        dd = min(d, n)
        for side, alpha in ((1, w[r + d]), (-1, w[r - d])):
            idx = _outside_index(n, dd, side, border, x.device)
            tgt = out.narrow(dim, n - dd, dd) if side > 0 else out.narrow(dim, 0, dd)
            add(tgt, x.index_select(dim, idx), alpha)
    return out


def _coverage_1d(n: int, k1: torch.Tensor) -> torch.Tensor:
    """Sum of the window weights that fall inside [0, n) at every position."""
    ones = torch.ones(n, dtype=k1.dtype, device=k1.device)
    return _window_1d(ones, k1, 0, "zero")


def neighborhood(
    score_map: torch.Tensor, kernel_size: int = 3, kernel: str = "box", border: str = "mean", log: bool = False
) -> torch.Tensor:
    """Weighted k x k window average of ``score_map`` (centre included), same shape.

    border: 'mean' renormalises the kernel over in-bounds cells (no padding bias);
    'zero' pads with zeros; 'reflect' / 'replicate' pad by mirroring (edge excluded) /
    repeating the edge. Separable: one 1-D pass along inputs, one along outputs.
    ``log``: the map holds logarithms of the values, and the result is the log of their average.
    """
    if border not in ("mean", "zero", "reflect", "replicate"):
        raise ValueError(f"unknown border {border!r}")
    if kernel_size == 1:
        return score_map.clone()
    k1 = window_kernel_1d(kernel_size, kernel, dtype=score_map.dtype, device=score_map.device)
    out = _window_1d(_window_1d(score_map, k1, 1, border, log), k1, 0, border, log)
    if border == "mean":
        r = kernel_size // 2
        rows, cols = score_map.shape
        cov_r, cov_c = _coverage_1d(rows, k1), _coverage_1d(cols, k1)
        if log:
            cov_r, cov_c = cov_r.log(), cov_c.log()
        scale = torch.Tensor.sub_ if log else torch.Tensor.div_
        # interior coverage is 1 (normalised kernel): only the border bands need rescaling
        for sl in {(0, min(r, rows)), (max(rows - r, 0), min(r, rows))}:
            scale(out.narrow(0, *sl), cov_r.narrow(0, *sl).unsqueeze(1))
        for sl in {(0, min(r, cols)), (max(cols - r, 0), min(r, cols))}:
            scale(out.narrow(1, *sl), cov_c.narrow(0, *sl).unsqueeze(0))
    return out


def _act_factor(input_sq_norm: torch.Tensor, a: float) -> torch.Tensor:
    # RIA: (sqrt(scaler_row)) ** a, kept in this exact form for bit-exact scores
    return torch.sqrt(input_sq_norm) ** a


def crepe_scores(
    weight: torch.Tensor,
    input_sq_norm: torch.Tensor | None,
    config: CRePEConfig = RIA_CONFIG,
    *,
    layer_name: str | None = None,
) -> torch.Tensor:
    """CRePE importance of each weight; higher means keep.

    weight: (out, in), as torch.nn.Linear stores it (transpose transformers' Conv1D first,
        see ``crepe_plugin.core.layers.weight_out_in``).
    input_sq_norm: (in,), mean over calibration samples of the squared L2 norm of input
        feature j (Wanda's / RIA's ``scaler_row``). ``None`` is allowed only when
        ``act_exponent == 0`` (a data-free score).
    Returns a tensor of ``weight``'s shape in float32 (float64 if the weight is float64). Where
    that linear form would overflow or underflow (``||X_j|| ** a`` past float's range: a large
    act_exponent or extreme input norms), it returns the score's logarithm in float64 instead,
    shifted below 0: it ranks the weights exactly as the score does, so no mask is decided by
    Inf, NaN or zeros from underflow; ``linear_scores`` turns it back where magnitudes matter.
    """
    if weight.dim() != 2:
        raise ValueError(f"{_where(layer_name)}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w_abs = weight.detach().to(dtype).abs()
    # any NaN/Inf in W makes its column sum non-finite: a cheap full check
    if not bool(torch.isfinite(w_abs.sum(dim=0)).all()):
        check_finite(weight, "weight", layer_name)

    ri = relative_importance(w_abs, config.row_coef, config.col_coef)
    del w_abs

    act = None
    if config.act_exponent != 0.0:
        if input_sq_norm is None:
            raise CalibrationError(
                f"{_where(layer_name)}: no input statistics; CRePE with act_exponent="
                f"{config.act_exponent} needs calibration data"
            )
        s = input_sq_norm.detach().to(device=weight.device, dtype=dtype).reshape(-1)
        if s.numel() != weight.shape[1]:
            raise CalibrationError(
                f"{_where(layer_name)}: input statistics have {s.numel()} features, "
                f"the weight has {weight.shape[1]} inputs"
            )
        check_finite(s, "input statistics", layer_name)
        if bool((s < 0).any()):
            raise CalibrationError(f"{_where(layer_name)}: negative squared input norms")
        act = _act_factor(s, config.act_exponent).reshape(1, -1)

    if config.neighbor_coef != 0.0:
        if config.neighbor_map == "score" and act is not None:
            ri.mul_(act)
            scores = ri.add_(
                neighborhood(ri, config.kernel_size, config.kernel, config.border), alpha=config.neighbor_coef
            )
            return scores if _ranks_exactly(scores, weight, s) else _log_scores(weight, s, config, layer_name)
        ri.add_(neighborhood(ri, config.kernel_size, config.kernel, config.border), alpha=config.neighbor_coef)
    if act is None:
        return ri
    scores = ri.mul_(act)
    return scores if _ranks_exactly(scores, weight, s) else _log_scores(weight, s, config, layer_name)


def _ranks_exactly(scores: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> bool:
    """The computed scores rank the weights as the real-valued score does: all finite, and none
    of a non-zero weight with a non-zero input norm has underflowed to 0 (a large act_exponent
    overflows ||X_j|| ** a to Inf or underflows it to 0; the mask would then follow the index
    order, not the weights)."""
    if not bool(torch.isfinite(scores).all()):
        return False
    return not bool(((scores == 0) & (weight != 0) & (s.reshape(1, -1) > 0)).any())


def _log_scores(weight: torch.Tensor, s: torch.Tensor, config: CRePEConfig, layer_name: str | None) -> torch.Tensor:
    """The score's logarithm in float64, shifted to lie at or below -1: it ranks the weights as the
    score does, without overflow or underflow for any finite act_exponent. Negative values tell
    it from a linear score (``linear_scores``)."""
    w_abs = weight.detach().to(torch.float64).abs()
    ri = relative_importance(w_abs, config.row_coef, config.col_coef)
    la = torch.log(s.to(torch.float64)).mul_(config.act_exponent / 2).reshape(1, -1)  # log ||X_j|| ** a
    k, kernel, border, c = config.kernel_size, config.kernel, config.border, config.neighbor_coef
    if c != 0.0 and config.neighbor_map == "score":
        ls = ri.log_().add_(la)
        out = torch.logaddexp(ls, neighborhood(ls, k, kernel, border, log=True).add_(math.log(c)))
    else:
        if c != 0.0:
            ri.add_(neighborhood(ri, k, kernel, border), alpha=c)
        out = ri.log_().add_(la)
    top = out.max()
    if not bool(torch.isfinite(top)) and not bool(torch.isneginf(top)):
        raise NonFiniteError(
            f"{_where(layer_name)}: act_exponent {config.act_exponent} is too large for its input norms: "
            "the score is not finite even in log space"
        )
    return out.sub_(top if bool(torch.isfinite(top)) else 0.0).sub_(1.0)


def linear_scores(scores: torch.Tensor) -> torch.Tensor:
    """``crepe_scores``' result as linear scores up to a positive factor: a log-form score (it lies
    below 0, where a linear score never does) is exponentiated; the few that underflow are
    negligible against the largest, for sums and Gini coefficients."""
    return scores.exp() if bool((scores < 0).any()) else scores


def crepe_saliency(weight: torch.Tensor, config: CRePEConfig = RIA_CONFIG, *, layer_name: str | None = None):
    """CRePE's score for a mask chosen inside the OBS sweep (``compensate_adaptive_nm``).

    For the group of inputs ``cols`` with current (compensated) weights ``w``:
    (col_coef |w| / colsum + row_coef |w| / rowsum + neighbor_coef N_k(RI)) * (1 / U_jj) ** a,
    the sums and the neighbourhood map taken from the original weights. 1 / U_jj (U: upper
    Cholesky factor of H^-1) is OBS's input scale; for a diagonal H it is sqrt(H_jj), which is
    ||X_j|| up to a constant, so the factor plays the role of ||X_j|| ** a. With row 1, col 0,
    no neighbourhood and a = 1 the ranking is SparseGPT's (w^2 / U_jj^2).
    """
    w_abs = weight.detach().to(torch.float32).abs()
    if not bool(torch.isfinite(w_abs.sum(dim=0)).all()):
        check_finite(weight, "weight", layer_name)
    colsum = _safe_den(w_abs.sum(dim=0))
    rowsum = _safe_den(w_abs.sum(dim=1, keepdim=True))
    nb = None
    if config.neighbor_coef != 0.0:
        ri = relative_importance(w_abs.clone(), config.row_coef, config.col_coef)
        nb = neighborhood(ri, config.kernel_size, config.kernel, config.border).mul_(config.neighbor_coef)
    del w_abs
    c, r, a = config.col_coef, config.row_coef, config.act_exponent

    def saliency(w: torch.Tensor, cols: slice, inv_d: torch.Tensor) -> torch.Tensor:
        wa = w.abs()
        sc = wa * (c / colsum[cols]) + wa * (r / rowsum)
        if nb is not None:
            sc = sc + nb[:, cols]
        if a == 0.0:
            return sc
        out = sc * inv_d.pow(a)
        if _ranks_exactly(out, w, inv_d):
            return out
        return sc.to(torch.float64).log_().add_(inv_d.to(torch.float64).log().mul_(a))  # ranks alike, no overflow

    return saliency
