"""Weight layout helpers shared by the modifiers. torch only."""

from __future__ import annotations

import torch

__all__ = ["is_conv1d", "weight_out_in"]


def is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style) stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_out_in(module: torch.nn.Module) -> torch.Tensor:
    """The module's weight laid out (out, in), a view where possible."""
    w = module.weight
    return w.t() if is_conv1d(module) else w
