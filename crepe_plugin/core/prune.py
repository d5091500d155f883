"""One layer, pruned: score, mask and (optionally) reconstruction. Pure torch and pydantic.

``prune_layer(weight, stats, config, sparsity)`` is the one per-Linear step. CRePEPruningModifier
calls it for every calibrated layer and for experts no calibration token reached (weight-only
statistics); PHO's evaluator calls it (through ``layer_mask``) for every configuration it scores.

``PruneConfig`` is what the step needs besides the weight and its statistics: the score's
coefficients (``CRePEConfig``), the structure, the unstructured scope, and the reconstruction
settings (None = mask only). The sparsity is per layer, so it is an argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from .compensation import compensate_adaptive_nm, compensate_adaptive_unstructured, compensate_fixed_mask, refine_fixed_mask
from .config import CRePEConfig
from .errors import CalibrationError, _where
from .masks import parse_structure, prune_mask
from .scores import crepe_saliency, crepe_scores

__all__ = ["Reconstruction", "PruneConfig", "LayerStats", "layer_mask", "prune_layer", "DampeningFrac", "BlockSize",
           "RefineSteps", "Scope", "MaskSelection"]  # fmt: skip

# field types shared with the modifiers, so both validate alike
DampeningFrac = Annotated[float, Field(gt=0.0, lt=1.0)]
BlockSize = Annotated[int, Field(ge=1)]
RefineSteps = Annotated[int, Field(ge=0, le=1000)]
Scope = Literal["matrix", "row"]
MaskSelection = Literal["fixed", "adaptive"]


class Reconstruction(BaseModel):
    """Update the kept weights to minimise the layer's output error on the calibration inputs
    (OBS / SparseGPT-style, then conjugate-gradient refinement); see docs/method.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mask_selection: MaskSelection = "fixed"
    dampening_frac: DampeningFrac = 0.01
    block_size: BlockSize = 128
    refine_steps: RefineSteps = 20


class PruneConfig(BaseModel):
    """How one layer is pruned, besides its weight, statistics and sparsity."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    score: CRePEConfig
    structure: str = "2:4"
    scope: Scope = "matrix"
    reconstruction: Reconstruction | None = None
    _nm: tuple[int, int] = PrivateAttr((0, 0))

    @field_validator("structure", mode="before")
    @classmethod
    def _structure(cls, v) -> str:
        n, m = parse_structure(str(v))
        return f"{n}:{m}"

    def model_post_init(self, _context) -> None:
        self._nm = parse_structure(self.structure)

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M), or (0, 0) for unstructured."""
        return self._nm


@dataclass
class LayerStats:
    """A layer's calibration statistics: ``input_sq_norm`` (mean over samples of ||X_j||^2; None
    only for a data-free score, act_exponent 0) and, for reconstruction, ``hessian`` (2/n X X^T)."""

    input_sq_norm: torch.Tensor | None
    hessian: torch.Tensor | None = None


def layer_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor | None, config: PruneConfig,
               sparsity: float | None = None, layer_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(scores, mask) of one (out, in) weight: CRePE's score, then the structure's mask (True = pruned).
    ``sparsity`` is needed for unstructured only (N:M prunes N/M)."""
    if sparsity is None and not config.nm[0]:
        raise ValueError(f"{_where(layer_name)}: unstructured pruning needs a sparsity")
    scores = crepe_scores(weight, input_sq_norm, config.score, layer_name=layer_name)
    return scores, prune_mask(scores, sparsity or 0.0, config.structure, config.scope, layer_name=layer_name)


def prune_layer(weight: torch.Tensor, stats: LayerStats, config: PruneConfig, sparsity: float | None = None,
                *, layer_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Prune one (out, in) weight: returns (pruned weight in ``weight``'s dtype, mask with True =
    pruned). Without reconstruction the kept weights are the dense ones."""
    rec = config.reconstruction
    if rec is None:
        _, mask = layer_mask(weight, stats.input_sq_norm, config, sparsity, layer_name)
        return weight.masked_fill(mask, 0), mask
    H = stats.hessian
    if H is None:
        raise CalibrationError(f"{_where(layer_name)}: reconstruction needs the layer's input Hessian")
    n, m = config.nm
    if rec.mask_selection == "adaptive":
        sal = crepe_saliency(weight, config.score, layer_name=layer_name)
        if n:
            pruned, mask = compensate_adaptive_nm(weight, H, n, m, sal, rec.dampening_frac, rec.block_size, layer_name=layer_name)
        else:
            pruned, mask = compensate_adaptive_unstructured(
                weight, H, sparsity, sal, config.scope, rec.dampening_frac, rec.block_size, layer_name=layer_name
            )
    else:
        _, mask = layer_mask(weight, stats.input_sq_norm, config, sparsity, layer_name)
        pruned = compensate_fixed_mask(weight, H, mask, rec.dampening_frac, rec.block_size, layer_name=layer_name)
    if rec.refine_steps:
        pruned = refine_fixed_mask(weight, pruned, H, mask, rec.refine_steps, rec.dampening_frac, layer_name)
    return pruned.to(weight.dtype), mask
