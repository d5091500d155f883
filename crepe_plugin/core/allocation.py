"""Layer-wise sparsity allocation (OWL, Yin et al. 2024). Pure torch.

OWL gives layers with more activation outliers a lower sparsity. A weight is an outlier
when its Wanda importance |W_ij| * ||X_j|| exceeds ``m`` times the mean importance of
its decoder layer; a layer's outlier ratio is the share of such weights over all of its
linear layers. The ratios are rescaled linearly onto [0, 2 * lmbda], re-centred so that
their mean is the target density, and turned into sparsities: so the layers' mean
sparsity equals the target, and every sparsity lies within target +- lmbda.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from .errors import PruningError

__all__ = ["wanda_importance", "outlier_ratio", "owl_sparsities"]


def wanda_importance(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j|| for a weight laid out (out, in)."""
    return weight.detach().abs().float() * input_sq_norm.float().sqrt().reshape(1, -1)


def outlier_ratio(importances: Iterable[torch.Tensor], m: float) -> float:
    """Share of entries above ``m`` times the mean, over all tensors of one layer together."""
    total, count, n = 0.0, 0, 0
    mats = list(importances)
    if not mats:
        raise PruningError("OWL: a decoder layer has no linear layer to measure")
    for t in mats:
        total += float(t.sum(dtype=torch.float64))
        n += t.numel()
    mean = total / n
    for t in mats:
        count += int((t > m * mean).sum())
    return count / n


def owl_sparsities(ratios: Sequence[float], target: float, lmbda: float) -> list[float]:
    """Per-layer sparsities from outlier ratios: mean = target, range target +- lmbda."""
    if not (0.0 < target < 1.0):
        raise PruningError(f"OWL: target sparsity must be in (0, 1), got {target}")
    if not (0.0 <= lmbda < min(target, 1.0 - target)):
        raise PruningError(
            f"OWL: owl_lmbda {lmbda} must be in [0, {min(target, 1 - target):g}) so every layer's "
            f"sparsity stays in (0, 1) around the target {target}"
        )
    r = torch.tensor(list(ratios), dtype=torch.float64)
    if r.numel() == 0:
        raise PruningError("OWL: no layers")
    span = float(r.max() - r.min())
    scaled = (r - r.min()) / span * (2 * lmbda) if span > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1.0 - target)
    return [float(1.0 - d) for d in density]
