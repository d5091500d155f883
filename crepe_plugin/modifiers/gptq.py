"""MaskedGPTQModifier: GPTQ that keeps pruned weights exactly zero.

llm-compressor 0.14's GPTQModifier knows nothing of masks: its error compensation fills
pruned positions back in, and a 2:4 model comes out dense. This subclass keeps GPTQ's
calibration, observers and qparams, and replaces only the per-module update with the
plugin's single fixed-mask compensation (``crepe_plugin.core.compensate_fixed_mask``),
quantizing each kept column with llm-compressor's own ``fake_quantize``.

The mask is the set of zero weights when the module is quantized (the pruning modifier
placed before it in the recipe has already run on that layer).
"""

from __future__ import annotations

from copy import copy

import torch
from loguru import logger
from pydantic import field_validator

from ..compat.compressed_tensors import QuantizationStrategy, disable_offloading, fake_quantize, getattr_chain
from ..compat.llmcompressor import (
    GPTQModifier,
    column_scale_window,
    gptq_count_compressed,
    gptq_module_state,
    prepare_batch,
    update_batch_qparams,
)
from ..core import compensate_fixed_mask

__all__ = ["MaskedGPTQModifier"]


class MaskedGPTQModifier(GPTQModifier):
    """GPTQ for pruned models: pruned (zero) weights stay zero, and GPTQ's error
    compensation respects the mask. Same fields as GPTQModifier; activation ordering is
    not supported (columns are processed in stored order so N:M groups stay aligned).

    ```yaml
    quant_stage:
      quant_modifiers:
        MaskedGPTQModifier:
          scheme: W4A16
          targets: ["Linear"]
          ignore: ["lm_head"]
    ```
    """

    actorder: None = None

    @field_validator("actorder", mode="before")
    @classmethod
    def _no_actorder(cls, v):
        if v not in (None, "none", False):
            raise ValueError("MaskedGPTQModifier does not support actorder; leave it unset")
        return None

    def compress_module_list(self, module_list):
        for module in module_list:
            name, hessians, num_samples = gptq_module_state(self, module)
            quant_args = getattr_chain(module, "quantization_scheme.weights")
            if quant_args.actorder not in (None, "none"):
                raise ValueError(f"layer '{name}': MaskedGPTQModifier does not support actorder")
            qparams = module.weight_observer.get_qparams()
            with torch.no_grad(), disable_offloading():
                W, H, scales, zps, gscales = prepare_batch([module], [qparams], hessians, num_samples)
                rows, cols = W.shape[1:]
                g_idx = None
                if quant_args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
                    g_idx = (torch.arange(cols, device=W.device) // quant_args.group_size).unsqueeze(0)
                elif quant_args.strategy == QuantizationStrategy.BLOCK:
                    g_idx = (torch.arange(cols, device=W.device) // quant_args.block_structure[1]).unsqueeze(0)
                eff, zp = column_scale_window(scales, zps, gscales, g_idx, quant_args, num_rows=rows, i1=0, i2=cols)
                eff = eff.expand(1, rows, cols)[0]
                zp = None if zp is None else zp.expand(1, rows, cols)[0]
                chan_args = copy(quant_args)
                chan_args.strategy = QuantizationStrategy.CHANNEL

                def quantize(col: torch.Tensor, i: int) -> torch.Tensor:
                    z = None if zp is None else zp[:, i : i + 1]
                    return fake_quantize(col.unsqueeze(1), eff[:, i : i + 1], z, chan_args).squeeze(1)

                w = W[0]
                mask = w == 0
                q = compensate_fixed_mask(
                    w, H[0], mask, self.dampening_frac or 0.01, self.block_size, quantize=quantize, layer_name=name
                )
                update_batch_qparams([module], q.unsqueeze(0), scales, zps, gscales, quant_args)
            logger.info(f"{name}: mask-preserving GPTQ, {int(mask.sum())} pruned weights kept at zero")
            gptq_count_compressed(self)
