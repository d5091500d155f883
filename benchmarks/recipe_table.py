"""Prune a model with each of several recipes, verify, and evaluate perplexity. Prints a table.

Each recipe (a path, or a name under recipes/ or benchmarks/recipes/) is run through
`crepe prune` (atomic save + verify), then evaluated with transformers (compressed-tensors
decompresses quantized weights). Rows are appended to --results (JSONL) and skipped on
rerun, so an interrupted table resumes.

usage:
  python benchmarks/recipe_table.py --model smollm2 --recipes crepe_cp_2of4.yaml,wanda_cp_2of4.yaml \
      --calib ../shared/data/wikitext2/wiki.valid.tokens.txt \
      --eval ../shared/data/wikitext2/wiki.test.raw.txt --out /tmp/runs --results benchmarks/results/compose.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe_path(name: str) -> Path:
    for cand in (Path(name), ROOT / "recipes" / name, ROOT / "benchmarks" / "recipes" / name):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"recipe {name!r} not found (as a path, in recipes/ or in benchmarks/recipes/)")


def main(default_recipes: list[str] | None = None, default_results: str = "benchmarks/results/recipes.jsonl"):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--out", default="recipe-runs")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-segments", type=int, default=16)
    ap.add_argument("--recipes", default=",".join(default_recipes or []), required=not default_recipes)
    ap.add_argument("--results", default=default_results)
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row")
    a = ap.parse_args()

    import torch

    from crepe_plugin.data import read_text
    from crepe_plugin.evaluate import load_model, perplexity
    from crepe_plugin.pipeline import prune, resolve_model
    from crepe_plugin.checkpoint.verify import verify_checkpoint

    text = read_text(a.eval)
    model = resolve_model(a.model)
    results = Path(a.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {r["recipe"] for r in rows}
    if "dense" not in done and not a.no_dense:
        m, tok = load_model(model, dtype=torch.float32)
        rows.append({"recipe": "dense", "ppl": perplexity(m, tok, text, a.eval_seqlen, a.max_segments), "seconds": 0.0, "format": "dense", "nm_ok": None})
        results.open("a").write(json.dumps(rows[-1]) + "\n")
    for recipe in a.recipes.split(","):
        if recipe in done:
            continue
        out = Path(a.out) / Path(recipe).stem
        t0 = time.perf_counter()
        prune(model, recipe_path(recipe), a.calib, out, a.num_samples, a.seqlen, overwrite=True)
        secs = time.perf_counter() - t0
        rep = verify_checkpoint(out)
        pruned = [l for l in rep.layers if l.recorded]
        m, tok = load_model(str(out), dtype=torch.float32)
        row = {"recipe": recipe, "ppl": perplexity(m, tok, text, a.eval_seqlen, a.max_segments),
               "seconds": secs, "format": sorted({l.fmt for l in pruned}), "nm_ok": rep.ok and all(l.nm_ok for l in pruned)}  # fmt: skip
        rows.append(row)
        results.open("a").write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("| recipe | stored format | verified | perplexity | prune+save s |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        fmt = r["format"] if isinstance(r["format"], str) else ", ".join(r["format"])
        ok = "-" if r["nm_ok"] is None else ("yes" if r["nm_ok"] else "NO")
        print(f"| {r['recipe']} | {fmt} | {ok} | {r['ppl']:.2f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
