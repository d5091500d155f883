"""Weight layout helpers shared by the modifiers. torch only."""

from __future__ import annotations

import re

import torch

__all__ = ["is_conv1d", "weight_out_in", "to_stored_layout", "from_stored_layout", "set_weight", "decoder_layer",
           "check_name_patterns"]


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style) stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight laid out (out, in), a view where possible."""
    w = module.weight
    return w.t() if is_conv1d(module) else w


def to_stored_layout(module: torch.nn.Module, w_out_in: torch.Tensor) -> torch.Tensor:
    """An (out, in) weight in the layout ``module`` stores: transposed exactly when the module
    is a Conv1D (never by comparing shapes, which cannot tell a square Conv1D apart)."""
    return w_out_in.t() if is_conv1d(module) else w_out_in


def from_stored_layout(module: torch.nn.Module, stored: torch.Tensor) -> torch.Tensor:
    """A weight read in ``module``'s stored layout (e.g. from its checkpoint), as (out, in)."""
    return stored.t() if is_conv1d(module) else stored


def set_weight(module: torch.nn.Module, w_out_in: torch.Tensor, assign=None) -> None:
    """Write an (out, in) weight back into ``module`` in its stored layout (the pair of
    ``weight_out_in``). ``assign(module, tensor)`` stores it (the modifiers pass an
    offload-aware setter); by default the parameter's data is replaced."""
    stored = to_stored_layout(module, w_out_in).contiguous()
    if assign is None:
        module.weight.data = stored
    else:
        assign(module, stored)


_DECODER_LAYER = re.compile(r"^(.*?(?:^|\.)layers\.(\d+))\.")


def decoder_layer(module_name: str) -> tuple[str, int] | None:
    """(decoder layer prefix, its index) for a module inside one (``model.layers.3.mlp.up_proj``
    -> ``("model.layers.3", 3)``), or None. The one definition of "which decoder layer"."""
    m = _DECODER_LAYER.match(module_name)
    return (m.group(1), int(m.group(2))) if m else None


def check_name_patterns(entries, where: str) -> None:
    """Refuse a 're:' entry of a targets / ignore list (or a sparsity-map key) that is not a valid
    regular expression, naming the field and the entry; a name entry passes as it is."""
    from .errors import PruningError

    for i, entry in enumerate([entries] if isinstance(entries, str) else list(entries or [])):
        if isinstance(entry, str) and entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as e:
                raise PruningError(f"{where}[{i}]: {entry!r} is not a valid regular expression ({e})") from None
