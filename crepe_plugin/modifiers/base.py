"""What every crepe-plugin modifier shares with llm-compressor's lifecycle, written once.

``LayerwiseModifier`` owns:

- the calibration hooks and the sequential-epoch lifecycle: a forward hook per layer feeds a
  statistics accumulator (``new_stats``); at the end of each sequential epoch (one decoder
  layer, in llm-compressor's sequential pipeline) and at the end of calibration, every layer
  that has statistics is handed to ``process_layer`` once, and its statistics are freed, so
  memory stays at one decoder layer;
- module resolution (``resolve_layers``: targets/ignore as llm-compressor reads them,
  containers expanded to their Linear / Conv1D layers, in model order);
- the recipe around it (``pruners_before`` / ``pruners_after``: our pruners and
  llm-compressor's);
- the checkpoint record (``update_record``) and offload-aware weight write-back
  (``write_weight``, Conv1D-aware through ``core.set_weight``).

Each modifier keeps only its method. Upstream names come from ``crepe_plugin.compat``.

Why not llm-compressor's ``SparsityModifierBase``: it fixes what a pruner accumulates (a
Hessian or Wanda's row norms, in its ``calibrate_module``) and how it prunes
(``compress_modules`` over its own per-module state), and carries an OWL path
(``sparsity_profile``) that fails in 0.14. CRePE needs its own statistics (norms, or a Hessian
only with reconstruction) and writes a record, and DSnoT and channel permutation are not
pruners at all. The lifecycle events we hook are the same ones that base hooks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pydantic import Field, PrivateAttr, field_validator

from ..checkpoint.record import RECORD_KEY
from ..checkpoint.save import keep_record_on_save
from ..compat.compressed_tensors import match_named_modules, match_targets, update_offload_parameter
from ..compat.llmcompressor import Event, Modifier, SparsityModifierBase, State, recipe_modifiers
from ..core.layers import check_name_patterns, set_weight

__all__ = ["LayerwiseModifier", "PRUNABLE", "DEFAULT_IGNORE"]

PRUNABLE = ("Linear", "Conv1D")
# left dense unless a recipe says otherwise: the output head, and a vision-language model's vision
# tower and projector (LLaVA, Qwen2/2.5-VL, Gemma 3, Idefics/SmolVLM naming)
DEFAULT_IGNORE = [
    "re:.*lm_head",
    r"re:(.*\.)?(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|embed_vision|connector)(\..*)?$",
]


def _is_prunable(module: torch.nn.Module) -> bool:
    return type(module).__name__ in PRUNABLE or isinstance(module, torch.nn.Linear)


def _offload_assign(module: torch.nn.Module, stored: torch.Tensor) -> None:
    update_offload_parameter(module, "weight", stored)


def _refuse_tied(model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """A layer whose weight is another module's too (an lm_head tied to the embeddings) cannot be
    changed alone: pruning it would prune the other, and the saved checkpoint holds only one."""
    from ..core.errors import PruningError

    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is not None:
            owners.setdefault(id(w), []).append(name)
    for name, module in layers.items():
        others = [o for o in owners.get(id(module._parameters.get("weight")), []) if o != name and o not in layers]
        if others:
            raise PruningError(
                f"layer '{name}' shares its weight with '{others[0]}' (tied, e.g. tie_word_embeddings: true): it "
                f"cannot be pruned alone, and pruning it would prune '{others[0]}'; keep it in `ignore` "
                "(e.g. 're:.*lm_head')"
            )


class LayerwiseModifier(Modifier):
    """A modifier that calibrates chosen layers and processes each once its statistics are in."""

    requires_calibration_data: bool = True
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))

    _layers: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)  # module -> name

    @field_validator("ignore", "targets", mode="after", check_fields=False)
    @classmethod
    def _valid_patterns(cls, v, info):
        check_name_patterns(v, info.field_name)  # a bad 're:' entry fails here, not as a traceback mid-run
        return v
    _stats: dict[torch.nn.Module, Any] = PrivateAttr(default_factory=dict)

    # ------------------------------------------------------------- what a modifier provides
    def new_stats(self, module: torch.nn.Module) -> Any:
        """A fresh statistics accumulator (with ``update(input)``) for ``module``."""
        raise NotImplementedError

    def process_layer(self, module: torch.nn.Module, name: str, stats: Any) -> None:
        """Apply the method to one calibrated layer."""
        raise NotImplementedError

    # ------------------------------------------------------------- lifecycle
    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for module in self._layers:
            self.register_hook(module, self._calibrate, "forward")

    def _calibrate(self, module: torch.nn.Module, args: tuple, _output: torch.Tensor):
        stats = self._stats.get(module)
        if stats is None:
            stats = self._stats[module] = self.new_stats(module)
        stats.update(args[0])

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._process_calibrated()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._process_calibrated()

    def _process_calibrated(self) -> None:
        for module in list(self._stats):
            self.process_layer(module, self._layers[module], self._stats.pop(module))

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.remove_hooks()
        self._stats.clear()
        return True

    # ------------------------------------------------------------- the model
    @staticmethod
    def resolve_layers(model: torch.nn.Module, targets: str | list[str], ignore: list[str]) -> dict[str, torch.nn.Module]:
        """Linear / Conv1D layers matched by ``targets`` minus ``ignore``; a matched container
        (a decoder layer, an MLP) expands to its layers. In model order."""
        targets = [targets] if isinstance(targets, str) else list(targets)
        found: dict[str, torch.nn.Module] = {}
        for name, module in match_named_modules(model, targets, ignore):
            if _is_prunable(module):
                found[name] = module
                continue
            for sub, child in match_named_modules(module, list(PRUNABLE), None):
                full = f"{name}.{sub}" if sub else name
                if not match_targets(full, child, ignore):
                    found[full] = child
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        layers = dict(sorted(found.items(), key=lambda kv: order.get(kv[0], len(order))))
        _refuse_tied(model, layers)
        return layers

    @staticmethod
    def write_weight(module: torch.nn.Module, w_out_in: torch.Tensor) -> None:
        """Store an (out, in) weight in the module's own layout, offload-aware."""
        set_weight(module, w_out_in, assign=_offload_assign)

    @staticmethod
    def update_record(model: torch.nn.Module, update: Callable[[dict | None], dict]) -> None:
        """Replace the model's ``crepe_sparsity`` record by ``update(old)`` and make sure the
        save keeps it (llm-compressor rewrites config.json)."""
        cfg = getattr(model, "config", None)
        if cfg is None:
            return
        setattr(cfg, RECORD_KEY, update(getattr(cfg, RECORD_KEY, None)))
        keep_record_on_save(model)

    # ------------------------------------------------------------- the recipe around it
    @staticmethod
    def is_pruner(m: Any) -> bool:
        from .pruning import CRePEPruningModifier

        return isinstance(m, (CRePEPruningModifier, SparsityModifierBase))

    def _split_recipe(self) -> tuple[list, list]:
        """(modifiers before this one, modifiers after it) in the running recipe; both empty
        when this modifier is not part of one (applied by hand)."""
        mods = recipe_modifiers()
        idx = next((i for i, m in enumerate(mods) if m is self), None)
        return ([], []) if idx is None else (mods[:idx], mods[idx + 1 :])

    def modifiers_before(self) -> list:
        return self._split_recipe()[0]

    def modifiers_after(self) -> list:
        return self._split_recipe()[1]

    def pruners_before(self) -> list:
        return [m for m in self.modifiers_before() if self.is_pruner(m)]

    def pruners_after(self) -> list:
        return [m for m in self.modifiers_after() if self.is_pruner(m)]

    def refuse_pruning_twice(self, model: torch.nn.Module, names: list[str]) -> None:
        """A layer that an earlier pruner of the recipe prunes, or that the model's record already
        lists, would be pruned twice, and the record would describe the second pass only (2:4 then
        1:4 leaves a 1:4 record over weights at 50%): refuse it before calibration."""
        from ..core.errors import PruningError

        mine = set(names)
        for m in self.pruners_before():
            theirs = getattr(m, "_layers", None) or {}  # ours: the layers it prunes, set at its initialize
            theirs = set(theirs.values()) if theirs else set(self.resolve_layers(model, m.targets, list(m.ignore or [])))
            if mine & theirs:
                what = lambda x: f"{type(x).__name__} ({getattr(x, 'mask_structure', None) or 'unstructured'})"  # noqa: E731
                raise PruningError(
                    f"layer '{min(mine & theirs)}' would be pruned twice, by {what(m)} and then by {what(self)}; "
                    "give each layer one pruning modifier (add it to `ignore` in one of them)"
                )
        record = getattr(getattr(model, "config", None), RECORD_KEY, None)
        done = mine & set(record.get("modules", {})) if isinstance(record, dict) else set()
        if done:
            raise PruningError(
                f"layer '{min(done)}' is already pruned (the model's {RECORD_KEY} record lists it as "
                f"{record['modules'][min(done)].get('structure')}); prune the dense model, or `ignore` the layer"
            )
