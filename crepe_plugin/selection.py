"""Which layers a method touches: the one layer predicate, used by every modifier and by PHO.

In the spirit of torchao's ``sparsify_(model, config, filter_fn)``: ``layer_filter(model, targets,
ignore)`` returns ``filter_fn(module, fqn) -> bool``, True for a Linear / Conv1D that ``ignore``
does not match and that ``targets`` matches, itself or through a container it sits in (a decoder
layer, an MLP). ``select_layers`` applies it to a model, in model order.

``targets`` and ``ignore`` entries read as llm-compressor reads them (compressed-tensors'
``is_match``): a module's exact name, ``re:`` and a regular expression (``re.match``), or a class
name anywhere in the module's class hierarchy. A sparsity-map key is a one-entry ``targets``.

``DEFAULT_IGNORE`` is what stays dense unless a recipe says otherwise: the output head, a
mixture-of-experts router (``gate``, ``router``, ``shared_expert_gate``; a Linear in some
architectures), and a vision-language model's vision tower and projector.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from .compat.compressed_tensors import is_match

__all__ = ["PRUNABLE", "DEFAULT_IGNORE", "FilterFn", "layer_filter", "select_layers"]

PRUNABLE = ("Linear", "Conv1D")
DEFAULT_IGNORE = (
    "re:.*lm_head",
    r"re:(.*\.)?(gate|router|shared_expert_gate)(\..*)?$",
    # LLaVA, Qwen2/2.5-VL, Gemma 3, Idefics/SmolVLM naming
    r"re:(.*\.)?(vision_tower|vision_model|visual|multi_modal_projector|mm_projector|embed_vision|connector)(\..*)?$",
)

FilterFn = Callable[[torch.nn.Module, str], bool]


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or ())


def layer_filter(model: torch.nn.Module, targets: str | Iterable[str] = PRUNABLE,
                 ignore: str | Iterable[str] | None = DEFAULT_IGNORE) -> FilterFn:  # fmt: skip
    """``filter_fn(module, fqn)`` for the layers of ``model`` that ``targets`` selects minus ``ignore``."""
    targets, ignore = _as_list(targets), _as_list(ignore)
    # containers a target selects (and ignore does not): every Linear / Conv1D inside them is selected
    inside = [fqn for fqn, mod in model.named_modules() if not is_match(fqn, mod, PRUNABLE) and is_match(fqn, mod, targets, ignore)]
    everything = "" in inside
    prefixes = tuple(f"{fqn}." for fqn in inside if fqn)

    def filter_fn(module: torch.nn.Module, fqn: str) -> bool:
        return is_match(fqn, module, PRUNABLE, ignore) and (
            everything or fqn.startswith(prefixes) or is_match(fqn, module, targets)
        )

    return filter_fn


def select_layers(model: torch.nn.Module, targets: str | Iterable[str] = PRUNABLE,
                  ignore: str | Iterable[str] | None = DEFAULT_IGNORE) -> dict[str, torch.nn.Module]:  # fmt: skip
    """{fqn: module} of the layers ``layer_filter`` selects, in model order."""
    keep = layer_filter(model, targets, ignore)
    return {fqn: module for fqn, module in model.named_modules() if keep(module, fqn)}
