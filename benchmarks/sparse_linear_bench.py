"""Time the plugin's 2:4 sparse Linear (cuSPARSELt) against the dense Linear on a CUDA GPU.

Llama-3-8B shapes (out x in): 4096x4096 (q/o), 14336x4096 (gate/up), 4096x14336 (down);
1 to 4096 tokens; bf16, and W8A8 fp8 / int8 (dynamic per-token activations, per-channel
weights) against the dense scaled matmul of the same format. Times are medians of CUDA-event
timed replays of a CUDA graph holding 20 calls (launch overhead amortised, as in vLLM's
decode). The sparse side includes everything the plugin's forward does (padding, activation
quantization) and uses the cuSPARSELt algorithm the plugin picks at load time (searched per
token bucket); the dense side includes its own activation quantization.

usage: python benchmarks/sparse_linear_bench.py [--tokens 1,16,...] [--no-search] [--block] [--json out.json]
(benchmarks/results/h100/sparse_linear_alg0.* was made with --no-search's algorithm, before the
search existed; the default run was not repeated on a GPU yet.)
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from crepe_plugin.core.masks import nm_mask
from crepe_plugin.vllm.sparse import compress, quantize_per_token, search_algs, sparse_linear, sparse_linear_quant

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
TOKENS = [1, 16, 64, 256, 1024, 4096]


def time_graph(fn, reps: int = 20, trials: int = 15) -> float:
    """Median microseconds per call of fn(), captured `reps` times in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    return statistics.median(times)


def dense_quant(x, wq_t, w_scale_row, qdtype):
    """The dense W8A8 reference a quantized checkpoint runs on: dynamic per-token quant + scaled mm."""
    xq, xs = quantize_per_token(x, qdtype)
    if qdtype == torch.float8_e4m3fn:
        return torch._scaled_mm(xq, wq_t, scale_a=xs, scale_b=w_scale_row, out_dtype=torch.bfloat16)
    y = torch._int_mm(xq, wq_t)
    return (y.float() * xs * w_scale_row).to(torch.bfloat16)


def block_bench(tokens: list[int]) -> list[dict]:
    """One transformers LlamaDecoderLayer with Llama-3-8B shapes (attention included), every
    projection 2:4, dense against the plugin's sparse path (the layer swap of tests/gpu)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from crepe_plugin.vllm.sparse import apply_layer, prepare_layer

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(nm_mask(m.weight.abs().float(), 2, 4))
    rope = LlamaRotaryEmbedding(cfg).to("cuda")
    rows = []
    def run(x, pe):
        return layer(x, position_embeddings=pe)
    timings = {}
    for phase in ("dense", "sparse"):
        if phase == "sparse":
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear) and prepare_layer(m) is None:
                    m.forward = lambda x, _l=m: apply_layer(_l, x, _l.bias)
        for t in tokens:
            x = torch.randn(1, t, 4096, device="cuda", dtype=torch.bfloat16)
            pe = rope(x, torch.arange(t, device="cuda")[None])
            with torch.no_grad():
                timings[(phase, t)] = time_graph(lambda: run(x, pe), reps=5)
    for t in tokens:
        d, s = timings[("dense", t)], timings[("sparse", t)]
        rows.append(dict(format="bf16", weight="llama3-8b decoder layer", tokens=t, dense_us=d, sparse_us=s, speedup=d / s))
        print(f"| bf16 | decoder layer (attention + MLP) | {t} | {d:.1f} | {s:.1f} | {d / s:.2f} |", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--formats", default="bf16,fp8,int8")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-search", action="store_true", help="cuSPARSELt's default algorithm (0), no search")
    ap.add_argument("--block", action="store_true", help="also time a whole Llama-3-8B-shaped decoder layer")
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    dev = "cuda"
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuSPARSELt {torch.backends.cusparselt.version()}")
    print("| format | weight (out x in) | tokens | dense us | sparse us | dense/sparse |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for fmt in a.formats.split(","):
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f, device=dev) / in_f**0.5
            w = w * nm_mask(w.abs(), 2, 4)
            if fmt == "bf16":
                wb = w.to(torch.bfloat16)
                packed = compress(wb)
                algs = None if a.no_search else search_algs(packed, in_f, torch.bfloat16)
            else:
                qdtype = torch.float8_e4m3fn if fmt == "fp8" else torch.int8
                qmax = torch.finfo(qdtype).max if fmt == "fp8" else 127.0
                w_scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
                wq = (w / w_scale).clamp(-qmax, qmax)
                wq = wq.to(qdtype) if fmt == "fp8" else wq.round().to(qdtype)
                packed = compress(wq)
                algs = None if a.no_search else search_algs(
                    packed, in_f, qdtype, torch.int32 if fmt == "int8" else torch.bfloat16
                )
                wq_t = wq.t()  # column-major (in x out), what _scaled_mm / _int_mm take
                w_scale_row = w_scale.reshape(1, -1).float()
            for t in tokens:
                x = torch.randn(t, in_f, device=dev, dtype=torch.bfloat16)
                if fmt == "bf16":
                    dense_us = time_graph(lambda: F.linear(x, wb))
                    sparse_us = time_graph(lambda: sparse_linear(x, packed, out_f, algs=algs))
                else:
                    if fmt == "int8" and t < 17:  # _int_mm needs more than 16 rows
                        xd = torch.nn.functional.pad(x, (0, 0, 0, 17 - t))
                    else:
                        xd = x
                    dense_us = time_graph(lambda: dense_quant(xd, wq_t, w_scale_row, qdtype))
                    sparse_us = time_graph(lambda: sparse_linear_quant(x, packed, w_scale, out_f, qdtype, algs=algs))
                row = dict(format=fmt, weight=f"{out_f}x{in_f}", tokens=t, dense_us=dense_us, sparse_us=sparse_us,
                           speedup=dense_us / sparse_us)
                rows.append(row)
                print(f"| {fmt} | {row['weight']} | {t} | {dense_us:.1f} | {sparse_us:.1f} | {row['speedup']:.2f} |", flush=True)
    if a.block:
        rows += block_bench(tokens)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
