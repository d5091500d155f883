"""Measure CRePE's fixed neighborhood choices (kernel shape, border, map) on a real model.

PHO searches the coefficients and the kernel size with kernel, border and map held fixed (at
the structure's defaults; box/mean/ri in the searches this script was first run on). This script takes one searched point (a ``best_<proxy>.json`` of a ``crepe search``
directory), varies the three choices over every combination, prunes every targeted layer from
the search's cached dense statistics (as ``crepe search-validate`` does), and prints held-out
perplexity and the energy proxy for each. Rows are appended to --results (JSONL, resumable).

usage:
  python benchmarks/kernel_choices.py --search-dir pho-run --proxy energy \\
      --eval '../shared/data/wikitext2/wiki.valid.tokens.txt[0.75:]' --results benchmarks/results/kernel_choices.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search-dir", required=True)
    ap.add_argument("--proxy", default="energy", help="whose best point to start from")
    ap.add_argument("--eval", required=True, help="validation text; the test text is refused")
    ap.add_argument("--allow-test-text", action="store_true")
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--eval-segments", type=int, default=8)
    ap.add_argument("--results", default="benchmarks/results/kernel_choices.jsonl")
    a = ap.parse_args()

    from crepe_plugin.core import CRePEConfig
    from crepe_plugin.data import read_text, refuse_test_text

    refuse_test_text(a.eval, "--eval", allow=a.allow_test_text)
    from crepe_plugin.evaluate import perplexity_of_ids
    from crepe_plugin.pho.session import build_evaluator, load_session, stats_meta as _stats_meta
    from crepe_plugin.pho.calib import STATS_FILE, CalibStats
    from crepe_plugin.pho.config import SearchConfig

    out = Path(a.search_dir)
    best = json.loads((out / f"best_{a.proxy}.json").read_text())
    layers = CalibStats.load(out / STATS_FILE).meta.get("layers", "6")
    cfg = SearchConfig(layers="all" if layers == "all" else int(layers))
    model, tok, batches = load_session(best["model"], best["calib"], best["num_samples"], best["seqlen"], 0)
    meta = _stats_meta(best["model"], best["calib"], best["num_samples"], best["seqlen"], 0, cfg.layers)
    ev, _ = build_evaluator(model, batches, out, best["structure"], best["sparsity"], cfg, meta)
    ids = tok(read_text(a.eval), return_tensors="pt").input_ids

    results = Path(a.results)
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    done = {(r["start"], r["kernel"], r["border"], r["neighbor_map"]) for r in rows}
    print("| kernel | border | map | held-out ppl | energy proxy | s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kernel, border, nmap in itertools.product(("box", "gaussian"), ("mean", "zero", "reflect", "replicate"), ("ri", "score")):
        key = (f"best_{a.proxy}", kernel, border, nmap)
        if key in done:
            r = next(r for r in rows if (r["start"], r["kernel"], r["border"], r["neighbor_map"]) == key)
        else:
            t0 = time.perf_counter()
            c = CRePEConfig(**best["params"], kernel=kernel, border=border, neighbor_map=nmap)
            energy = ev.proxy(c, "energy")
            with ev.prune_model(c) as m:
                ppl = perplexity_of_ids(m, ids, a.eval_seqlen, a.eval_segments, progress=False)
            r = dict(start=key[0], params=best["params"], kernel=kernel, border=border, neighbor_map=nmap,
                     heldout_ppl=ppl, energy=energy, seconds=time.perf_counter() - t0,
                     eval={"text": a.eval, "seqlen": a.eval_seqlen, "segments": a.eval_segments})
            results.parent.mkdir(parents=True, exist_ok=True)
            with results.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
        print(f"| {kernel} | {border} | {nmap} | {r['heldout_ppl']:.2f} | {r['energy']:.5f} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
