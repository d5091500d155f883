"""Cost at scale: one Llama-3-8B-shaped decoder layer (hidden 4096, MLP 14336, 32 heads, 8 KV heads)
pruned 2:4 by llm-compressor's SparseGPT and by our recipes, each in its own subprocess, on the
same random weights and the same calibration tokens; prints wall time and peak RSS, and the dense
teacher's memory computed for Llama-3-8B and 70B shapes.

The model is a one-layer LlamaForCausalLM with a small vocabulary (so that the embeddings do not
dominate), float32, random weights: the cost is what this measures, not quality.

usage:
  python benchmarks/layer_cost.py --num-samples 16 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "sparsegpt": "sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n      sparsity: 0.5\n"
    "      mask_structure: '2:4'\n      ignore: ['re:.*lm_head']\n",
    "crepe_2of4": (ROOT / "recipes" / "crepe_2of4.yaml").read_text(),
    "crepe_fast_2of4": (ROOT / "recipes" / "crepe_fast_2of4.yaml").read_text(),
    "crepe_best_2of4": (ROOT / "recipes" / "crepe_best_2of4.yaml").read_text(),
}


SHAPES = {"8b": (4096, 14336, 32, 8), "tiny": (64, 128, 4, 2)}  # hidden, MLP, heads, KV heads; tiny: a dry run


def build(path: Path, shape: str = "8b", vocab: int = 1024) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden, mlp, heads, kv = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=1, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=8192, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(path)


def child(a) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import crepe_plugin  # noqa: F401  (registers the modifiers)
    from crepe_plugin.testing import tiny_tokenizer  # the data is token ids: any tokenizer serves as the processor

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.num_samples, a.seqlen), generator=g)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tiny_tokenizer(), dataset=ds, recipe=RECIPES[a.method], num_calibration_samples=a.num_samples,
            max_seq_length=a.seqlen)  # fmt: skip
    return {"method": a.method, "seconds": time.perf_counter() - t0, "shape": a.shape,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "num_samples": a.num_samples, "seqlen": a.seqlen}  # fmt: skip


def teacher_memory() -> list[str]:
    """One activation set (what the dense teacher stream holds) for 128 x 2048 calibration tokens."""
    rows = []
    for name, hidden in (("Llama-3-8B", 4096), ("Llama-3-70B", 8192)):
        n = 128 * 2048 * hidden
        rows.append(f"| {name} | {hidden} | {n * 2 / 2**30:.2f} GiB | {n * 4 / 2**30:.2f} GiB |")
    return ["| model | hidden | teacher bf16 | teacher fp32 |", "| --- | --- | --- | --- |", *rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--methods", default="sparsegpt,crepe_2of4,crepe_fast_2of4,crepe_best_2of4")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES), help="tiny: a seconds-long dry run of the script")
    ap.add_argument("--results", default="benchmarks/results/layer_cost.jsonl")
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.method:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        build(Path(tmp) / "layer", a.shape)
        for method in a.methods.split(","):
            cmd = [sys.executable, __file__, "--method", method, "--model", str(Path(tmp) / "layer"),
                   "--num-samples", str(a.num_samples), "--seqlen", str(a.seqlen), "--shape", a.shape]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if p.returncode or line is None:
                sys.exit(f"error: {method} failed:\n{p.stderr[-2000:]}")
            rows.append(json.loads(line[7:]))
            print(line[7:], flush=True)
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    with open(a.results, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    ref = next(r for r in rows if r["method"] == "sparsegpt")
    print(f"\none {'Llama-3-8B' if a.shape == '8b' else a.shape}-shaped decoder layer, 2:4, {a.num_samples} x {a.seqlen} calibration tokens, float32, this CPU\n")
    print("| method | wall s | / SparseGPT | peak RSS MB |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['seconds']:.1f} | {r['seconds'] / ref['seconds']:.2f} | {r['peak_rss_mb']:.0f} |")
    print("\ndense teacher stream, 128 x 2048 calibration tokens (one activation set, computed)\n")
    print("\n".join(teacher_memory()))


if __name__ == "__main__":
    main()
