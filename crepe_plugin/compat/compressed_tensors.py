"""compressed-tensors names the plugin uses (tested with 0.19.0 on the compression side)."""

from __future__ import annotations

import contextlib

import torch

from . import resolver

_DIST, _PIN = "compressed-tensors", "0.19.0"
_get = resolver(_DIST, _PIN)


# module matching, as llm-compressor's targets/ignore lists (``crepe_plugin.selection`` reads them with is_match)
is_match = _get("compressed_tensors.utils", "is_match")
match_named_modules = _get("compressed_tensors.utils", "match_named_modules")
getattr_chain = _get("compressed_tensors.utils", "getattr_chain")
# offload-aware weight access
align_module_device = _get("compressed_tensors.utils", "align_module_device")
get_execution_device = _get("compressed_tensors.utils", "get_execution_device")
update_offload_parameter = _get("compressed_tensors.utils", "update_offload_parameter")
disable_offloading = _get("compressed_tensors.offload", "disable_offloading")
# local reconstruction trains a decoder layer in place: its offloading is suspended meanwhile, as
# llm-compressor's AutoRoundModifier does (an offloaded module copies any tensor assigned to it)
_OffloadCache = _get("compressed_tensors.offload.cache.base", "OffloadCache")
_offload_module = _get("compressed_tensors.offload.module", "offload_module")
_remove_module_offload = _get("compressed_tensors.offload.module", "remove_module_offload")
_get_offloaded_device = _get("compressed_tensors.offload", "get_offloaded_device")
# quantization (mask-preserving GPTQ rounds each column with compressed-tensors' own arithmetic)
QuantizationStrategy = _get("compressed_tensors.quantization", "QuantizationStrategy")
fake_quantize = _get("compressed_tensors.quantization.lifecycle.forward", "fake_quantize")


@contextlib.contextmanager
def suspend_offloading(module: torch.nn.Module):
    """Within the context, ``module`` and its submodules hold plain, onloaded parameters (so that
    ``torch.func.functional_call`` and autograd see real tensors); their offloading is restored
    afterwards, with the values the parameters then hold."""
    info = {}
    for name, sub in module.named_modules():
        if isinstance(sub._parameters, _OffloadCache):
            info[name] = (get_execution_device(sub), _get_offloaded_device(sub))
            _remove_module_offload(sub, onload_tensors=True)
    try:
        yield
    finally:
        for name, sub in module.named_modules():
            if name in info:
                _offload_module(sub, *info[name])
