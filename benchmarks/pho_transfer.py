"""Do CRePE coefficients found by PHO on one model transfer to another?

Prunes TARGET at the structure of SOURCE_DIR's search with: RIA, the coefficients PHO
found on the source model (SOURCE_DIR/best_<proxy>.json), and (optionally) the
coefficients PHO finds on TARGET itself, all from TARGET's cached dense statistics, and
prints held-out perplexity for each next to dense.

usage:
  python benchmarks/pho_transfer.py --source /work/runs/pho-smol --target gemma3-270m \
      --calib ../shared/data/wikitext2/wiki.valid.tokens.txt \
      --eval ../shared/data/wikitext2/wiki.test.raw.txt --out /work/runs/pho-gemma
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="a `crepe search --out` directory")
    ap.add_argument("--proxy", default="recon")
    ap.add_argument("--target", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--trials", type=int, default=40, help="native search on the target (0 = skip)")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-segments", type=int, default=8)
    a = ap.parse_args()

    from crepe_plugin.core import CRePEConfig
    from crepe_plugin.data import read_text
    from crepe_plugin.evaluate import perplexity_of_ids
    from crepe_plugin.pho import SearchConfig
    from crepe_plugin.pho.session import build_evaluator, load_session, stats_meta as _stats_meta
    from crepe_plugin.pho.search import RIA_PARAMS, fixed_part, run_search

    src = json.loads((Path(a.source) / f"best_{a.proxy}.json").read_text())
    fixed = fixed_part(CRePEConfig(**src["config"]))  # kernel, border and map as the source search fixed them
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = SearchConfig(proxy=a.proxy, trials=max(a.trials, 1), storage=f"sqlite:///{(out / 'pho.db').resolve()}")
    model, tok, batches = load_session(a.target, a.calib, a.num_samples, a.seqlen, 0)
    meta = _stats_meta(a.target, a.calib, a.num_samples, a.seqlen, 0, cfg.layers)
    ev, info = build_evaluator(model, batches, out, src["structure"], src["sparsity"], cfg, meta)
    ids = tok(read_text(a.eval), return_tensors="pt").input_ids
    rows = []

    def measure(label, params):
        c = CRePEConfig(**params, **fixed)
        prox = ev.proxy(c, a.proxy)
        with ev.prune_model(c) as m:
            ppl = perplexity_of_ids(m, ids, a.eval_seqlen, a.eval_segments, progress=False)
        rows.append({"config": label, "params": params, a.proxy: prox, "heldout_ppl": ppl})
        print(json.dumps(rows[-1]), flush=True)

    dense = perplexity_of_ids(model, ids, a.eval_seqlen, a.eval_segments, progress=False)
    rows.append({"config": "dense", "heldout_ppl": dense})
    measure("RIA", RIA_PARAMS)
    measure(f"PHO on {src['model']} (transferred)", src["params"])
    if a.trials:
        t0 = time.perf_counter()
        res = run_search(ev, cfg, fixed)
        measure(f"PHO on {a.target} ({time.perf_counter() - t0:.0f} s)", res["params"])
    (out / "transfer.json").write_text(json.dumps({"source": src, "target": a.target, "rows": rows, **info}, indent=2))
    print(f"\ntarget {a.target}, {src['structure']}, held-out {Path(a.eval).name} ({a.eval_segments} x {a.eval_seqlen} tokens)")
    print(f"| configuration | parameters | {a.proxy} | held-out ppl |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        p = {k: round(v, 3) for k, v in r.get("params", {}).items()}
        print(f"| {r['config']} | `{p}` | {r.get(a.proxy, float('nan')):.4g} | {r['heldout_ppl']:.2f} |")


if __name__ == "__main__":
    main()
