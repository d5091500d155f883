"""2:4 sparse Linear through cuSPARSELt (``torch._cslt_compress`` / ``torch._cslt_sparse_mm``).

Torch only: no vLLM, no llm-compressor. The vLLM adapter (``crepe_plugin.vllm.quant``) calls
``fallback_reason`` once per layer at load time, ``compress`` on the layers that pass, and
``sparse_linear`` / ``sparse_linear_quant`` in the forward.

The matmul is registered as a torch custom op (``crepe::cslt_linear``) with a fake
implementation, so torch.compile (and vLLM's compilation) treats it as one opaque node and
CUDA graphs capture it like any other kernel.

Layout: a Linear computes ``y = x W^T``. cuSPARSELt takes the sparse operand first, so we
compute ``(W x^T)^T``: ``W`` (out x in, 2:4 along ``in``) is compressed once, ``x^T`` is a
column-major view of the row-major activations (no copy), and ``transpose_result`` hands back
``y`` row-major. The token count is padded to the kernel's minimum multiple.
"""

from __future__ import annotations

import torch
from loguru import logger

from ..compat.torch import cslt_compress, cslt_sparse_mm, cslt_sparse_mm_search
from ..core.masks import is_nm

__all__ = [
    "SPARSE_DTYPES",
    "fallback_reason",
    "tp_shard_reason",
    "compress",
    "sparse_linear",
    "search_algs",
    "quantize_per_token",
    "sparse_linear_quant",
    "prepare_layer",
    "apply_layer",
    "dispatcher",
]

# cuSPARSELt operand dtypes and, per dtype, (rows multiple, cols multiple) of the sparse weight
# and the multiple the dense operand's token count is padded to (torch/sparse/semi_structured.py).
SPARSE_DTYPES: dict[torch.dtype, tuple[int, int, int]] = {
    torch.float16: (16, 16, 8),
    torch.bfloat16: (16, 16, 8),
    torch.int8: (32, 32, 16),
    torch.float8_e4m3fn: (32, 32, 16),
}


def fallback_reason(weight: torch.Tensor) -> str | None:
    """Why this weight cannot run on the 2:4 sparse kernel, or None if it can.

    The reasons are short and stable: the vLLM adapter logs each distinct one once.
    """
    dev = weight.device
    if dev.type != "cuda":
        return f"{dev.type.upper()}: no 2:4 sparse tensor cores (dense kernel)"
    if torch.version.hip is not None:
        return "ROCm: cuSPARSELt is CUDA only (dense kernel)"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 8:
        return f"sm{major}{minor} GPU: 2:4 sparse tensor cores need sm80+ (dense kernel)"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt (dense kernel)"
    if weight.dtype not in SPARSE_DTYPES:
        return f"dtype {str(weight.dtype).replace('torch.', '')}: cuSPARSELt takes fp16, bf16, int8, fp8 (dense kernel)"
    if weight.dtype == torch.float8_e4m3fn and (major, minor) < (8, 9):
        return f"fp8 on sm{major}{minor}: cuSPARSELt fp8 needs sm89+ (dense kernel)"
    if weight.dim() != 2:
        return f"{weight.dim()}-D weight (dense kernel)"
    rows, cols, _ = SPARSE_DTYPES[weight.dtype]
    if weight.shape[0] % rows or weight.shape[1] % cols:
        return f"shape {tuple(weight.shape)} not a multiple of ({rows}, {cols}) (dense kernel)"
    w = weight if weight.dtype != torch.float8_e4m3fn else weight.to(torch.float16)
    if not is_nm(w, 2, 4):
        return "weight is not 2:4 in stored order (dense kernel)"
    return None


def tp_shard_reason(input_size: int, input_size_per_partition: int, m: int = 4) -> str | None:
    """Why the tensor-parallel shards of an N:M (2:4) weight are not N:M themselves, or None.

    vLLM's column-parallel layers (q/k/v, gate/up) split the outputs: every shard keeps whole rows,
    so the N:M groups along the inputs are intact. Row-parallel layers (o, down) split the inputs
    into equal slices of ``input_size_per_partition`` = input_size / tp_size; rank r holds inputs
    [r w, (r + 1) w). Each slice holds whole groups of M consecutive inputs exactly when w is a
    multiple of M. Otherwise a group straddles two ranks and neither shard is N:M in its own
    grouping: such a layer must stay on the dense path (it computes the same product either way).
    """
    if input_size_per_partition >= input_size or input_size_per_partition % m == 0:
        return None
    return (f"tensor-parallel shards of {input_size_per_partition} of its {input_size} inputs are not a multiple "
            f"of {m}, so groups of {m} straddle two ranks and no shard is 2:4 (dense kernel)")  # fmt: skip


def compress(weight: torch.Tensor) -> torch.Tensor:
    """The cuSPARSELt-compressed form of a 2:4 weight (out x in). Call fallback_reason first:
    cuSPARSELt silently drops values from a weight that is not 2:4."""
    return cslt_compress(weight.contiguous())


def _pad_tokens(x2: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x2.shape[0]) % multiple
    return torch.nn.functional.pad(x2, (0, 0, 0, pad)) if pad else x2


# cuSPARSELt's best algorithm depends on the token count: one is searched per bucket at load time
SEARCH_TOKENS = (16, 256, 4096)
_BUCKET_LIMITS = (64, 1024)  # tokens <= 64 -> searched at 16, <= 1024 -> at 256, else at 4096
_alg_cache: dict[tuple, list[int]] = {}


def _bucket(tokens: int) -> int:
    return sum(tokens > lim for lim in _BUCKET_LIMITS)


def _mm_search(packed: torch.Tensor, dense_t: torch.Tensor, out_dtype: torch.dtype | None) -> int:
    return cslt_sparse_mm_search(packed, dense_t, out_dtype=out_dtype, transpose_result=True)


def search_algs(packed: torch.Tensor, in_features: int, dtype: torch.dtype, out_dtype: torch.dtype | None = None) -> list[int]:
    """cuSPARSELt algorithm ids, one per token bucket, found by its own search; cached by shape.
    Falls back to the default algorithm (0) where the search is unavailable."""
    key = (tuple(packed.shape), in_features, dtype, out_dtype, packed.device)
    if key not in _alg_cache:
        multiple = SPARSE_DTYPES[dtype][2]
        algs = []
        for t in SEARCH_TOKENS:
            x = torch.randn(t + (-t) % multiple, in_features, device=packed.device).to(dtype)
            try:
                algs.append(_mm_search(packed, x.t(), out_dtype))
            except Exception as e:  # noqa: BLE001 - any failure of the search leaves the default
                logger.warning(f"cuSPARSELt algorithm search failed for {tuple(packed.shape)} at {t} tokens ({e}); default algorithm")
                algs.append(0)
        _alg_cache[key] = algs
    return list(_alg_cache[key])


@torch.library.custom_op("crepe::cslt_linear", mutates_args=())
def _cslt_linear(
    x2: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    out_dtype: torch.dtype | None,
    multiple: int,
    algs: list[int],
) -> torch.Tensor:
    tokens = x2.shape[0]
    xp = _pad_tokens(x2, multiple)
    alg_id = algs[_bucket(tokens)] if algs else 0
    y = cslt_sparse_mm(
        packed, xp.t(), bias=bias, out_dtype=out_dtype, transpose_result=True, alg_id=alg_id
    )
    return y[:tokens] if y.shape[0] != tokens else y


@_cslt_linear.register_fake
def _(x2, packed, bias, out_features, out_dtype, multiple, algs):
    return x2.new_empty((x2.shape[0], out_features), dtype=out_dtype or x2.dtype)


def sparse_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
    algs: list[int] | None = None,
) -> torch.Tensor:
    """``x @ W^T + bias`` with W compressed by ``compress`` (fp16 / bf16). x: (..., in)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    multiple = SPARSE_DTYPES[x.dtype][2]
    y = _cslt_linear(x2.contiguous(), packed, bias, out_features, None, multiple, algs or [])
    return y.reshape(*lead, out_features)


def quantize_per_token(x2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-token quantization to fp8 e4m3 or int8: (q, scale (tokens, 1) fp32)."""
    qmax = torch.finfo(dtype).max if dtype.is_floating_point else torch.iinfo(dtype).max
    amax = x2.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale = amax / qmax
    q = x2.float() / scale
    q = q.clamp(-qmax, qmax).to(dtype) if dtype.is_floating_point else q.round().clamp(-qmax, qmax).to(dtype)
    return q, scale


def sparse_linear_quant(
    x: torch.Tensor,
    packed_q: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    qdtype: torch.dtype,
    bias: torch.Tensor | None = None,
    algs: list[int] | None = None,
) -> torch.Tensor:
    """W8A8 (fp8 e4m3 or int8) 2:4 linear: per-output-channel weight scale, dynamic per-token
    activation scale, output in x's dtype. ``packed_q`` is ``compress`` of the quantized weight.

    cuSPARSELt has no operand scales and rejects a per-row alpha vector for 8-bit inputs on
    sm90 (measured), so both scales are applied to the output: int8 accumulates to int32 (exact),
    fp8 to fp32 and is written as bf16.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    q, x_scale = quantize_per_token(x2, qdtype)
    acc_dtype = torch.int32 if qdtype == torch.int8 else torch.bfloat16
    y = _cslt_linear(q, packed_q, None, out_features, acc_dtype, SPARSE_DTYPES[qdtype][2], algs or [])
    y = (y.float() * x_scale * weight_scale.reshape(1, -1).float()).to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, out_features)


def prepare_layer(layer: torch.nn.Module) -> str | None:
    """Load-time step of the sparse path for any module with a 2-D ``weight`` (out x in).

    If the weight can run on cuSPARSELt, replace it by its compressed form (the dense copy is
    freed) and mark the layer; otherwise leave it untouched and return the reason.
    """
    weight = layer.weight.data
    reason = fallback_reason(weight)
    if reason is not None:
        layer.crepe_sparse = False
        return reason
    out_f, in_f = (int(x) for x in weight.shape)
    packed = compress(weight)
    algs = search_algs(packed, in_f, weight.dtype)
    decision = None
    disp = dispatcher()
    if disp is not None:  # time both paths per token bucket (once per shape); keep what wins
        def probe(t):
            return torch.randn(t + (-t) % SPARSE_DTYPES[weight.dtype][2], in_f, device=weight.device).to(weight.dtype)

        decision = disp.decision(
            (out_f, in_f, weight.dtype),
            lambda t: (lambda x=probe(t): sparse_linear(x, packed, out_f, None, algs)),
            lambda t: (lambda x=probe(t): torch.nn.functional.linear(x, weight)),
        )
        if not decision.any_sparse:
            layer.crepe_sparse = False
            return "dense is as fast or faster at every token count measured (dispatch; dense kernel)"
    layer.crepe_out_features = out_f
    layer.crepe_algs = algs
    layer.crepe_decision = decision
    # the dense weight stays only where some token counts run dense
    layer.crepe_dense_weight = None if decision is None or decision.all_sparse else weight
    layer.weight = torch.nn.Parameter(packed, requires_grad=False)
    layer.crepe_sparse = True
    return None


_DISPATCHER = None


def dispatcher():
    """The process's load-time dispatcher (``crepe_plugin.vllm.dispatch``), or None when
    ``CREPE_SPARSE_DISPATCH=0`` (then every call of a 2:4 layer takes the sparse kernel)."""
    import os

    global _DISPATCHER
    if os.environ.get("CREPE_SPARSE_DISPATCH", "1") == "0":
        return None
    if _DISPATCHER is None:
        from .dispatch import Dispatcher, cuda_timer

        _DISPATCHER = Dispatcher(cuda_timer(), budget_s=float(os.environ.get("CREPE_SPARSE_DISPATCH_BUDGET_S", "60")))
    return _DISPATCHER


def apply_layer(layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Forward of a layer prepared by ``prepare_layer`` (``crepe_sparse`` must be True): the sparse
    kernel, or the dense one for token counts where the dispatcher measured dense faster."""
    decision = getattr(layer, "crepe_decision", None)
    if decision is not None and not decision.use_sparse(x.numel() // x.shape[-1]):
        return torch.nn.functional.linear(x, layer.crepe_dense_weight, bias)
    return sparse_linear(x, layer.weight, layer.crepe_out_features, bias, layer.crepe_algs)
