"""compressed-tensors names the plugin uses (tested with 0.19.0 on the compression side)."""

from __future__ import annotations

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
# quantization (mask-preserving GPTQ rounds each column with compressed-tensors' own arithmetic)
QuantizationStrategy = _get("compressed_tensors.quantization", "QuantizationStrategy")
fake_quantize = _get("compressed_tensors.quantization.lifecycle.forward", "fake_quantize")
