"""The ablation harness of local reconstruction (issue 22; docs/method.md, "Local reconstruction"):
sequential 2:4 pruning of SmolLM2 / Gemma 3 with a dense teacher stream, outside llm-compressor, so
that variants the plugin does not ship (asymmetric least squares, intra-layer sequential
pruning) can be measured beside those it does. It calibrates on the protocol's calibration text
and reports validation perplexity only (WikiText valid tail and the Jargon File), never test.

usage: python benchmarks/local_recon_ablation.py --model smollm2 --grad layer --gbs 1 --tag K \
           --out benchmarks/results/local_recon_ablation.jsonl

Variants (flags):
  --mask {score,adaptive}      score: CRePE default score mask; adaptive: OBS-sweep mask (sgpt saliency)
  --recon {none,obs}            OBS/CG compensation on the mask
  --asym                        target = dense stream (W* = W C H^-1), inputs = sparse stream
  --intra                       within a layer, later Linear groups see earlier pruned groups
  --grad {none,layer,units}     Adam local reconstruction of the kept weights
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from crepe_plugin.core import (CRePEConfig, compensate_adaptive_nm, compensate_fixed_mask, crepe_saliency,
                               crepe_scores, crepe_defaults, prune_mask, refine_fixed_mask)
from crepe_plugin.data import calibration_dataset, protocol, read_text, second_domain
from crepe_plugin.evaluate import perplexity
from crepe_plugin.pipeline import resolve_model

P = argparse.ArgumentParser()
P.add_argument("--model", default="smollm2")
P.add_argument("--num-samples", type=int, default=64)
P.add_argument("--seqlen", type=int, default=512)
P.add_argument("--bs", type=int, default=1)
P.add_argument("--mask", default="adaptive")
P.add_argument("--recon", default="obs")
P.add_argument("--refine", type=int, default=20)
P.add_argument("--asym", action="store_true")
P.add_argument("--intra", action="store_true")
P.add_argument("--grad", default="none")
P.add_argument("--epochs", type=int, default=1)
P.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="one, or several: each layer keeps the best fit")
P.add_argument("--lr-scale", default="absolute", choices=["absolute", "weight_rms"])
P.add_argument("--guard", action="store_true", help="fit_block's guard: keep the start where every fit raised the loss")
P.add_argument("--trial", type=float, default=1.0, help="with several --lr: fraction of the fit after which they are compared")
P.add_argument("--gbs", type=int, default=4, help="sequences per Adam step")
P.add_argument("--moves", action="store_true")
P.add_argument("--tokloss", action="store_true")
P.add_argument("--bf16", action="store_true", help="fit_block's compute_dtype bfloat16 (autocast training steps)")
P.add_argument("--bf16-bwd", action="store_true", help="fit_block's backward_dtype bfloat16 (the Linears' gradient products)")
P.add_argument("--norms", action="store_true", help="also train norm weights")
P.add_argument("--eval-segments", type=int, default=16)
P.add_argument("--layers", type=int, default=0, help="only first N layers (debug)")
P.add_argument("--tag", default="")
P.add_argument("--out", default="benchmarks/results/local_recon_ablation.jsonl")
P.add_argument("--threads", type=int, default=0)
a = P.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
torch.manual_seed(0)
proto = protocol()
path = resolve_model(a.model)
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ds = calibration_dataset(proto.calib, tok, a.num_samples, a.seqlen, seed=0)
ids = torch.tensor(ds["input_ids"])
batches = list(ids.split(a.bs))
layers = model.model.layers
L = len(layers) if not a.layers else a.layers
t_start = time.perf_counter()

# ---- one dense pass: every decoder layer's input and kwargs, per batch
class Stop(Exception):
    pass

def run_hooked(bs, hooks):
    """Forward each batch until a capture hook stops it, then remove the hooks."""
    with torch.no_grad():
        for b in bs:
            try:
                model(input_ids=b, use_cache=False)
            except Stop:
                pass
    for h in hooks:
        h.remove()


cap_in = [[] for _ in layers]
cap_kw = [[] for _ in layers]
hs = []
for i, layer in enumerate(layers):
    def pre(mod, args, kwargs, i=i):
        hs_ = args[0] if args else kwargs["hidden_states"]
        cap_in[i].append(hs_.detach())
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw.pop("past_key_values", None)
        cap_kw[i].append(kw)
        if i == 0:
            raise Stop
    hs.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
run_hooked(batches, hs)
# kwargs of later layers: capture by a full forward only for kwargs (cheap enough: needed for gemma local/global)
kw_all = [[] for _ in layers]
hs = []
for i, layer in enumerate(layers):
    def pre2(mod, args, kwargs, i=i):
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw.pop("past_key_values", None)
        kw_all[i].append(kw)
        if i == len(layers) - 1:
            raise Stop
    hs.append(layer.register_forward_pre_hook(pre2, with_kwargs=True))
run_hooked(batches[:1], hs)
# same kwargs for every batch (same shapes, no padding)
KW = [kw_all[i][0] for i in range(len(layers))]

def out0(o):
    return o[0] if isinstance(o, tuple) else o

def linears(layer):
    return [(n, m) for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]

X_s = cap_in[0]
X_d = [x.clone() for x in X_s]
cfg_nm = crepe_defaults("2:4")
cfg_sgpt = CRePEConfig(row_coef=1.0, col_coef=0.0, neighbor_coef=0.0, act_exponent=1.0)


def lin_inputs(layer, X, kw, names=None):
    """Run layer on X batches; return per linear name list of inputs (tokens x in), and outputs."""
    store = {}
    hooks = []
    for n, m in linears(layer):
        if names is not None and n not in names:
            continue
        def f(mod, args, out, n=n):
            store.setdefault(n, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        hooks.append(m.register_forward_hook(f))
    outs = []
    with torch.no_grad():
        for x in X:
            outs.append(out0(layer(x, **kw)))
    for h in hooks:
        h.remove()
    return store, outs


def gram(xs, ys=None):
    n = sum(x.shape[0] for x in xs) / a.seqlen  # samples
    G = None
    for i, x in enumerate(xs):
        y = x if ys is None else ys[i]
        t = y.t() @ x  # (in_y x in_x)
        G = t if G is None else G + t
    return G * (2.0 / n)


def prune_linear(W, H, C, name):
    """Returns (W', mask). C: cross term (dense-input x sparse-input) or None."""
    Wt = W
    if C is not None:
        # W* = argmin ||W X_d - W' X_s||^2 + lam ||W' - W||^2 = (W C + lam W) (H + lam I)^-1
        lam = 0.01 * float(torch.diagonal(H).mean())
        Hd = H + lam * torch.eye(H.shape[0])
        Wt = torch.linalg.solve(Hd, (W @ C + lam * W).t()).t()
    if a.mask == "adaptive":
        sal = crepe_saliency(Wt, cfg_sgpt)
        Wp, mask = compensate_adaptive_nm(Wt, H, 2, 4, sal, 0.01, 128)
    else:
        sc = crepe_scores(Wt, torch.diagonal(H) / 2, cfg_nm)
        mask = prune_mask(sc, 0.5, "2:4")
        if a.recon == "obs":
            Wp = compensate_fixed_mask(Wt, H, mask, 0.01, 128)
        else:
            Wp = Wt.masked_fill(mask, 0)
    if a.recon == "obs" and a.refine:
        Wp = refine_fixed_mask(Wt, Wp, H, mask, a.refine, 0.01)
    return Wp, mask


def groups_of(layer, X, kw):
    """Linear names grouped by shared input tensor, in call order."""
    order, seen, alive = [], {}, []
    hooks = []
    for n, m in linears(layer):
        def f(mod, args, out, n=n):
            key = id(args[0])
            alive.append(args[0])
            if key not in seen:
                seen[key] = len(order)
                order.append([])
            order[seen[key]].append(n)
        hooks.append(m.register_forward_hook(f))
    with torch.no_grad():
        layer(X[0][:1], **{k: (v[:1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == X[0].shape[0] else
                                  tuple(t[:1] for t in v) if isinstance(v, tuple) else v) for k, v in kw.items()})
    for h in hooks:
        h.remove()
    return order


def grad_recon(layer, X_s, kw, units, masks, X_d_targets):
    """fit_block on each unit: list of (module, inputs list, targets list)."""
    from crepe_plugin.core.local import fit_block
    log = []
    for unit, ins, tgts in units:
        names = {m: n for n, m in unit.named_modules() if isinstance(m, torch.nn.Linear)}
        weights = {f"{n}.weight": m.weight.data for m, n in names.items()}
        keep = {f"{n}.weight": ~masks[m] for m, n in names.items()}
        if a.norms:
            for pn, p in unit.named_parameters():
                if "norm" in pn and p.dim() == 1:
                    weights[pn] = p.data
                    keep[pn] = torch.ones_like(p.data, dtype=torch.bool)
        shadow = {f"{n}.weight": DENSE[m] for m, n in names.items()}
        scale = {f"{n}.weight": COLSCALE[m] for m, n in names.items()}
        kwb = ukw(unit, kw, ins[0].shape[0])
        def forward(params, b):
            return out0(torch.func.functional_call(unit, dict(params), (ins[b],), kwb, strict=False))
        t0 = time.perf_counter()
        fit = fit_block(forward, weights, keep, tgts, epochs=int(a.epochs), lr=a.lr, lr_scale=a.lr_scale, guard=a.guard, trial=a.trial, accumulate=a.gbs,
                        mask_moves=a.moves, shadow=shadow, col_scale=scale, nm=(2, 4), per_token=a.tokloss,
                        compute_dtype=torch.bfloat16 if a.bf16 else torch.float32,
                        backward_dtype=torch.bfloat16 if a.bf16_bwd else torch.float32)
        with torch.no_grad():
            if a.norms:
                for pn, p in unit.named_parameters():
                    if pn in fit.weights:
                        p.data.copy_(fit.weights[pn])
            for m, n in names.items():
                m.weight.data.copy_(fit.weights[f"{n}.weight"])
                masks[m] = ~fit.keep[f"{n}.weight"]
        log.append((type(unit).__name__, fit.loss_before, fit.loss_after, fit.mask_changes, round(time.perf_counter() - t0, 1))
                   + ((fit.lr, fit.probe_losses, fit.probe_final) if fit.probe_losses else ()))
    return log


def mod_io(layer, mod, X, kw):
    ins, outs, kws = [], [], []
    def f(m, args, kwargs, out):
        ins.append(args[0].detach() if args else kwargs["hidden_states"].detach())
        outs.append(out0(out).detach())
        k2 = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        k2.pop("past_key_values", None)
        kws.append(k2)
    h = mod.register_forward_hook(f, with_kwargs=True)
    with torch.no_grad():
        for x in X:
            layer(x, **kw)
    h.remove()
    return ins, outs, kws


def ukw(unit, kw, b):
    """kwargs for a unit call with batch b."""
    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] > 1 and v.shape[0] != b:
            return v[:b]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v
    return {k: cut(v) for k, v in kw.items()}


logs = []
for li in range(L):
    layer = layers[li]
    kw = KW[li]
    t0 = time.perf_counter()
    # dense teacher output on dense inputs (and dense-stream linear inputs)
    dense_in, Y_d = lin_inputs(layer, X_d, kw) if (a.asym or a.grad != "none") else (None, None)
    if Y_d is None:
        Y_d = None
    groups = groups_of(layer, X_s, kw)
    DENSE = {m: m.weight.data.clone() for _, m in linears(layer)}
    COLSCALE = {}
    if a.grad == "units":
        DTG = {u: mod_io(layer, getattr(layer, u), X_d, kw)[1] for u in ("self_attn", "mlp")}
    mods = dict(linears(layer))
    masks = {}
    pending = [g for g in groups]
    while pending:
        todo = pending if not a.intra else pending[:1]
        names = [n for g in todo for n in g]
        sp_in, _ = lin_inputs(layer, X_s, kw, set(names))
        for g in todo:
            H = gram(sp_in[g[0]])
            for n in g:
                COLSCALE[mods[n]] = torch.diagonal(H).sqrt()
            C = gram(sp_in[g[0]], dense_in[g[0]]) if a.asym else None
            for n in g:
                W = mods[n].weight.data
                Wp, mask = prune_linear(W.float(), H, C, f"{li}.{n}")
                mods[n].weight.data.copy_(Wp)
                masks[mods[n]] = mask
        pending = pending[len(todo):]
        del sp_in
    glog = None
    if a.grad == "layer":
        glog = grad_recon(layer, X_s, kw, [(layer, X_s, Y_d)], masks, Y_d)
    elif a.grad == "units":
        glog = []
        for uname in ("self_attn", "mlp"):
            unit = getattr(layer, uname)
            ins_s, _, kws = mod_io(layer, unit, X_s, kw)
            glog += grad_recon(unit, None, kws[0], [(unit, ins_s, DTG[uname])], masks, None)
    # propagate
    with torch.no_grad():
        X_s = [out0(layer(x, **kw)) for x in X_s]
        if Y_d is not None:
            X_d = Y_d
        else:
            X_d = X_s  # no teacher needed
    err = None
    if Y_d is not None:
        err = sum(F.mse_loss(xs, yd, reduction="sum").item() for xs, yd in zip(X_s, Y_d)) / sum(y.pow(2).sum().item() for y in Y_d)
        # the mean over tokens of each token's relative squared error (massive-activation tokens count once)
        tok_err = sum(((xs - yd).pow(2).sum(-1) / yd.pow(2).sum(-1).clamp_min(1e-30)).sum().item() for xs, yd in zip(X_s, Y_d)) / sum(y.shape[0] * y.shape[1] for y in Y_d)
    logs.append({"layer": li, "s": round(time.perf_counter() - t0, 1), "rel_err": err, "tok_err": tok_err if Y_d is not None else None, "grad": glog})
    print(json.dumps(logs[-1]), flush=True)
    if li + 1 < L and Y_d is None:
        pass

prune_s = time.perf_counter() - t_start
res = {"model": a.model, "tag": a.tag, "args": vars(a), "prune_s": round(prune_s, 1)}
for name, src in (("valid", proto.validation), ("jargon", str(second_domain()))):
    res[name] = round(perplexity(model, tok, read_text(src), 1024, a.eval_segments, progress=False), 3)
print(json.dumps(res), flush=True)
with open(a.out, "a") as f:
    f.write(json.dumps(res) + "\n")
