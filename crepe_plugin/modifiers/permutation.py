"""ChannelPermutationModifier: permute input channels before N:M pruning so the mask
keeps more importance, and fold every permutation into the model so the saved weights
are exactly N:M in stored order and the architecture is unchanged.

Folded (exact, no run-time permutation):

- ``down_proj`` inputs, through the output rows of ``gate_proj`` and ``up_proj``
  (the MLP's elementwise product commutes with a permutation);
- ``o_proj`` inputs, through the output rows of ``v_proj``: one permutation of the head
  dimension per KV head, applied to the o_proj columns of every query head sharing that
  KV head (grouped-query attention). Attention mixes tokens, not head dimensions, so
  permuting V's head dimension permutes the attention output the same way.

q/k/v/gate/up inputs (the residual stream) are not permuted. Place the modifier before
the pruner; it takes the score (CRePE / RIA coefficients, or Wanda's) and N:M from it.

```yaml
sparsity_stage:
  sparsity_modifiers:
    ChannelPermutationModifier:
      layers: ["down_proj", "o_proj"]
    CRePEPruningModifier:
      mask_structure: "2:4"
```
"""

from __future__ import annotations

from typing import Literal

import torch
from loguru import logger
from pydantic import Field, PrivateAttr

from ..compat.compressed_tensors import align_module_device, get_execution_device, update_offload_parameter
from ..compat.llmcompressor import State
from ..core import CRePEConfig, InputNormStats, LayerShapeError, PruningError, check_nm_width, crepe_scores, linear_scores
from ..core.permutation import find_permutation, kept_importance, stacked_head_scores
from ..selection import select_layers
from .base import LayerwiseModifier

__all__ = ["ChannelPermutationModifier"]


def _permute_rows(module: torch.nn.Module, perm: torch.Tensor) -> None:
    with align_module_device(module):
        update_offload_parameter(module, "weight", module.weight.data[perm.to(module.weight.device)].contiguous())
        if getattr(module, "bias", None) is not None:
            update_offload_parameter(module, "bias", module.bias.data[perm.to(module.bias.device)].contiguous())


def _permute_cols(module: torch.nn.Module, perm: torch.Tensor) -> None:
    with align_module_device(module):
        update_offload_parameter(module, "weight", module.weight.data[:, perm.to(module.weight.device)].contiguous())


class ChannelPermutationModifier(LayerwiseModifier):
    """RIA-style channel permutation (reallocation, then Hungarian refinement per
    in-group position, blockwise), folded into the weights."""

    layers: list[Literal["down_proj", "o_proj"]] = Field(default_factory=lambda: ["down_proj", "o_proj"])
    hungarian: bool = True
    block_groups: int = Field(128, ge=2)
    rounds: int = Field(1, ge=1, le=10)

    _n: int = PrivateAttr(0)
    _m: int = PrivateAttr(0)
    _cfg: CRePEConfig | None = PrivateAttr(None)
    _model: torch.nn.Module | None = PrivateAttr(None)
    _done: dict[str, dict] = PrivateAttr(default_factory=dict)

    def on_initialize(self, state: State, **kwargs) -> bool:
        after = self.pruners_after()
        if not after:
            raise PruningError("ChannelPermutationModifier: put it before an N:M pruning modifier (CRePE, RIA, Wanda, SparseGPT)")
        pruner = after[0]
        self._n, self._m = pruner.structure
        if not self._n:
            raise PruningError(
                f"ChannelPermutationModifier: {type(pruner.modifier).__name__} prunes unstructured; channel permutation "
                "only helps N:M (mask_structure 'N:M')"
            )
        if pruner.score is None:
            raise PruningError("ChannelPermutationModifier cannot precede a PHO search; search first, then use its recipe")
        self._cfg = pruner.score
        cfg = state.model.config
        self._model = state.model
        self._heads = (getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None))
        self._head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads if getattr(cfg, "num_attention_heads", None) else None)
        for name, mod in select_layers(state.model, ["Linear"], self.ignore).items():
            if name.rsplit(".", 1)[-1] in self.layers:
                self._layers[mod] = name
        if not self._layers:
            raise PruningError(f"ChannelPermutationModifier: no Linear named {self.layers} in the model (ignore {self.ignore})")
        return True

    def new_stats(self, module: torch.nn.Module) -> InputNormStats:
        return InputNormStats(module.weight.shape[1], device=get_execution_device(module))

    def _sibling(self, name: str, leaf: str) -> torch.nn.Module | None:
        parent = name.rsplit(".", 1)[0]
        try:
            return self._model.get_submodule(f"{parent}.{leaf}")
        except AttributeError:
            return None

    @torch.no_grad()
    def process_layer(self, module: torch.nn.Module, name: str, stats: InputNormStats) -> None:
        n, m = self._n, self._m
        with align_module_device(module):
            w = module.weight.detach()
            try:
                check_nm_width(w.shape[1], m, name, "not permuted", n=n)
            except LayerShapeError as e:
                logger.warning(f"channel permutation: {e}")
                return
            scores = linear_scores(crepe_scores(w, stats.value(name).to(w.device), self._cfg, layer_name=name))
        before = kept_importance(scores, n, m)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "down_proj":
            feeders = [self._sibling(name, "gate_proj"), self._sibling(name, "up_proj")]
            if any(f is None for f in feeders):
                logger.warning(f"channel permutation: '{name}' has no gate_proj/up_proj beside it; not permuted")
                return
            perm = find_permutation(scores, n, m, self.hungarian, self.block_groups, self.rounds, name)
            for f in feeders:
                _permute_rows(f, perm)
            _permute_cols(module, perm)
            vperm = None
        else:  # o_proj through v_proj, one within-head permutation per KV head
            v = self._sibling(name, "v_proj")
            h, kv = self._heads
            d = self._head_dim
            if v is None or not h or not d or h * d != w.shape[1] or d % m:
                logger.warning(f"channel permutation: '{name}' has no usable v_proj / head layout; not permuted")
                return
            sigmas = [find_permutation(s, n, m, self.hungarian, self.block_groups, self.rounds, name) for s in stacked_head_scores(scores, h, kv, d)]
            rep = h // kv
            perm = torch.cat([hh * d + sigmas[hh // rep] for hh in range(h)])
            vperm = torch.cat([k * d + sigmas[k] for k in range(kv)])
            _permute_rows(v, vperm)
            _permute_cols(module, perm)
        after = kept_importance(scores[:, perm.to(scores.device)], n, m)
        moved = float((perm.cpu() != torch.arange(perm.numel())).float().mean())
        self._done[name] = {"kept_before": before, "kept_after": after, "moved": moved}
        logger.info(f"channel permutation {name}: kept importance {before:.6g} -> {after:.6g} (+{(after / before - 1) * 100:.2f}%), {moved:.0%} of channels moved")

    def on_finalize(self, state: State, **kwargs) -> bool:
        super().on_finalize(state, **kwargs)
        if self._done:
            info = {k: round(v["kept_after"] / v["kept_before"] - 1, 6) for k, v in self._done.items()}
            self.update_record(state.model, lambda old: {**(old or {}), "permuted": {"folded": True, "kept_importance_gain": info}})
        skipped = [n for n in self._layers.values() if n not in self._done]
        if skipped:
            logger.info(f"channel permutation: {len(skipped)} layers not permuted (first: '{skipped[0]}')")
        return True
