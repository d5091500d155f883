"""Cheap proxies of model quality for one pruned layer. Pure torch.

PHO (crepe_plugin.pho) searches CRePE's coefficients against these instead of
perplexity. Every proxy here is "lower is better" and is computed from one layer's
weight, its mask and calibration statistics gathered once; none runs the model.
docs/method.md says why each should track perplexity, and the search report measures
how well it does.
"""

from __future__ import annotations

import torch

from .errors import CalibrationError, _where
from .scores import linear_scores

__all__ = ["PROXIES", "gini", "output_energy", "output_error", "output_error_terms", "diag_output_error", "layer_proxy"]

PROXIES = ("recon", "energy", "diag", "gini")
"""recon: mean over layers of the relative output error (full input Gram matrix H);
energy: the output error pooled over layers, sum tr(D H D^T) / sum tr(W H W^T), so each
layer counts by its output energy; diag: recon with diag(H) only (no H needed);
gini: minus the Gini coefficient of the retained scores."""


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 = all equal, -> 1 = one value holds all."""
    x = values.detach().reshape(-1).to(torch.float64)
    n = x.numel()
    if n == 0:
        raise ValueError("gini of an empty tensor")
    total = float(x.sum())
    if total <= 0.0:
        return 0.0
    x, _ = torch.sort(x)
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float((2.0 * (ranks * x).sum()) / (n * total) - (n + 1.0) / n)


def output_energy(weight: torch.Tensor, H: torch.Tensor) -> float:
    """tr(W H W^T) = ||W X||_F^2: the denominator of ``output_error`` (cache it per layer)."""
    w = weight.detach().to(H.dtype)
    return float(((w @ H) * w).sum())


def output_error(
    weight: torch.Tensor, pruned: torch.Tensor, H: torch.Tensor, layer_name: str | None = None, energy: float | None = None
) -> float:
    """Relative output error of a pruned layer on the calibration inputs:

        tr(D H D^T) / tr(W H W^T),  D = W - W_pruned,  H = sum over tokens of x x^T

    i.e. ||(W - W_p) X||_F^2 / ||W X||_F^2 without storing X. Weights are (out, in).
    ``energy``: ``output_energy(weight, H)`` if already known.
    """
    if H.shape != (weight.shape[1], weight.shape[1]):
        raise CalibrationError(
            f"{_where(layer_name)}: Gram matrix is {tuple(H.shape)}, the weight has {weight.shape[1]} inputs"
        )
    d = weight.detach().to(H.dtype) - pruned.detach().to(H.dtype)
    num = float(((d @ H) * d).sum())
    den = output_energy(weight, H) if energy is None else energy
    return num / den if den > 0 else 0.0


def diag_output_error(weight: torch.Tensor, mask: torch.Tensor, input_sq_norm: torch.Tensor) -> float:
    """``output_error`` of plain pruning with H replaced by its diagonal: the pruned share
    of sum_ij W_ij^2 ||X_j||^2 (Wanda's importance, squared). Needs no Gram matrix."""
    e = weight.detach().to(torch.float32).pow(2).mul_(input_sq_norm.to(torch.float32).reshape(1, -1))
    total = float(e.sum())
    return float(e.masked_fill_(~mask, 0).sum()) / total if total > 0 else 0.0


def output_error_terms(weight: torch.Tensor, mask: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H D^T) for D = W on the pruned positions: the numerator of ``output_error``."""
    d = weight.detach().to(H.dtype).masked_fill(~mask, 0)
    return float(((d @ H) * d).sum())


def layer_proxy(
    proxy: str,
    weight: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    input_sq_norm: torch.Tensor,
    H: torch.Tensor | None = None,
    layer_name: str | None = None,
    energy: float | None = None,
) -> float:
    """One layer's proxy value for a mask (True = pruned) chosen from ``scores``."""
    if proxy == "recon":
        if H is None:
            raise CalibrationError(f"{_where(layer_name)}: the 'recon' proxy needs the input Gram matrix")
        return output_error(weight, weight.masked_fill(mask, 0), H, layer_name, energy)
    if proxy == "diag":
        return diag_output_error(weight, mask, input_sq_norm)
    if proxy == "gini":
        # a score map that concentrates its mass on the kept weights separates them
        # clearly from the pruned ones; minimised, so negated
        return -gini(linear_scores(scores).masked_fill(mask, 0))
    raise ValueError(f"unknown proxy {proxy!r}; expected one of {PROXIES}")
