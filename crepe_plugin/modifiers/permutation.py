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
from compressed_tensors.utils import align_module_device, get_execution_device, update_offload_parameter
from loguru import logger
from pydantic import Field, PrivateAttr

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier

from ..core import CRePEConfig, InputNormStats, PruningError, crepe_scores, parse_structure
from ..core.permutation import find_permutation, kept_importance, stacked_head_scores
from ..record import RECORD_KEY

__all__ = ["ChannelPermutationModifier"]


def _permute_rows(module: torch.nn.Module, perm: torch.Tensor) -> None:
    with align_module_device(module):
        update_offload_parameter(module, "weight", module.weight.data[perm.to(module.weight.device)].contiguous())
        if getattr(module, "bias", None) is not None:
            update_offload_parameter(module, "bias", module.bias.data[perm.to(module.bias.device)].contiguous())


def _permute_cols(module: torch.nn.Module, perm: torch.Tensor) -> None:
    with align_module_device(module):
        update_offload_parameter(module, "weight", module.weight.data[:, perm.to(module.weight.device)].contiguous())


class ChannelPermutationModifier(Modifier):
    """RIA-style channel permutation (reallocation, then Hungarian refinement per
    in-group position, blockwise), folded into the weights."""

    requires_calibration_data: bool = True
    layers: list[Literal["down_proj", "o_proj"]] = Field(default_factory=lambda: ["down_proj", "o_proj"])
    hungarian: bool = True
    block_groups: int = Field(128, ge=2)
    rounds: int = Field(1, ge=1, le=10)

    _n: int = PrivateAttr(0)
    _m: int = PrivateAttr(0)
    _cfg: CRePEConfig | None = PrivateAttr(None)
    _targets: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _stats: dict[torch.nn.Module, InputNormStats] = PrivateAttr(default_factory=dict)
    _model: torch.nn.Module | None = PrivateAttr(None)
    _done: dict[str, dict] = PrivateAttr(default_factory=dict)

    def on_initialize(self, state: State, **kwargs) -> bool:
        from llmcompressor.core import active_session
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

        from .pruning import CRePEPruningModifier

        mods = list(active_session().lifecycle.recipe.modifiers)
        idx = next(i for i, m in enumerate(mods) if m is self)
        after = [m for m in mods[idx + 1 :] if isinstance(m, (CRePEPruningModifier, SparsityModifierBase))]
        if not after:
            raise PruningError("ChannelPermutationModifier: put it before an N:M pruning modifier (CRePE, RIA, Wanda, SparseGPT)")
        pruner = after[0]
        self._n, self._m = parse_structure(pruner.mask_structure)
        if not self._n:
            raise PruningError(
                f"ChannelPermutationModifier: {type(pruner).__name__} prunes unstructured; channel permutation "
                "only helps N:M (mask_structure 'N:M')"
            )
        if isinstance(pruner, CRePEPruningModifier):
            if pruner.search is not None:
                raise PruningError("ChannelPermutationModifier cannot precede a PHO search; search first, then use its recipe")
            self._cfg = pruner.crepe_config
        else:  # Wanda (and SparseGPT's mask) rank by |W| * ||X||: CRePE's row term with a = 1
            self._cfg = CRePEConfig(row_coef=1.0, col_coef=0.0, act_exponent=1.0)
        cfg = state.model.config
        self._model = state.model
        self._heads = (getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_attention_heads", None))
        self._head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads if getattr(cfg, "num_attention_heads", None) else None)
        for name, mod in state.model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in self.layers and isinstance(mod, torch.nn.Linear):
                self._targets[mod] = name
        if not self._targets:
            raise PruningError(f"ChannelPermutationModifier: no Linear named {self.layers} in the model")
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for module in self._targets:
            self.register_hook(module, self._calibrate, "forward")

    def _calibrate(self, module, args, _out):
        if module not in self._stats:
            self._stats[module] = InputNormStats(module.weight.shape[1], device=get_execution_device(module))
        self._stats[module].update(args[0])

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._permute()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._permute()

    def _sibling(self, name: str, leaf: str) -> torch.nn.Module | None:
        parent = name.rsplit(".", 1)[0]
        try:
            return self._model.get_submodule(f"{parent}.{leaf}")
        except AttributeError:
            return None

    @torch.no_grad()
    def _permute(self) -> None:
        n, m = self._n, self._m
        for module in list(self._stats):
            name = self._targets[module]
            stats = self._stats.pop(module)
            with align_module_device(module):
                w = module.weight.detach()
                if w.shape[1] % m:
                    logger.warning(f"channel permutation: '{name}' has {w.shape[1]} inputs, not divisible by {m}; not permuted")
                    continue
                scores = crepe_scores(w, stats.value(name).to(w.device), self._cfg, layer_name=name)
            before = kept_importance(scores, n, m)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "down_proj":
                feeders = [self._sibling(name, "gate_proj"), self._sibling(name, "up_proj")]
                if any(f is None for f in feeders):
                    logger.warning(f"channel permutation: '{name}' has no gate_proj/up_proj beside it; not permuted")
                    continue
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
                    continue
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
        if not self.ended_:
            self.remove_hooks()
        cfg = getattr(state.model, "config", None)
        if cfg is not None and self._done:
            from .save import keep_record_on_save

            old = getattr(cfg, RECORD_KEY, None) or {}
            info = {k: round(v["kept_after"] / v["kept_before"] - 1, 6) for k, v in self._done.items()}
            setattr(cfg, RECORD_KEY, {**old, "permuted": {"folded": True, "kept_importance_gain": info}})
            keep_record_on_save(state.model)
        skipped = [n for n in self._targets.values() if n not in self._done]
        if skipped:
            logger.info(f"channel permutation: {len(skipped)} layers not permuted (first: '{skipped[0]}')")
        return True
