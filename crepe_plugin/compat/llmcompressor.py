"""llm-compressor names the plugin uses (tested with llmcompressor 0.14.0.1).

Beyond plain imports, the internals the plugin leans on are wrapped in small functions here:
the active recipe's modifiers, the sequential targets, GPTQ's per-module state, the flag that
stops llm-compressor from wrapping ``save_pretrained`` a second time, and recipe creation (an
unknown modifier recognised by its error text, with the factory's registered names).
"""

from __future__ import annotations

from typing import Any

import torch

from . import UpstreamError, installed_version, resolver

_DIST, _PIN = "llmcompressor", "0.14.0.1"
_get = resolver(_DIST, _PIN)


Recipe = _get("llmcompressor.recipe", "Recipe")
Modifier = _get("llmcompressor.modifiers", "Modifier")
ModifierFactory = _get("llmcompressor.modifiers", "ModifierFactory")
Event = _get("llmcompressor.core", "Event")
State = _get("llmcompressor.core", "State")
GPTQModifier = _get("llmcompressor.modifiers.gptq", "GPTQModifier")
QuantizationMixin = _get("llmcompressor.modifiers.quantization", "QuantizationMixin")
SparseGPTModifier = _get("llmcompressor.modifiers.pruning.sparsegpt", "SparseGPTModifier")
SparsityModifierBase = _get("llmcompressor.modifiers.pruning.sparsegpt.sgpt_base", "SparsityModifierBase")
_active_session = _get("llmcompressor.core", "active_session")
_infer_sequential_targets = _get("llmcompressor.utils.pytorch.module", "infer_sequential_targets")
# the switch that silences every modifier's calibration hooks (the pipeline's propagation pass uses it)
HooksMixin = _get("llmcompressor.modifiers.utils.hooks", "HooksMixin")
# MoE: llm-compressor linearizes fused experts for calibration; repacking restores the fused module
_get_linearized_moes = _get("llmcompressor.modeling.moe.linearize", "get_linearized_moes")
_repack_moe = _get("llmcompressor.modeling.moe.linearize", "repack_moe")
# GPTQ's per-module helpers (MaskedGPTQModifier replaces only its update step)
column_scale_window = _get("llmcompressor.modifiers.gptq.helpers", "column_scale_window")
prepare_batch = _get("llmcompressor.modifiers.gptq.helpers", "prepare_batch")
update_batch_qparams = _get("llmcompressor.modifiers.gptq.helpers", "update_batch_qparams")


def _missing(what: str, e: Exception) -> UpstreamError:
    return UpstreamError(
        f"crepe-plugin needs {what} from llmcompressor, which the installed llmcompressor "
        f"{installed_version(_DIST)} does not provide ({type(e).__name__}: {e}); tested with {_PIN}"
    )


class UnknownModifierError(ValueError):
    """A recipe names a modifier llm-compressor does not know; ``registered``: the names it does."""

    def __init__(self, message: str, registered: list[str]):
        super().__init__(message)
        self.message, self.registered = message, registered


def create_recipe(recipe: Any) -> Any:
    """``Recipe.create_instance(recipe)``; an unknown modifier name raises UnknownModifierError
    (recognised by llm-compressor 0.14's message text) with the registered modifier names
    (``ModifierFactory._registered_registry``)."""
    try:
        return Recipe.create_instance(recipe)
    except ValueError as e:
        msg = " ".join(str(e).split())
        if "No modifier" in msg or "not found" in msg.lower() or "registered" in msg.lower():
            try:
                names = sorted(ModifierFactory._registered_registry)
            except AttributeError as missing:
                raise _missing("ModifierFactory._registered_registry", missing) from missing
            raise UnknownModifierError(msg, names) from None
        raise


def recipe_modifiers() -> list:
    """The modifiers of the recipe oneshot is running, in order. Raises (never returns an empty
    list) when llm-compressor no longer keeps the recipe where 0.14 does, so the recipe-order
    guards cannot silently switch off."""
    try:
        return list(_active_session().lifecycle.recipe.modifiers)
    except AttributeError as e:
        raise _missing("active_session().lifecycle.recipe.modifiers", e) from e


def sequential_layer_targets(model: torch.nn.Module, sequential_targets: Any) -> Any:
    """llm-compressor's decoder-layer class names for ``model`` (its sequential pipeline's unit)."""
    return _infer_sequential_targets(model, sequential_targets=sequential_targets)


def gptq_module_state(gptq: Any, module: torch.nn.Module) -> tuple[str, Any, Any]:
    """(layer name, Hessians, sample counts) that GPTQModifier accumulated for ``module``."""
    try:
        return gptq._module_names[module], gptq._hessians, gptq._num_samples
    except AttributeError as e:
        raise _missing("GPTQModifier's _module_names/_hessians/_num_samples", e) from e


def gptq_count_compressed(gptq: Any) -> None:
    try:
        gptq._num_compressed_modules += 1
    except AttributeError as e:
        raise _missing("GPTQModifier._num_compressed_modules", e) from e


def mark_save_wrapped(fn) -> None:
    """llm-compressor wraps ``model.save_pretrained`` unless the function carries ``_overridden``."""
    fn._overridden = True


def repack_experts(model: torch.nn.Module) -> list[str]:
    """Pack llm-compressor's linearized experts back into the model's fused experts modules (so
    ``save_pretrained`` writes the architecture's own checkpoint layout); the names repacked."""
    names = [name for name, _ in _get_linearized_moes(model)]
    if names:
        _repack_moe(model)
    return names


def disable_hooks():
    """A context in which no modifier's calibration hooks run (``HooksMixin.disable_hooks``), for
    forward passes a modifier runs itself at the end of a sequential epoch."""
    return HooksMixin.disable_hooks()
