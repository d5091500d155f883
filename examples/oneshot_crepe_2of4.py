"""One-shot CRePE 2:4 pruning with llm-compressor, shaped like llm-compressor's examples.

    python examples/oneshot_crepe_2of4.py                       # embedded SmolLM2-135M, local WikiText-2
    python examples/oneshot_crepe_2of4.py --model meta-llama/Llama-3.2-1B --dataset wikitext:wikitext-2-raw-v1

Importing crepe_plugin registers CRePEPruningModifier / RIAPruningModifier with
llm-compressor, so the YAML recipe below is all it takes.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import crepe_plugin  # noqa: F401  registers the modifiers
from crepe_plugin.data import calibration_dataset, wikitext_file
from crepe_plugin.pipeline import resolve_model
from llmcompressor import oneshot

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "crepe_2of4.yaml"

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", help="local dir, hub name, or 'smollm2'")
    ap.add_argument("--dataset", default=None, help="text file, local dataset, or hub 'name[:config]'")
    ap.add_argument("--num-samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    model_id = resolve_model(a.model)
    model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_id)
    source = a.dataset or str(wikitext_file("wiki.valid.tokens.txt") or "wikitext:wikitext-2-raw-v1")
    ds = calibration_dataset(source, tokenizer, a.num_samples, a.seqlen)

    oneshot(model=model, dataset=ds, tokenizer=tokenizer, recipe=str(RECIPE),
            num_calibration_samples=a.num_samples, max_seq_length=a.seqlen)  # fmt: skip

    out = a.out or f"{Path(model_id).name}-crepe-2of4"
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(f"saved {out}; check it with: crepe verify {out}")
