"""FP8 2:4 against dense FP8, at layer level, on Llama-3-8B's linear shapes (issue 24).

W8A8 FP8 as our ``crepe_2of4_fp8_dynamic`` checkpoints store it: e4m3 weights with one scale per
output channel, activations quantized to e4m3 per token at run time. For each shape:

- correctness: the sparse path (``crepe_plugin.vllm.sparse.sparse_linear_quant``: per-token
  quantization, ``torch._cslt_sparse_mm``, both scales on the output) and the dense FP8 reference
  (``torch._scaled_mm`` with the same scales) against the exact product of the same quantized
  operands in float32 (relative Frobenius error);
- speed: the whole layer (quantization + GEMM + scaling) and the GEMM alone (``_cslt_sparse_mm``
  against ``_scaled_mm``: the 2:4 limit there is 2x), medians of CUDA-graph replays;
- a decoder layer's linears together (q, k, v, o, gate, up, down): the sum of the per-shape times.

usage (GPU): python benchmarks/fp8_2of4.py [--tokens 2048] [--json out.json]
smoke (CPU): python benchmarks/fp8_2of4.py --tiny   (tiny shapes; the cuSPARSELt side is skipped:
             no CUDA; timings there are wall-clock and mean nothing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crepe_plugin.core.masks import nm_mask  # noqa: E402
from crepe_plugin.vllm.sparse import compress, fallback_reason, quantize_per_token, search_algs, sparse_linear_quant  # noqa: E402

FP8 = torch.float8_e4m3fn
# Llama-3-8B (out, in) and how many of each a decoder layer holds
SHAPES = {"q/o 4096x4096": ((4096, 4096), 2), "k/v 1024x4096": ((1024, 4096), 2),
          "gate/up 14336x4096": ((14336, 4096), 2), "down 4096x14336": ((4096, 14336), 1)}  # fmt: skip
TINY = {"q/o 64x128": ((64, 128), 2), "k/v 32x128": ((32, 128), 2), "gate/up 256x128": ((256, 128), 2),
        "down 128x256": ((128, 256), 1)}  # fmt: skip


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def timer(dev: str):
    if dev == "cuda":
        from sparse_linear_bench import time_graph

        return time_graph

    def wall(fn, reps: int = 5, trials: int = 3) -> float:
        fn()
        out = []
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            out.append((time.perf_counter() - t0) * 1e6 / reps)
        return statistics.median(out)

    return wall


def quantized_weight(out_f: int, in_f: int, dev: str, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dev)
    w = w * nm_mask(w.abs(), 2, 4)
    scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / torch.finfo(FP8).max
    return (w / scale).to(FP8), scale.float()  # zeros stay zeros: still 2:4


def one_shape(label: str, out_f: int, in_f: int, tokens: int, dev: str, tm) -> dict:
    wq, w_scale = quantized_weight(out_f, in_f, dev, seed=out_f + in_f)
    x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16)
    xq, x_scale = quantize_per_token(x, FP8)
    exact = (xq.float() * x_scale) @ (wq.float() * w_scale).t()
    wq_t, w_scale_row = wq.t(), w_scale.reshape(1, -1)

    def dense_layer():
        q, s = quantize_per_token(x, FP8)
        return torch._scaled_mm(q, wq_t, scale_a=s, scale_b=w_scale_row, out_dtype=torch.bfloat16)

    def dense_gemm():
        return torch._scaled_mm(xq, wq_t, scale_a=x_scale, scale_b=w_scale_row, out_dtype=torch.bfloat16)

    row = {"shape": label, "out": out_f, "in": in_f, "tokens": tokens}
    try:
        row["dense_rel_err"] = rel(dense_layer(), exact)
        row["dense_layer_us"], row["dense_gemm_us"] = tm(dense_layer), tm(dense_gemm)
    except (RuntimeError, NotImplementedError) as e:  # _scaled_mm where this torch has no fp8 kernel
        row["dense_error"] = " ".join(str(e).split())[:200]
    reason = fallback_reason(wq)
    if reason is not None:
        row["sparse"] = f"skipped: {'no CUDA' if dev != 'cuda' else reason}"
        return row
    packed = compress(wq)
    algs = search_algs(packed, in_f, FP8, torch.bfloat16)
    from crepe_plugin.compat.torch import cslt_sparse_mm

    def sparse_layer():
        return sparse_linear_quant(x, packed, w_scale, out_f, FP8, algs=algs)

    pad = (-tokens) % 16
    xqp = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(FP8) if pad else xq
    alg = algs[-1 if tokens > 1024 else (1 if tokens > 64 else 0)]

    def sparse_gemm():
        return cslt_sparse_mm(packed, xqp.t(), out_dtype=torch.bfloat16, transpose_result=True, alg_id=alg)

    y = sparse_layer()
    row["sparse_rel_err"], row["sparse_vs_dense_rel"] = rel(y, exact), rel(y, dense_layer())
    row["sparse_ok"] = bool(torch.isfinite(y).all()) and row["sparse_rel_err"] < 1e-2
    row["sparse_layer_us"], row["sparse_gemm_us"] = tm(sparse_layer), tm(sparse_gemm)
    row["layer_speedup"] = row["dense_layer_us"] / row["sparse_layer_us"]
    row["gemm_speedup"] = row["dense_gemm_us"] / row["sparse_gemm_us"]
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="2048", help="comma-separated token counts (the target is at 2048)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = "cpu" if a.tiny or not torch.cuda.is_available() else "cuda"
    if dev == "cpu" and not a.tiny:
        raise SystemExit("error: this benchmark needs a CUDA GPU (sm89+ for FP8 2:4); --tiny runs a CPU smoke test")
    shapes = TINY if a.tiny else SHAPES
    tokens = [32] if a.tiny else [int(t) for t in a.tokens.split(",")]
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke test)"
    cslt = torch.backends.cusparselt.version() if dev == "cuda" and torch.backends.cusparselt.is_available() else None
    print(f"# {where}, torch {torch.__version__}, cuSPARSELt {cslt}")
    print("| shape | tokens | rel. err. dense / sparse | dense us (layer, GEMM) | sparse us (layer, GEMM) | speed-up layer, GEMM |")
    print("| --- | --- | --- | --- | --- | --- |")
    torch.manual_seed(0)
    tm = timer(dev)
    rows, summary = [], {}
    for t in tokens:
        tot = {"dense_layer_us": 0.0, "sparse_layer_us": 0.0, "dense_gemm_us": 0.0, "sparse_gemm_us": 0.0}
        complete = True
        for label, ((out_f, in_f), count) in shapes.items():
            r = one_shape(label, out_f, in_f, t, dev, tm)
            r["per_decoder_layer"] = count
            rows.append(r)
            for k in tot:
                if r.get(k) is None:
                    complete = False
                else:
                    tot[k] += count * r[k]
            f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
            print(f"| {label} | {t} | {f('dense_rel_err', '{:.1e}')} / {f('sparse_rel_err', '{:.1e}')} | "
                  f"{f('dense_layer_us')}, {f('dense_gemm_us')} | {f('sparse_layer_us')}, {f('sparse_gemm_us')} | "
                  f"{f('layer_speedup', '{:.2f}')}, {f('gemm_speedup', '{:.2f}')} |" + (f" {r['sparse']}" if "sparse" in r else ""), flush=True)  # fmt: skip
        if complete:
            summary[str(t)] = {**tot, "layer_speedup": tot["dense_layer_us"] / tot["sparse_layer_us"],
                               "gemm_speedup": tot["dense_gemm_us"] / tot["sparse_gemm_us"]}  # fmt: skip
            print(f"decoder layer's linears at {t} tokens: FP8 2:4 / FP8 dense = {summary[str(t)]['layer_speedup']:.2f}x "
                  f"(GEMMs alone {summary[str(t)]['gemm_speedup']:.2f}x; limit 2x)")  # fmt: skip
        else:
            summary[str(t)] = {"skipped": "no CUDA" if dev != "cuda" else "a shape did not run"}
    if a.json:
        Path(a.json).write_text(json.dumps({"device": where, "torch": torch.__version__, "cusparselt": cslt,
                                            "rows": rows, "decoder_layer": summary}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
