"""Time of one local-reconstruction training step on one real decoder layer (docs/method.md,
"Local reconstruction", session 34): ``core.local.fit_block`` on a 2:4-masked copy of the layer,
one epoch, one window of ``--seqlen`` tokens per step, against the dense layer's own outputs.
Prints each repeat's milliseconds per step and the training loss (equal across repeats and
code versions up to float rounding, so two checkouts can be compared on the same numbers).

The input windows come from the first part of WikiText-2 valid (calibration text).

``--mlp-tokens 1 0.5 0.25`` times each fraction of ``local_reconstruction.mlp_tokens`` in turn,
interleaved over the repeats (session 37). ``--attention all output`` times
``local_reconstruction.attention`` the same way (session 38; 'output' trains only the attention's
output projection and reuses what it receives, computed once per window).

usage: python benchmarks/fit_step_time.py --model smollm2 --windows 16 --repeats 4 [--mlp-tokens 1 0.5] [--attention all output]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from crepe_plugin.core import nm_mask
from crepe_plugin.core.local import fit_block
from crepe_plugin.data import read_text
from crepe_plugin.modifiers.teacher import _swapped, attention_replay, mlp_block, on_tokens
from crepe_plugin.pipeline import resolve_model

P = argparse.ArgumentParser()
P.add_argument("--model", default="smollm2")
P.add_argument("--layer", type=int, default=5)
P.add_argument("--windows", type=int, default=16)
P.add_argument("--seqlen", type=int, default=512)
P.add_argument("--repeats", type=int, default=4)
P.add_argument("--text", default="../shared/data/wikitext2/wiki.valid.tokens.txt")
P.add_argument("--mlp-tokens", type=float, nargs="+", default=[1.0], help="fractions of local_reconstruction.mlp_tokens")
P.add_argument("--attention", nargs="+", default=["all"], choices=["all", "output"], help="local_reconstruction.attention")
P.add_argument("--profile", action="store_true", help="also print torch.profiler's table of one fit")
a = P.parse_args()

path = resolve_model(a.model)
model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(str(path))
ids = tok(read_text(a.text)[:400_000], return_tensors="pt").input_ids[0]
need = a.windows * a.seqlen
if ids.numel() < need:
    raise SystemExit(f"error: --text {a.text}: {ids.numel()} tokens, {need} needed")
ids = ids[:need].reshape(a.windows, a.seqlen)
layer = model.model.layers[a.layer]
calls = []
hook = layer.register_forward_pre_hook(lambda m, args, kw: calls.append((args, kw)), with_kwargs=True)
with torch.no_grad():
    for i in range(a.windows):
        model(ids[i : i + 1], use_cache=False)
hook.remove()
model.requires_grad_(False)


def first(o):
    return o[0] if isinstance(o, tuple) else o


with torch.no_grad():
    targets = [first(layer(*args, **kw)) for args, kw in calls]
lin = {f"{n}.weight": m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
keep = {k: ~nm_mask(m.weight.detach().abs(), 2, 4) for k, m in lin.items()}
weights = {k: m.weight.detach() * keep[k] for k, m in lin.items()}
fixed = {k: v for k, v in layer.named_parameters() if k not in weights}


mlp_name, mlp = mlp_block(layer, set(lin.values()))


def forward(params, b, tokens=None, fixed=fixed, replay=None):
    args, kw = calls[b]
    if replay is not None:
        replay.window = b
    with (on_tokens(mlp, mlp_name, tokens) if tokens is not None else contextlib.nullcontext(),
          _swapped(layer, "self_attn", replay) if replay is not None else contextlib.nullcontext()):
        out = first(torch.func.functional_call(layer, {**fixed, **params}, args, kw))
    return out if tokens is None else out.index_select(-2, tokens)


def problem(attention):
    """(forward, weights, keep) of a fit with ``local_reconstruction.attention``."""
    if attention == "all":
        return forward, weights, keep
    replay = attention_replay(layer.self_attn, "self_attn", lambda b: forward(weights, b), a.windows, lambda t: t.detach())
    frozen = replay.frozen([*fixed, *weights], "self_attn")
    fixed_o = {k: v for k, v in fixed.items() if k not in frozen}
    return (lambda params, b, tokens=None: forward(params, b, tokens, fixed_o, replay),
            {k: v for k, v in weights.items() if k not in frozen}, {k: v for k, v in keep.items() if k not in frozen})


print(f"{a.model} layer {a.layer}: {a.windows} windows x {a.seqlen} tokens, {torch.get_num_threads()} threads")
problems = {att: problem(att) for att in a.attention}
for rep in range(a.repeats):
    for att, (fwd, w, k) in problems.items():
        for f in a.mlp_tokens:
            t = time.perf_counter()
            fit = fit_block(fwd, w, k, targets, epochs=1, lr=1e-4, measure=False, token_fraction=f)
            print(f"repeat {rep}, attention {att}, mlp_tokens {f:g}: {(time.perf_counter() - t) / a.windows * 1000:.1f} ms/step, "
                  f"training loss {fit.history[0]:.10g}")
if a.profile:
    from torch.profiler import profile

    with profile() as prof:
        fit_block(forward, weights, keep, targets, epochs=1, lr=1e-4, measure=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
