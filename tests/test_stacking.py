"""Pruning stacked with quantization: the 2:4 pattern survives every recipe."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import crepe_plugin  # noqa: F401
from crepe_plugin.core import PruningError
from crepe_plugin.testing import save_tiny_llama, tiny_tokenizer
from crepe_plugin.checkpoint.verify import verify_checkpoint

from .conftest import calib_dataset

pytest.importorskip("llmcompressor")
from llmcompressor import oneshot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {
    "crepe_2of4_fp8_dynamic.yaml": "fp8",
    "crepe_2of4_w8a8_int8.yaml": "int8",
    "crepe_2of4_w4a16.yaml": "int4-packed",
    "crepe_2of4_w4a16_g64.yaml": "int4-packed",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 128-wide so that W4A16's group size 128 divides every input dimension
    return save_tiny_llama(tmp_path_factory.mktemp("m") / "tiny", hidden=128, intermediate=256, heads=2, kv_heads=1)


def _run(model, recipe, out=None):
    return oneshot(
        model=str(model), tokenizer=tiny_tokenizer(), dataset=calib_dataset(8), recipe=recipe,
        num_calibration_samples=8, max_seq_length=128, output_dir=str(out) if out else None,
    )  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(FORMATS))
def test_stack_keeps_exact_2of4(model_dir, tmp_path, recipe):
    out = tmp_path / "o"
    _run(model_dir, str(ROOT / "recipes" / recipe), out)
    rep = verify_checkpoint(out)
    assert rep.ok, rep.errors
    pruned = [l for l in rep.layers if l.recorded]
    assert len(pruned) == 14 and all(l.nm_ok for l in pruned)
    assert {l.fmt for l in pruned} == {FORMATS[recipe]}
    assert all(l.density <= 0.5 for l in pruned)


def test_plain_gptq_after_pruning_is_refused(model_dir):
    recipe = (
        "s_stage:\n  s_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
        "q_stage:\n  q_modifiers:\n    GPTQModifier:\n      scheme: W4A16\n      targets: ['Linear']\n      ignore: ['lm_head']\n"
    )
    with pytest.raises(PruningError, match="MaskedGPTQModifier"):
        _run(model_dir, recipe)


def test_quantize_before_prune_is_refused(model_dir):
    recipe = (
        "q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n      targets: ['Linear']\n"
        "s_stage:\n  s_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
    )
    with pytest.raises(PruningError, match="pruning stage first"):
        _run(model_dir, recipe)


def test_masked_gptq_keeps_zeros_where_plain_gptq_refills(tmp_path, model_dir):
    """On an already 2:4 checkpoint, GPTQModifier refills pruned weights; MaskedGPTQModifier does not."""
    pruned = tmp_path / "pruned"
    _run(model_dir, str(ROOT / "recipes" / "crepe_2of4.yaml"), pruned)
    gptq = "q_stage:\n  q_modifiers:\n    {}:\n      scheme: W8A8\n      targets: ['Linear']\n      ignore: ['lm_head']\n"
    plain_out, masked_out = tmp_path / "plain", tmp_path / "masked"
    _run(pruned, gptq.format("GPTQModifier"), plain_out)
    _run(pruned, gptq.format("MaskedGPTQModifier"), masked_out)
    assert not verify_checkpoint(plain_out).ok  # the failure mode the plugin prevents
    rep = verify_checkpoint(masked_out)
    assert rep.ok and all(l.nm_ok for l in rep.layers if l.recorded)
    # it is still GPTQ: INT8 weights, not a copy of the pruned floats
    w = load_file(masked_out / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.int8


def test_eval_reads_quantized_checkpoint(model_dir, tmp_path, calib_file, capsys):
    """`crepe eval` loads a compressed-tensors FP8 checkpoint (decompressed by transformers)."""
    import json

    from crepe_plugin.cli import main

    out = tmp_path / "fp8"
    _run(model_dir, str(ROOT / "recipes" / "crepe_2of4_fp8_dynamic.yaml"), out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "float-quantized"
    assert main(["eval", str(out), "--text", str(calib_file), "--seqlen", "64", "--max-segments", "2"]) == 0
    ppl = float(capsys.readouterr().out.split("perplexity ")[1].split()[0])
    assert 1 < ppl < 1e6
