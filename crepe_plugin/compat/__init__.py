"""The one seam between crepe-plugin and its hosts' internals.

Every name the plugin takes from llm-compressor, compressed-tensors, vLLM or torch beyond their
documented entry points (``oneshot``, ``Recipe``, ``vllm.LLM``) is resolved here, once, by the
module for its host:

- ``compat.llmcompressor``: modifier base and lifecycle types, the active recipe, sequential
  targets, GPTQ's per-module state and helpers, the save wrapper's flag, the factory;
- ``compat.compressed_tensors``: module matching, offload-aware weight access, fake quantization;
- ``compat.vllm``: quantization-config registry, linear-method base classes, current config;
- ``compat.torch``: cuSPARSELt's private ops (``torch._cslt_*``).

A name that has moved raises ``UpstreamError`` naming the installed version of its package, at
import time of the host module (never a silent fallback). ``tests/test_compat.py`` (and
``tests/serve/test_compat_vllm.py``) resolve every one against the pinned versions.
"""

from __future__ import annotations

import importlib
import importlib.metadata

__all__ = ["UpstreamError", "installed_version", "resolve", "resolver"]


class UpstreamError(ImportError):
    """An upstream name the plugin relies on is missing from the installed version."""


def installed_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def resolve(dist: str, module: str, attr: str | None = None, pinned: str = ""):
    """``module.attr`` (or the module), or an UpstreamError naming ``dist``'s installed version."""
    try:
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    except (ImportError, AttributeError) as e:
        where = f"{module}.{attr}" if attr else module
        raise UpstreamError(
            f"crepe-plugin needs {where} from {dist}, which the installed {dist} {installed_version(dist)} "
            f"does not provide ({type(e).__name__}: {e}); crepe-plugin is tested with {dist} {pinned or 'as pinned'}"
        ) from e


def resolver(dist: str, pinned: str):
    """``resolve`` bound to one host package: ``get(module, attr)``."""
    return lambda module, attr: resolve(dist, module, attr, pinned)
