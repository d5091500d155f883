"""OWLAllocationModifier: per-layer sparsities (OWL) handed to the pruning modifiers
that follow it in the same recipe. Works where llm-compressor 0.14's
``sparsity_profile: owl`` fails: it measures the outlier ratios itself, from one dense
forward pass over the calibration data, before any pruner initializes.

```yaml
sparsity_stage:
  sparsity_modifiers:
    OWLAllocationModifier:
      owl_m: 5
      owl_lmbda: 0.08
    CRePEPruningModifier:
      mask_structure: "0:0"
      sparsity: 0.7        # the target mean; OWL replaces it with one value per decoder layer
```
"""

from __future__ import annotations

import torch
from loguru import logger
from pydantic import Field, PrivateAttr
from tqdm.auto import tqdm

from ..compat.llmcompressor import State
from ..core import (
    PruningError,
    decoder_layer,
    gather_stats,
    outlier_ratio,
    owl_sparsities,
    wanda_importance,
    weight_out_in,
)
from ..selection import PRUNABLE, select_layers
from .base import LayerwiseModifier

__all__ = ["OWLAllocationModifier"]


class OWLAllocationModifier(LayerwiseModifier):
    """OWL (Yin et al., 2024): layers with more outlier weights (Wanda importance above
    ``owl_m`` x the layer mean) get lower sparsity, within target +- ``owl_lmbda``, at
    the same mean. The target is the following pruner's ``sparsity`` (or ``sparsity``
    here). Applies to CRePE / RIA (as a per-layer map) and to llm-compressor's Wanda and
    SparseGPT (as their per-target list). Unstructured only: an N:M pruner prunes
    exactly N/M of every layer, so OWL refuses it.
    """

    owl_m: float = Field(5.0, gt=0)
    owl_lmbda: float = Field(0.08, ge=0, lt=0.5)
    sparsity: float | None = Field(None, gt=0, lt=1)

    _layer_sparsity: dict[str, float] = PrivateAttr(default_factory=dict)

    def on_initialize(self, state: State, **kwargs) -> bool:
        pruners = self.pruners_after()
        if not pruners:
            raise PruningError("OWLAllocationModifier: no pruning modifier follows it in the recipe to hand sparsities to")
        for p in pruners:
            n, m = p.structure
            if n:
                raise PruningError(
                    f"OWLAllocationModifier: {type(p.modifier).__name__} prunes {n}:{m}, which fixes every "
                    "layer's sparsity at N/M; OWL allocates unstructured sparsity only (mask_structure '0:0'). "
                    "To keep chosen layers dense under N:M, give the pruner a sparsity map with 0 for them"
                )
        target = self.sparsity
        if target is None:
            vals = [p.sparsity for p in pruners]
            if not all(isinstance(v, float) for v in vals) or len(set(vals)) != 1:
                raise PruningError(
                    f"OWLAllocationModifier: the pruners after it give no single float sparsity ({vals}); set "
                    "OWLAllocationModifier.sparsity to the target mean"
                )
            target = vals[0]
        model = state.model
        linears = {n: m for n, m in select_layers(model, PRUNABLE, self.ignore).items() if decoder_layer(n)}
        if not linears:
            raise PruningError("OWLAllocationModifier: found no linear layer inside decoder layers (named '...layers.N.')")
        loader = getattr(getattr(state, "data", None), "calib", None)
        if loader is None:
            raise PruningError("OWLAllocationModifier needs calibration data, and oneshot got none")
        stats = gather_stats(model, loader, linears, (), device=next(model.parameters()).device,
                             progress=lambda it: tqdm(it, desc="OWL outlier statistics"))  # fmt: skip
        groups: dict[str, list[torch.Tensor]] = {}
        for name, mod in linears.items():
            with torch.no_grad():
                imp = wanda_importance(weight_out_in(mod), stats.sq_norms[name].to(mod.weight.device))
            groups.setdefault(decoder_layer(name)[0], []).append(imp)
        layers = list(groups)
        ratios = [outlier_ratio(groups.pop(layer), self.owl_m) for layer in layers]
        sp = owl_sparsities(ratios, target, self.owl_lmbda)
        self._layer_sparsity = dict(zip(layers, sp))
        logger.info(
            "OWL sparsities (target {:.3f}, M {}, lambda {}): {}",
            target, self.owl_m, self.owl_lmbda, ", ".join(f"{s:.3f}" for s in sp),
        )  # fmt: skip
        for p in pruners:
            p.assign_layer_sparsities(model, self._layer_sparsity, target)
        return True
