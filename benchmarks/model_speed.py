"""Model-level speed of the crepe_sparse 2:4 path: a Llama-3-8B-shaped decoder stack, dense
against our sparse linears, in bf16 and FP8 (W8A8, per-channel weight scale, dynamic per-token
activations). vLLM cannot be installed on the GPU machine, so this measures the model itself
(transformers' Llama modules, sdpa attention) with the plugin's layer code swapped in, exactly
as vLLM's ``CRePESparseLinearMethod`` runs it (``prepare_layer`` / ``apply_layer``, with the
load-time dispatch of ``crepe_plugin.vllm.dispatch`` unless --no-dispatch).

- prefill: prompts of --prompts tokens at batch --prefill-batch, tokens/s (CUDA events);
- decode: one token per sequence at batch --decode-batch over a --context-token static KV cache,
  captured in a CUDA graph (as vLLM's decode), tokens/s;
- weight memory of the linear layers (the sparse side: compressed 2:4 values + metadata, plus any
  dense copy the dispatcher keeps for token counts where dense wins);
- the load-time cost of the swap (compression, cuSPARSELt algorithm search and the dispatcher's
  timings, in seconds) and the dispatcher's decision table per weight shape;
- a check that the swap keeps the model's function: logits of one fixed batch before and after
  (relative error, greedy agreement).

Random weights, pruned 2:4 by magnitude (speed does not depend on which weights are kept).

usage (GPU):  python benchmarks/model_speed.py [--layers 32] [--formats bf16,fp8] [--json out.json]
smoke (CPU):  python benchmarks/model_speed.py --tiny   (small shapes, no CUDA graphs; the sparse
              path falls back to dense on CPU, so the ratios are ~1 and mean nothing)

Written in a session without a GPU: it has not run on one yet (README, Serving).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=16384, rope_theta=500000.0)  # fmt: skip
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, vocab_size=512,
            max_position_embeddings=2048)  # fmt: skip


def build(layers: int, tiny: bool, dev: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from crepe_plugin.core.masks import nm_mask

    cfg = LlamaConfig(num_hidden_layers=layers, **(TINY if tiny else LLAMA3_8B))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                m.weight.mul_(nm_mask(m.weight.abs().float(), 2, 4).to(m.weight.dtype))
    return model


def linears(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]


def linear_bytes(model) -> int:
    total = 0
    for _, m in linears(model):
        total += sum(t.numel() * t.element_size() for t in (m.weight, getattr(m, "crepe_dense_weight", None),
                                                              getattr(m, "crepe_wq", None)) if t is not None)  # fmt: skip
    return total


def to_fp8_dense(model) -> None:
    """W8A8 FP8 dense: per-channel e4m3 weights, dynamic per-token activations, torch._scaled_mm."""
    from crepe_plugin.vllm.sparse import quantize_per_token

    for _, m in linears(model):
        w = m.weight.data.float()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / torch.finfo(torch.float8_e4m3fn).max
        m.crepe_wq = (w / scale).to(torch.float8_e4m3fn)
        m.crepe_scale = scale.reshape(1, -1).float()
        m.weight = torch.nn.Parameter(torch.empty(0, device=w.device), requires_grad=False)

        def fwd(x, _m=m):
            x2 = x.reshape(-1, x.shape[-1])
            xq, xs = quantize_per_token(x2, torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, _m.crepe_wq.t(), scale_a=xs, scale_b=_m.crepe_scale, out_dtype=torch.bfloat16)
            return y.reshape(*x.shape[:-1], -1)

        m.forward = fwd


def to_sparse(model, fp8: bool) -> dict:
    """Swap every 2:4 linear to the plugin's path; returns {reason: count} for layers left dense."""
    from crepe_plugin.vllm.sparse import apply_layer, compress, prepare_layer, search_algs, sparse_linear_quant

    fell_back: dict[str, int] = {}
    for _, m in linears(model):
        if fp8:  # the fp8 sparse path of the W8A8 scheme (per-channel weight scale, dynamic activations)
            if m.weight.device.type != "cuda":
                fell_back["CPU"] = fell_back.get("CPU", 0) + 1
                continue
            wq, scale, out_f = m.crepe_wq, m.crepe_scale, m.crepe_wq.shape[0]
            packed = compress(wq)
            algs = search_algs(packed, wq.shape[1], torch.float8_e4m3fn, torch.bfloat16)
            m.crepe_wq = packed
            m.forward = lambda x, _p=packed, _s=scale, _o=out_f, _a=algs: sparse_linear_quant(x, _p, _s, _o, torch.float8_e4m3fn, None, _a)
            continue
        reason = prepare_layer(m)
        if reason is None:
            m.forward = lambda x, _l=m: apply_layer(_l, x, _l.bias)
        else:
            fell_back[reason] = fell_back.get(reason, 0) + 1
    return fell_back


def timed(fn, dev: str, reps: int = 5) -> float:
    """Seconds per call: CUDA events on a GPU, perf_counter elsewhere (after one warm-up)."""
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1000 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def prefill(model, batch: int, prompt: int, dev: str) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=dev)
    return batch * prompt / timed(lambda: model(ids, use_cache=False, logits_to_keep=1), dev, reps=3)


@torch.no_grad()
def decode(model, batch: int, context: int, dev: str) -> float:
    """Tokens/s of one decode step over a static KV cache of ``context`` tokens (CUDA graph on GPU)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + 64)  # slack: each eager step appends one
    ids = torch.randint(0, model.config.vocab_size, (batch, context), device=dev)
    model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)  # fill the cache (not timed)
    step = torch.randint(0, model.config.vocab_size, (batch, 1), device=dev)
    pos = torch.tensor([context], device=dev)

    def one():
        return model(step, past_key_values=cache, cache_position=pos, use_cache=True)

    if dev != "cuda":
        return batch / timed(one, dev), "eager (CPU)"
    from sparse_linear_bench import time_graph  # CUDA-graph replay timing, as the layer benchmark

    try:
        return batch / (time_graph(one, reps=1) / 1e6), "cuda graph"
    except RuntimeError as e:  # a capture that fails: time the step eagerly, and say so
        print(f"decode batch {batch}: CUDA graph capture failed ({' '.join(str(e).split())[:200]}); timed eagerly", flush=True)
        torch.cuda.synchronize()
        return batch / timed(one, dev), f"eager (graph capture failed: {' '.join(str(e).split())[:120]})"


@torch.no_grad()
def probe_logits(model, dev: str) -> torch.Tensor:
    """Logits of one fixed batch (2 x 64 tokens), for the before/after check of the swap."""
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=g).to(dev)
    return model(ids, use_cache=False).logits.float()


def swap_check(before: torch.Tensor, after: torch.Tensor) -> dict:
    rel = float((after - before).norm() / before.norm().clamp_min(1e-12))
    agree = float((after.argmax(-1) == before.argmax(-1)).float().mean())
    return {"logits_rel_err": rel, "greedy_agreement": agree, "ok": rel < 5e-2 and agree > 0.9}


def dispatch_state() -> dict:
    """The process dispatcher's decisions so far (shape -> table and buckets) and seconds spent."""
    from crepe_plugin.vllm import sparse

    d = sparse._DISPATCHER
    if d is None:
        return {"enabled": os.environ.get("CREPE_SPARSE_DISPATCH", "1") != "0", "spent_s": 0.0, "decisions": {}}
    return {"enabled": True, "spent_s": d.spent_s, "budget_s": d.budget_s, "margin": d.margin,
            "decisions": {str(k): {"table": v.table(), "buckets": [b.__dict__ for b in v.buckets]} for k, v in d.decisions.items()}}  # fmt: skip


def measure(model, a, dev: str, label: str) -> dict:
    """Tokens/s per configuration; one that fails (out of memory, or anything else) is None, with
    its error in ``errors``, and the others still run."""
    res = {"variant": label, "weight_bytes": linear_bytes(model), "prefill": {}, "decode": {}, "decode_mode": {}, "errors": {}}

    def attempt(kind: str, key: str, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - recorded per configuration
            res["errors"][f"{kind} {key}"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            print(f"{label} {kind} {key}: {res['errors'][f'{kind} {key}']}", flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
            return None

    for b in a.prefill_batch:
        for p in a.prompts:
            res["prefill"][f"{b}x{p}"] = attempt("prefill", f"{b}x{p}", lambda: prefill(model, b, p, dev))
    for b in a.decode_batch:
        got = attempt("decode", str(b), lambda: decode(model, b, a.context, dev))
        res["decode"][str(b)], res["decode_mode"][str(b)] = got if got else (None, None)
    print(json.dumps(res), flush=True)
    return res


def ratio(s, d):
    return f"{s / d:.2f}x" if s and d else "failed"


def table(fmt: str, dense: dict, sparse: dict, fell_back: dict) -> str:
    out = [f"### {fmt}: sparse / dense", "", f"linear weights: dense {dense['weight_bytes'] / 2**30:.2f} GiB, "
           f"sparse {sparse['weight_bytes'] / 2**30:.2f} GiB" + (f"; layers left dense: {fell_back}" if fell_back else ""),
           "", "| phase | batch x tokens | dense tok/s | sparse tok/s | sparse/dense |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for k, d in dense["prefill"].items():
        s = sparse["prefill"].get(k)
        out.append(f"| prefill | {k} | {d or 0:.0f} | {s or 0:.0f} | {ratio(s, d)} |")
    for k, d in dense["decode"].items():
        s = sparse["decode"].get(k)
        out.append(f"| decode | {k} x 1 | {d or 0:.0f} | {s or 0:.0f} | {ratio(s, d)} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--formats", default="bf16,fp8")
    ap.add_argument("--prompts", default="512,2048,8192")
    ap.add_argument("--prefill-batch", default="1,8")
    ap.add_argument("--decode-batch", default="1,16,64,256")
    ap.add_argument("--context", type=int, default=1024, help="KV-cache length before the timed decode step")
    ap.add_argument("--no-dispatch", action="store_true", help="every call of a 2:4 layer on the sparse kernel")
    ap.add_argument("--tiny", action="store_true", help="small shapes on CPU: checks the script, measures nothing")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    for k in ("prompts", "prefill_batch", "decode_batch"):
        setattr(a, k, [int(x) for x in getattr(a, k).split(",")])
    if a.no_dispatch:
        os.environ["CREPE_SPARSE_DISPATCH"] = "0"
    dev = "cpu" if a.tiny else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU with 2:4 sparse tensor cores (sm80+); --tiny runs a CPU smoke test")
    if a.tiny:
        a.layers, a.prompts, a.prefill_batch, a.decode_batch, a.context = 2, [16, 64], [1, 2], [1, 4], 32
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (smoke test)"
    print(f"# {where}, torch {torch.__version__}, {a.layers} decoder layers, Llama-3-8B shapes" + (" (tiny)" if a.tiny else ""))
    results = {}
    for fmt in a.formats.split(","):
        model = build(a.layers, a.tiny, dev)
        if fmt == "fp8":
            if dev != "cuda":
                print("fp8: skipped on CPU (torch._scaled_mm needs a GPU)")
                continue
            to_fp8_dense(model)
        before = probe_logits(model, dev)
        dense = measure(model, a, dev, f"{fmt} dense")
        spent0 = dispatch_state()["spent_s"]
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fell_back = to_sparse(model, fmt == "fp8")
        if dev == "cuda":
            torch.cuda.synchronize()
        load_s = time.perf_counter() - t0
        check = swap_check(before, probe_logits(model, dev))
        disp = dispatch_state()
        print(f"{fmt}: swap to the sparse path took {load_s:.1f} s (dispatch timings {disp['spent_s'] - spent0:.1f} s); "
              f"logits rel. err. {check['logits_rel_err']:.2e}, greedy agreement {check['greedy_agreement']:.3f}", flush=True)  # fmt: skip
        for k, v in disp["decisions"].items():
            print(f"dispatch {v['table']}", flush=True)
        sparse = measure(model, a, dev, f"{fmt} sparse")
        results[fmt] = {"dense": dense, "sparse": sparse, "fell_back": fell_back, "load_s": load_s,
                        "dispatch_s": disp["spent_s"] - spent0, "dispatch": disp, "check": check}  # fmt: skip
        print(table(fmt, dense, sparse, fell_back), flush=True)
        if a.json:  # after each format, so a later failure keeps this one
            Path(a.json).write_text(json.dumps({"device": where, "layers": a.layers, "results": results}, indent=2, default=str))
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps({"device": where, "layers": a.layers, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
