"""Side-by-side: dense, magnitude, Wanda, SparseGPT (llm-compressor), RIA, CRePE (its
defaults) and the shipped best recipe (recipes/crepe_best_2of4.yaml, crepe_best_unstructured50.yaml;
``best`` at another N:M, e.g. ``best:4:8``, is the 2:4 recipe with only its mask_structure changed).

Each method runs in its own subprocess (so peak memory is its own), at 2:4 and at 50%
unstructured, and appends a JSON line to --results as soon as it finishes; the table is
printed from that file (rerun with --table-only to print it again).

usage (the project's protocol: calibration from the first 75% of valid, report on test):
  python benchmarks/compare_methods.py --model smollm2 \
      --calib '../shared/data/wikitext2/wiki.valid.tokens.txt[:0.75]' \
      --eval ../shared/data/wikitext2/wiki.test.raw.txt \
      --num-samples 64 --seqlen 512 --eval-seqlen 1024 --max-segments 16
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

METHODS = {
    "dense": None,
    "magnitude": None,
    "wanda": "WandaPruningModifier",
    "sparsegpt": "SparseGPTModifier",
    "ria": "RIAPruningModifier",
    "crepe": "CRePEPruningModifier",
    "ria+recon": "RIAPruningModifier",
    "crepe+recon": "CRePEPruningModifier",
    "best": None,
}
BEST = {"2:4": "crepe_best_2of4.yaml", "0:0": "crepe_best_unstructured50.yaml"}
ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"ria+recon": ["      reconstruct: true"], "crepe+recon": ["      reconstruct: true"]}
DEFAULT_ORDER = [
    ("dense", "-"), ("magnitude", "2:4"), ("magnitude", "0:0"),
    ("wanda", "2:4"), ("sparsegpt", "2:4"), ("ria", "2:4"), ("crepe", "2:4"),
    ("wanda", "0:0"), ("sparsegpt", "0:0"), ("ria", "0:0"), ("crepe", "0:0"),
]  # fmt: skip


def recipe_for(method: str, structure: str) -> str:
    if method.startswith("recipe="):  # any recipe file, by path or name under recipes/ or benchmarks/recipes/
        name = method[len("recipe="):]
        for cand in (Path(name), ROOT / "recipes" / name, ROOT / "benchmarks" / "recipes" / name):
            if cand.is_file():
                return cand.read_text()
        raise SystemExit(f"error: recipe {name!r} not found")
    if method == "best":  # the shipped best recipe; another N:M takes the 2:4 recipe, every other setting unchanged
        if structure in BEST:
            return (ROOT / "recipes" / BEST[structure]).read_text()
        text = (ROOT / "recipes" / BEST["2:4"]).read_text()
        if not re.fullmatch(r"\d+:\d+", structure) or text.count('mask_structure: "2:4"') != 1:
            raise SystemExit(f"error: no best recipe for structure {structure!r}")
        return text.replace('mask_structure: "2:4"', f'mask_structure: "{structure}"')
    mod = METHODS[method]
    lines = [f"    {mod}:", "      sparsity: 0.5", f"      mask_structure: '{structure}'", "      ignore: ['re:.*lm_head']"]
    lines += EXTRA.get(method, [])
    return "sparsity_stage:\n  sparsity_modifiers:\n" + "\n".join(lines) + "\n"


def run_one(a) -> dict:
    import torch

    from crepe_plugin.core import prune_mask
    from crepe_plugin.data import calibration_dataset, read_text
    from crepe_plugin.evaluate import perplexity
    from crepe_plugin.pipeline import resolve_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seconds = 0.0
    t0 = time.perf_counter()
    if a.method == "magnitude":
        with torch.no_grad():
            for name, m in model.named_modules():
                if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                    m.weight.masked_fill_(prune_mask(m.weight.abs(), 0.5, a.structure, "row"), 0)
        seconds = time.perf_counter() - t0
    elif a.method != "dense":  # llm-compressor's, ours, or any recipe file
        from llmcompressor import oneshot

        ds = calibration_dataset(a.calib, tok, a.num_samples, a.seqlen)
        t0 = time.perf_counter()
        oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe_for(a.method, a.structure),
                num_calibration_samples=a.num_samples, max_seq_length=a.seqlen)  # fmt: skip
        seconds = time.perf_counter() - t0
    ppl = perplexity(model, tok, read_text(a.eval), a.eval_seqlen, a.max_segments, progress=False)
    total = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    linear = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    zeros = sum(int((w == 0).sum()) for w in linear)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"method": a.method, "structure": a.structure, "ppl": ppl, "seconds": seconds, "peak_rss_mb": peak_mb,
           "num_samples": a.num_samples, "seqlen": a.seqlen, "model": a.model, "calib": a.calib, "eval": a.eval,
           "zero_share": zeros / total, "zero_share_of_linear": zeros / sum(w.numel() for w in linear)}  # fmt: skip
    for v in a.val or []:  # validation texts: {text: perplexity}
        row.setdefault("val_ppl", {})[v] = perplexity(model, tok, read_text(v), a.eval_seqlen, a.val_segments or a.max_segments,
                                                      progress=False)  # fmt: skip
    return row


def table(results: Path) -> str:
    rows = [json.loads(l) for l in results.read_text().splitlines() if l.strip()]
    texts = list(dict.fromkeys(v for r in rows if isinstance(r.get("val_ppl"), dict) for v in r["val_ppl"]))
    out = ["| method | structure | perplexity | prune wall s | peak RSS MB |" + "".join(f" val {Path(v).name} |" for v in texts),
           "| --- | --- | --- | --- | --- |" + " --- |" * len(texts)]  # fmt: skip
    for r in rows:
        s = {"0:0": "50% unstructured", "-": "-"}.get(r["structure"], r["structure"])
        vals = r.get("val_ppl") if isinstance(r.get("val_ppl"), dict) else {}
        cells = "".join(f" {vals[v]:.2f} |" if v in vals else " - |" for v in texts)
        out.append(f"| {r['method']} | {s} | {r['ppl']:.2f} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |{cells}")
    by = {(r["method"], r["structure"]): r for r in rows}
    for st, name in (("2:4", "2:4"), ("0:0", "50% unstructured")):
        if ("wanda", st) in by and ("crepe", st) in by:
            ref = min(by[("wanda", st)]["ppl"], by.get(("ria", st), by[("wanda", st)])["ppl"])
            out.append(f"\n{name}: CRePE defaults / min(Wanda, RIA) = {by[('crepe', st)]['ppl'] / ref:.3f}; "
                       f"time / Wanda = {by[('crepe', st)]['seconds'] / by[('wanda', st)]['seconds']:.2f}")  # fmt: skip
        if ("best", st) in by and ("sparsegpt", st) in by:
            b, g = by[("best", st)], by[("sparsegpt", st)]
            out.append(f"{name}: best recipe / SparseGPT = {b['ppl'] / g['ppl']:.3f}; time / SparseGPT = {b['seconds'] / g['seconds']:.2f}")
    dense = by.get(("dense", "-"))
    for st in ("2:4", "4:8", "0:0"):
        ref = by.get(("sparsegpt", st))
        if dense and ref and ref["ppl"] > dense["ppl"]:
            gaps = [f"{m} {(r['ppl'] - dense['ppl']) / (ref['ppl'] - dense['ppl']):.2f}" for (m, s), r in by.items() if s == st and m != "sparsegpt"]
            out.append(f"{st}: gap to dense / SparseGPT's gap: " + ", ".join(gaps))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib", required=False)
    ap.add_argument("--eval", required=False)
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--max-segments", type=int, default=16)
    ap.add_argument("--val", action="append", default=None,
                    help="also record perplexity on this validation text (repeat for several)")
    ap.add_argument("--val-segments", type=int, default=None, help="segments of each --val text (default --max-segments)")
    ap.add_argument("--results", default="benchmarks/results/compare_methods.jsonl")
    ap.add_argument("--only", default=None, help="comma list of method:structure, e.g. ria:2:4,wanda:0:0")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--structure", help=argparse.SUPPRESS)
    a = ap.parse_args()
    results = Path(a.results)
    if a.method:  # child
        print("RESULT " + json.dumps(run_one(a)), flush=True)
        return
    if not a.table_only:
        results.parent.mkdir(parents=True, exist_ok=True)
        order = DEFAULT_ORDER
        if a.only:  # method:structure; a method may be recipe=FILE
            order = [(x.rsplit(":", 2)[0], ":".join(x.rsplit(":", 2)[1:])) if x.count(":") >= 2 else (x.split(":", 1)[0], x.split(":", 1)[1])
                     for x in a.only.split(",")]  # fmt: skip
        for method, structure in order:
            cmd = [sys.executable, __file__, "--method", method, "--structure", structure]
            for k in ("model", "calib", "eval", "num_samples", "seqlen", "eval_seqlen", "max_segments", "val_segments"):
                if getattr(a, k) is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
            for v in a.val or []:
                cmd += ["--val", v]
            print(f"== {method} {structure}", flush=True)
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
            if p.returncode or line is None:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{method} {structure} failed")
            with open(results, "a") as f:
                f.write(line[7:] + "\n")
            print(line[7:], flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
