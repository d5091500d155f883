"""The ``vllm.general_plugins`` entry point: registers the ``crepe_sparse`` quantization config.

vLLM calls ``register`` in every process it starts (front end, engine core, workers), and may
call it more than once in one process; only the first call in a process does anything.
Loading it never imports llm-compressor, and leaves checkpoints without our record to vLLM.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from ..compat.vllm import QUANTIZATION_METHODS, register_quantization_config
    from .quant import NAME, CRePESparseConfig

    if NAME not in QUANTIZATION_METHODS or _registered_class() is not CRePESparseConfig:
        register_quantization_config(NAME)(CRePESparseConfig)
    _registered = True


def _registered_class():
    from ..compat.vllm import get_quantization_config

    try:
        return get_quantization_config("crepe_sparse")
    except ValueError:
        return None
