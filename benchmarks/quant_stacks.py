"""Perplexity of CRePE 2:4 stacked with quantization, next to CRePE 2:4 alone and dense.

A preset of benchmarks/recipe_table.py (see there).

usage:
  python benchmarks/quant_stacks.py --model smollm2 \
      --calib ../shared/data/wikitext2/wiki.valid.tokens.txt \
      --eval ../shared/data/wikitext2/wiki.test.raw.txt --out /tmp/stacks
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_table import main  # noqa: E402

# W4A16 at group 64: SmolLM2's 576-wide layers are not divisible by 128
RECIPES = ["crepe_2of4.yaml", "crepe_2of4_fp8_dynamic.yaml", "crepe_2of4_w8a8_int8.yaml", "crepe_2of4_w4a16_g64.yaml"]

if __name__ == "__main__":
    main(RECIPES, "benchmarks/results/quant_stacks.jsonl")
