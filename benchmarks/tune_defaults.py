"""Choose CRePEPruningModifier's defaults on two models, on validation text only.

1. For each model (default: SmolLM2-135M and Gemma 3 270M), gather dense calibration
   statistics once (calibration windows from the first 75% of WikiText-2 valid) and run a
   PHO search of the coefficients against the `energy` proxy.
2. Run one joint search: CMA-ES on the mean over models of log(energy / energy at RIA),
   so a point must help both models. RIA's and Wanda's points are the first trials
   (for N:M and for row scope, Wanda's mask is CRePE's row 1, col 0, a 1).
3. Screen the candidates (RIA, Wanda's point, each model's optimum, the joint optimum,
   each under several kernel/border choices, which the proxy cannot see) by validation
   perplexity (the last 25% of WikiText-2 valid) on every model, every layer pruned from
   the dense statistics; choose the lowest geometric mean of ppl / ppl(RIA).
4. Ablate the chosen point (each term switched back to RIA's value) on validation text.

The test text is never read. Rows go to --results (JSONL, resumable); the choice is printed.

usage:
  python benchmarks/tune_defaults.py --structure 2:4 --out /work/runs/tune \\
      --results benchmarks/results/tune_defaults_2of4.jsonl
  python benchmarks/tune_defaults.py --structure 0:0 --sparsity 0.5 --scopes matrix,row \\
      --out /work/runs/tune --results benchmarks/results/tune_defaults_unstructured50.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from crepe_plugin.pho.search import RIA_PARAMS as RIA  # noqa: E402

WANDA = {**RIA, "col_coef": 0.0, "act_exponent": 1.0}  # Wanda's mask for N:M and row scope
KERNELS = [
    {"kernel": "box", "border": "mean", "neighbor_map": "ri"},
    {"kernel": "gaussian", "border": "zero", "neighbor_map": "ri"},
    {"kernel": "gaussian", "border": "mean", "neighbor_map": "ri"},
    {"kernel": "box", "border": "zero", "neighbor_map": "ri"},
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3-270m")
    ap.add_argument("--structure", default="2:4")
    ap.add_argument("--sparsity", type=float, default=None)
    ap.add_argument("--scopes", default="matrix", help="unstructured: comma list of scopes to compare")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--joint-trials", type=int, default=60)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-segments", type=int, default=8)
    ap.add_argument("--kernel-variants", type=int, default=len(KERNELS), help="kernel/border choices screened (1-4)")
    ap.add_argument("--screen", default="all", choices=["all", "joint"],
                    help="'joint': screen only RIA, Wanda's point and the joint optimum (per-model optima are still searched)")
    ap.add_argument("--out", required=True, help="directory for the statistics caches and studies")
    ap.add_argument("--results", required=True)
    a = ap.parse_args()

    import optuna
    import torch

    from crepe_plugin.core import CRePEConfig, parse_structure
    from crepe_plugin.data import protocol, read_text, refuse_test_text
    from crepe_plugin.evaluate import perplexity_of_ids
    from crepe_plugin.pho import SearchConfig
    from crepe_plugin.pho.session import build_evaluator, load_session, stats_meta as _stats_meta
    from crepe_plugin.pho.search import run_search, suggest_config

    proto = protocol(a.data_dir)
    if proto is None:
        raise SystemExit("error: WikiText-2 not found; pass --data-dir (the folder holding wikitext2/)")
    refuse_test_text(proto.validation, "validation text")
    print(proto.description, flush=True)
    n, m = parse_structure(a.structure)
    sparsity = a.sparsity if a.sparsity is not None else (n / m if n else None)
    if sparsity is None:
        raise SystemExit("error: --sparsity is required for --structure 0:0")
    scopes = a.scopes.split(",") if not n else ["matrix"]
    tag = f"{a.structure.replace(':', 'of')}-s{sparsity:g}"

    results = Path(a.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []

    def log_row(row):
        rows.append(row)
        with results.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    # ---- per-model evaluators (statistics cached under OUT/<model>)
    cfg = SearchConfig(proxy="energy", trials=a.trials)
    models = a.models.split(",")
    evs, ids = {}, {}
    for name in models:
        d = Path(a.out) / name
        d.mkdir(parents=True, exist_ok=True)
        mdl, tok, batches = load_session(name, proto.calib, a.num_samples, a.seqlen, 0)
        meta = _stats_meta(name, proto.calib, a.num_samples, a.seqlen, 0, cfg.layers)
        evs[name] = {sc: build_evaluator(mdl, batches, d, a.structure, sparsity, cfg, meta, sc)[0] for sc in scopes}
        ids[name] = tok(read_text(proto.validation), return_tensors="pt").input_ids
        print(f"{name}: {ids[name].numel()} validation tokens", flush=True)

    # ---- searches: one per model and scope, then one joint search per scope
    candidates = {}  # label -> (scope, params)
    for sc in scopes:
        candidates[f"ria/{sc}"] = (sc, RIA)
        candidates[f"wanda-point/{sc}"] = (sc, WANDA)
        for name in models:
            st = f"sqlite:///{(Path(a.out) / name / 'pho.db').resolve()}"
            c = cfg.model_copy(update={"storage": st, "study_name": f"tune-{tag}-{sc}"})
            t0 = time.perf_counter()
            res = run_search(evs[name][sc], c, {"kernel": "box", "border": "mean", "neighbor_map": "ri"})
            candidates[f"{name}-opt/{sc}"] = (sc, res["params"])
            print(f"search {name} {sc}: {res['params']} energy {res['value']:.5g} ({time.perf_counter() - t0:.0f} s)", flush=True)

        base = {name: evs[name][sc].proxy(CRePEConfig(**RIA), "energy") for name in models}

        def joint(trial, sc=sc, base=base):
            c = suggest_config(trial, cfg.bounds, {"kernel": "box", "border": "mean", "neighbor_map": "ri"})
            vals = {name: evs[name][sc].proxy(c, "energy") for name in models}
            for k, v in vals.items():
                trial.set_user_attr(k, v)
            return sum(math.log(vals[k] / base[k]) for k in models) / len(models)

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=f"joint-{tag}-{sc}",
            storage=f"sqlite:///{(Path(a.out) / 'joint.db').resolve()}",
            direction="minimize",
            sampler=optuna.samplers.CmaEsSampler(seed=0, with_margin=True, warn_independent_sampling=False),
            load_if_exists=True,
        )
        if not study.trials:
            study.enqueue_trial(RIA)
            study.enqueue_trial(WANDA)
        t0 = time.perf_counter()
        left = a.joint_trials - sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        if left > 0:
            study.optimize(joint, n_trials=left)
        best = dict(RIA, **study.best_trial.params)
        candidates[f"joint-opt/{sc}"] = (sc, best)
        print(f"joint search {sc}: {best} mean log energy ratio {study.best_value:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # ---- validation screen
    def measure(label, sc, params, kind):
        key = (kind, label, sc, json.dumps(params, sort_keys=True), tag)
        for r in rows:
            if (r["kind"], r["label"], r["scope"], json.dumps(r["params"], sort_keys=True), r["tag"]) == key:
                return r
        c = CRePEConfig(**params)
        row = {"kind": kind, "label": label, "scope": sc, "params": params, "tag": tag, "structure": a.structure,
               "sparsity": sparsity, "validation": proto.validation, "eval_seqlen": a.eval_seqlen,
               "eval_segments": a.eval_segments}  # fmt: skip
        for name in models:
            ev = evs[name][sc]
            t0 = time.perf_counter()
            with torch.no_grad(), ev.prune_model(c) as mdl:
                row[f"ppl/{name}"] = perplexity_of_ids(mdl, ids[name], a.eval_seqlen, a.eval_segments, progress=False)
            row[f"energy/{name}"] = ev.proxy(c, "energy")
            row[f"seconds/{name}"] = time.perf_counter() - t0
        log_row(row)
        return row

    screened = []
    for label, (sc, p) in candidates.items():
        if a.screen == "joint" and "-opt/" in label and not label.startswith("joint"):
            continue
        if p["neighbor_coef"] == 0.0 or p["kernel_size"] == 1:  # kernel choices change nothing without a window
            screened.append(measure(label, sc, {**p, **KERNELS[0]}, "screen"))
            continue
        for k in KERNELS[: a.kernel_variants]:
            screened.append(measure(label, sc, {**p, **k}, "screen"))

    ria_rows = {r["scope"]: r for r in screened if r["label"].startswith("ria/")}
    ref = ria_rows.get("matrix") or next(iter(ria_rows.values()))

    def score(r):  # geometric mean over models of ppl / ppl(RIA, matrix scope)
        return math.exp(sum(math.log(r[f"ppl/{x}"] / ref[f"ppl/{x}"]) for x in models) / len(models))

    chosen = min(screened, key=score)
    print("\n| candidate | scope | kernel/border | " + " | ".join(f"{x} val ppl" for x in models) + " | geomean vs RIA |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in models) + " | --- |")
    for r in sorted(screened, key=score):
        p = r["params"]
        print(f"| {r['label']} | {r['scope']} | {p['kernel']}/{p['border']} | "
              + " | ".join(f"{r[f'ppl/{x}']:.2f}" for x in models) + f" | {score(r):.3f} |")  # fmt: skip
    print(f"\nchosen: {chosen['label']} scope {chosen['scope']} {json.dumps(chosen['params'])}", flush=True)

    # ---- ablation of the chosen point: each term back to RIA's value
    p = chosen["params"]
    ablations = {
        "chosen": p,
        "neighbor_coef 0": {**p, "neighbor_coef": 0.0},
        "row/col back to 1": {**p, "row_coef": 1.0, "col_coef": 1.0},
        "act_exponent 0.5": {**p, "act_exponent": 0.5},
        "box/mean kernel": {**p, "kernel": "box", "border": "mean"},
    }
    print("\n| ablation | " + " | ".join(f"{x} val ppl" for x in models) + " |")
    print("| --- | " + " | ".join("---" for _ in models) + " |")
    for label, q in ablations.items():
        r = measure(label, chosen["scope"], q, "ablation")
        print(f"| {label} | " + " | ".join(f"{r[f'ppl/{x}']:.2f}" for x in models) + " |", flush=True)


if __name__ == "__main__":
    main()
