"""vLLM glue for the 2:4 sparse path: the ``crepe_sparse`` quantization config.

vLLM serves our checkpoints as dense models without this. With the plugin loaded
(``crepe_plugin.vllm.plugin``, a ``vllm.general_plugins`` entry point), this config:

* claims checkpoints whose config.json carries our N:M record with 2:4 modules:
  - quantized ones (a compressed-tensors ``quantization_config``) automatically, through
    ``override_quantization_method``;
  - pruned-only ones (no ``quantization_config``) when the user passes
    ``quantization="crepe_sparse"``: vLLM asks override hooks only when a checkpoint has a
    quantization config, and our checkpoints must stay loadable by a vLLM without the plugin.
* gives every targeted, unquantized Linear ``CRePESparseLinearMethod``: at load time the weight
  (this rank's shard under tensor parallelism) is checked to be exactly 2:4 on every device
  (``layer.crepe_shard_2of4``) and compressed for cuSPARSELt (``crepe_plugin.vllm.sparse``);
  anywhere that cannot run (CPU, GPUs older than sm80, dtypes or shapes the kernel does not
  take, a weight that is not 2:4) it stays on vLLM's dense kernel and one line says why.
* under tensor parallelism, leaves unclaimed a row-parallel layer whose input split does not fall
  on a multiple of 4 (``sparse.tp_shard_reason``): its shards cannot be 2:4; one line says so.
* hands every other layer, and every quantized one, to compressed-tensors (or to vLLM's
  unquantized path) exactly as vLLM would without the plugin.

Never imports llm-compressor.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compat.vllm import (
    LinearBase,
    QuantizationConfig,
    UnquantizedLinearMethod,
    compressed_tensors_config,
    get_current_vllm_config_or_none,
    init_logger,
)

from ..checkpoint.record import RECORD_KEY
from ..core.masks import is_nm
from .sparse import apply_layer, prepare_layer, tp_shard_reason

logger = init_logger("vllm.plugins.crepe_sparse")  # under "vllm": its handlers print it

NAME = "crepe_sparse"
SPARSE_STRUCTURE = "2:4"  # the only N:M pattern sparse tensor cores run

__all__ = ["NAME", "CRePESparseConfig", "CRePESparseLinearMethod", "sparse_modules", "claimed_shards"]


def sparse_modules(record: Any) -> set[str]:
    """Names of the modules a record says are 2:4 (empty for no record or no 2:4 module)."""
    if not isinstance(record, dict):
        return set()
    return {name for name, m in (record.get("modules") or {}).items() if m.get("structure") == SPARSE_STRUCTURE}


def _hf_record(hf_config: Any) -> Any:
    """transformers keeps unknown config.json keys as config attributes."""
    return getattr(hf_config, RECORD_KEY, None)


def _current_record() -> Any:
    cfg = get_current_vllm_config_or_none()
    return _hf_record(cfg.model_config.hf_config) if cfg is not None and cfg.model_config is not None else None


class CRePESparseLinearMethod(UnquantizedLinearMethod):
    """An unquantized Linear whose stored weight is 2:4: cuSPARSELt where it can run, else
    vLLM's own unquantized kernel (the same result as without the plugin)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        reason = prepare_layer(layer)
        # where the sparse kernel cannot run, prepare_layer may return before looking at the weight
        # (left as loaded): check this layer's (this rank's shard's) pattern, so every device says the same
        layer.crepe_shard_2of4 = reason is None or ("not 2:4" not in reason and is_nm(layer.weight.data, 2, 4))
        if reason is None:
            logger.info_once(f"{NAME}: 2:4 layers run on cuSPARSELt ({layer.weight.device}, weights compressed at load)")
            return
        if not layer.crepe_shard_2of4:  # the record promised 2:4
            logger.warning(f"{NAME}: {self.prefix}: {reason if 'not 2:4' in reason else 'weight is not 2:4 in stored order (dense kernel)'}")
        else:  # the reason once, then one line per layer, so a user sees which layers the plugin claimed
            logger.info_once(f"{NAME}: 2:4 layers fall back to the dense path: {reason}")
            logger.info(f"{NAME}: 2:4 layer {self.prefix} on the dense path")
        super().process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if getattr(layer, "crepe_sparse", False):
            return apply_layer(layer, x, bias)
        return super().apply(layer, x, bias)


class CRePESparseConfig(QuantizationConfig):
    """``inner``: the checkpoint's compressed-tensors config, or None for a pruned-only model."""

    def __init__(self, inner: QuantizationConfig | None = None, record: dict | None = None) -> None:
        super().__init__()
        self.inner = inner
        self._record = record

    # --- what vLLM asks of every quantization config -------------------------------------
    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return self.inner.get_supported_act_dtypes() if self.inner else [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # CPU and any GPU: the sparse path checks sm80+ itself and falls back below

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # pruned-only: the record is read from the model config, no extra file

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> CRePESparseConfig:
        method = config.get("quant_method")
        if method != "compressed-tensors":
            raise ValueError(f"{NAME}: cannot stack 2:4 on a {method!r} quantization_config (compressed-tensors only)")
        return cls(inner=compressed_tensors_config().from_config(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        if user_quant not in (None, NAME) or hf_quant_cfg.get("quant_method") != "compressed-tensors":
            return None
        return NAME if sparse_modules(_hf_record(hf_config)) else None

    # --- delegation to compressed-tensors -------------------------------------------------
    @property
    def packed_modules_mapping(self) -> dict[str, list[str]]:
        return self._packed

    @packed_modules_mapping.setter
    def packed_modules_mapping(self, value: dict[str, list[str]]) -> None:
        self._packed = value
        if getattr(self, "inner", None) is not None:
            self.inner.packed_modules_mapping = value

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        if self.inner is not None:
            self.inner.apply_vllm_mapper(hf_to_vllm_mapper)

    def maybe_update_config(self, *args, **kwargs) -> None:
        if self.inner is not None:
            self.inner.maybe_update_config(*args, **kwargs)

    def __getattr__(self, name: str):  # anything else vLLM asks of compressed-tensors
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)

    # --- the layers --------------------------------------------------------------------------
    @property
    def record(self) -> dict:
        if self._record is None:
            self._record = _current_record()
            if not sparse_modules(self._record):
                raise ValueError(
                    f"{NAME}: this checkpoint's config.json has no '{RECORD_KEY}' record with 2:4 modules; "
                    "it was not written by crepe-plugin (or not pruned 2:4). Serve it without quantization='crepe_sparse'."
                )
        return self._record

    def _is_sparse(self, prefix: str) -> bool:
        """A vLLM layer is 2:4 if the record lists it, or every checkpoint module fused into it."""
        parent, _, last = prefix.rpartition(".")
        shards = self._packed.get(last, [last]) if self._packed else [last]
        names = {f"{parent}.{s}" if parent else s for s in shards}
        return names <= sparse_modules(self.record)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            if hasattr(layer, "moe_config") or "MoE" in type(layer).__name__:  # vLLM's fused experts (RoutedExperts)
                logger.info_once(f"{NAME}: fused-MoE expert layers stay on vLLM's own MoE kernels "
                                 "(their 2:4 weights are served as stored; only Linear layers take the sparse path)")  # fmt: skip
            return self.inner.get_quant_method(layer, prefix) if self.inner else None
        method = self.inner.get_quant_method(layer, prefix) if self.inner else UnquantizedLinearMethod()
        if not self._is_sparse(prefix):
            return method
        split = tp_shard_reason(layer.input_size, getattr(layer, "input_size_per_partition", layer.input_size))
        if split is not None:  # tensor parallelism cut the 2:4 groups: the shards are not 2:4
            logger.warning(f"{NAME}: 2:4 layer {prefix} left to the dense path: {split}")
            return method
        if type(method) is UnquantizedLinearMethod:
            return CRePESparseLinearMethod(prefix)
        logger.info_once(
            f"{NAME}: quantized 2:4 layers run compressed-tensors' dense quantized kernels "
            "(the sparse FP8/INT8 kernels are not wired into its schemes yet)"
        )
        return method


def claimed_shards(model) -> list[dict]:
    """In a vLLM worker: each Linear the crepe_sparse plugin claimed, with this rank's shard
    shape and whether the shard is 2:4 (checked at load), and each Linear it left alone."""
    out = []
    for name, m in model.named_modules():
        qm = getattr(m, "quant_method", None)
        if qm is None or not hasattr(m, "input_size"):
            continue
        out.append({"layer": name, "claimed": isinstance(qm, CRePESparseLinearMethod), "tp_rank": getattr(m, "tp_rank", 0),
                    "inputs": int(getattr(m, "input_size_per_partition", m.input_size)), "input_size": int(m.input_size),
                    "shard_2of4": getattr(m, "crepe_shard_2of4", None)})  # fmt: skip
    return out
