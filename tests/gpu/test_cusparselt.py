"""GPU tests of the 2:4 sparse path (cuSPARSELt). Not part of the default (CPU) run.

run on a CUDA sm80+ machine:  python -m pytest tests/gpu -q
real weights: CREPE_REAL_2OF4=<safetensors of 2:4-pruned Linear weights> (benchmarks/README)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from crepe_plugin.core.masks import is_nm, nm_mask
from crepe_plugin.vllm.sparse import (
    apply_layer,
    compress,
    fallback_reason,
    prepare_layer,
    quantize_per_token,
    search_algs,
    sparse_linear,
    sparse_linear_quant,
)

os.environ.setdefault("CREPE_SPARSE_DISPATCH", "0")  # the kernel tests below time the sparse path itself

if not torch.cuda.is_available():  # these tests are run by hand on a GPU machine
    pytest.fail("tests/gpu needs CUDA; the CPU suite is tests/ without tests/gpu", pytrace=False)

DEV = "cuda"


def pruned(out_f: int, in_f: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(out_f, in_f, device=DEV, generator=g) / in_f**0.5
    return (w * nm_mask(w.abs(), 2, 4)).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096), (4096, 14336), (576, 1536)])
@pytest.mark.parametrize("tokens", [1, 7, 64, 333])
def test_sparse_matches_dense_random(dtype, shape, tokens):
    w = pruned(*shape, dtype=dtype)
    assert fallback_reason(w) is None
    bias = torch.randn(shape[0], device=DEV, dtype=dtype)
    x = torch.randn(tokens, shape[1], device=DEV, dtype=dtype)
    ref = F.linear(x, w, bias)
    out = sparse_linear(x, compress(w), shape[0], bias)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref) < 1e-2


def test_sparse_keeps_leading_dims():
    w = pruned(256, 512)
    x = torch.randn(2, 5, 512, device=DEV, dtype=torch.bfloat16)
    assert rel_err(sparse_linear(x, compress(w), 256), F.linear(x, w)) < 1e-2


def test_sparse_matches_dense_real_weights():
    path = os.environ.get("CREPE_REAL_2OF4")
    if not path:
        pytest.fail("set CREPE_REAL_2OF4 to a safetensors file of 2:4-pruned Linear weights", pytrace=False)
    from safetensors.torch import load_file

    weights = load_file(path, device=DEV)
    assert weights
    for name, w in weights.items():
        w = w.to(torch.bfloat16)
        assert is_nm(w, 2, 4), name
        assert fallback_reason(w) is None, name
        x = torch.randn(37, w.shape[1], device=DEV, dtype=torch.bfloat16)
        assert rel_err(sparse_linear(x, compress(w), w.shape[0]), F.linear(x, w)) < 1e-2, name


@pytest.mark.parametrize("qdtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("tokens", [1, 50, 512])
def test_quantized_sparse_matches_quantized_dense(qdtype, tokens):
    out_f, in_f = 4096, 4096
    w = pruned(out_f, in_f, dtype=torch.float32)
    qmax = torch.finfo(qdtype).max if qdtype.is_floating_point else 127.0
    w_scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
    wq = (w / w_scale).clamp(-qmax, qmax)
    wq = wq.to(qdtype) if qdtype.is_floating_point else wq.round().to(qdtype)
    assert fallback_reason(wq) is None
    x = torch.randn(tokens, in_f, device=DEV, dtype=torch.bfloat16)
    xq, x_scale = quantize_per_token(x, qdtype)
    ref = (xq.float() * x_scale) @ (wq.float() * w_scale).t()
    packed = compress(wq)
    algs = search_algs(packed, in_f, qdtype, torch.int32 if qdtype == torch.int8 else torch.bfloat16)
    out = sparse_linear_quant(x, packed, w_scale, out_f, qdtype, algs=algs)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2


def test_fallback_reasons():
    assert "not 2:4" in fallback_reason(torch.randn(64, 64, device=DEV, dtype=torch.bfloat16))
    assert "float32" in fallback_reason(pruned(64, 64, dtype=torch.float32))
    assert "multiple" in fallback_reason(pruned(40, 64))
    assert "CPU" in fallback_reason(pruned(64, 64).cpu())


def test_prepare_layer_frees_dense_and_matches():
    lin = torch.nn.Linear(1024, 512, bias=True, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(pruned(512, 1024))
    x = torch.randn(9, 1024, device=DEV, dtype=torch.bfloat16)
    ref = lin(x)
    lin_dense_w = lin.weight.detach().clone()
    dense_bytes = lin.weight.numel() * lin.weight.element_size()
    assert prepare_layer(lin) is None and lin.crepe_sparse
    assert len(lin.crepe_algs) == 3 and all(isinstance(a, int) for a in lin.crepe_algs)
    packed_bytes = lin.weight.numel() * lin.weight.element_size()
    assert packed_bytes < 0.6 * dense_bytes  # values are half, metadata adds 1/16
    assert rel_err(apply_layer(lin, x, lin.bias), ref) < 1e-2
    for tokens in (1, 100, 2000):  # every token bucket's algorithm
        xt = torch.randn(tokens, 1024, device=DEV, dtype=torch.bfloat16)
        assert rel_err(apply_layer(lin, xt, lin.bias), F.linear(xt, lin_dense_w, lin.bias)) < 1e-2


def test_prepare_layer_leaves_non_2of4_alone():
    lin = torch.nn.Linear(256, 256, device=DEV, dtype=torch.bfloat16)
    before = lin.weight.detach().clone()
    assert "not 2:4" in prepare_layer(lin)
    assert not lin.crepe_sparse and torch.equal(lin.weight, before)


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(512, 2048, bias=False, device=DEV, dtype=torch.bfloat16)
        self.down = torch.nn.Linear(2048, 512, bias=False, device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            self.up.weight.copy_(pruned(2048, 512, seed=1))
            self.down.weight.copy_(pruned(512, 2048, seed=2))

    def forward(self, x):
        return self.down(F.silu(self.up(x)))


def _sparsify(module: torch.nn.Module) -> int:
    """Swap every 2:4 Linear's forward for the plugin's path, as the vLLM adapter does."""
    n = 0
    for lin in [m for m in module.modules() if isinstance(m, torch.nn.Linear)]:
        if prepare_layer(lin) is None:
            lin.forward = lambda x, _l=lin: apply_layer(_l, x, _l.bias)
            n += 1
    return n


def test_torch_compile_and_cuda_graph():
    block = _Block()
    x = torch.randn(16, 512, device=DEV, dtype=torch.bfloat16)
    ref = block(x)
    assert _sparsify(block) == 2
    eager = block(x)
    compiled = torch.compile(block, fullgraph=True)(x)
    assert rel_err(eager, ref) < 2e-2 and rel_err(compiled, eager) < 1e-3

    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            block(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = block(static_x)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(static_y, block(new_x)) < 1e-3


def test_llama_forward_with_sparse_layers():
    """A whole decoder forward (transformers Llama, the layer layout vLLM serves) with every
    2:4 Linear on the sparse path gives the logits of the dense 2:4 model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=1000, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
    )
    model = LlamaForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.mul_(nm_mask(m.weight.abs().float(), 2, 4))
    ids = torch.randint(0, 1000, (2, 40), device=DEV)
    with torch.no_grad():
        ref = model(ids).logits
        assert _sparsify(model.model) == 2 * 7
        out = model(ids).logits
    assert rel_err(out, ref) < 2e-2
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_dispatch_decisions_agree_with_real_timings(monkeypatch):
    """On the GPU: at every grid point the dispatcher measured, the chosen path is the faster one
    (sparse only when it wins by the margin), and the layer's output equals the dense linear at
    token counts of both kinds. Written without a GPU at hand: not yet run (see README)."""
    from crepe_plugin.vllm import sparse
    from crepe_plugin.vllm.dispatch import Dispatcher, cuda_timer

    monkeypatch.setenv("CREPE_SPARSE_DISPATCH", "1")
    monkeypatch.setattr(sparse, "_DISPATCHER", Dispatcher(cuda_timer(), budget_s=30.0))
    w = pruned(4096, 4096)
    layer = torch.nn.Linear(4096, 4096, bias=False, device=DEV, dtype=torch.bfloat16)
    layer.weight.data.copy_(w)
    reason = prepare_layer(layer)
    d = sparse._DISPATCHER.decisions[(4096, 4096, torch.bfloat16)]
    for b in d.buckets:
        if b.sparse and b.sparse_ms is not None:
            assert b.sparse_ms * sparse._DISPATCHER.margin < b.dense_ms, d.table()
    assert (reason is None) == d.any_sparse
    for t in (1, 16, 4096):
        x = torch.randn(t, 4096, device=DEV, dtype=torch.bfloat16)
        y = apply_layer(layer, x) if layer.crepe_sparse else F.linear(x, w)
        assert rel_err(y, F.linear(x, w)) < 2e-2
