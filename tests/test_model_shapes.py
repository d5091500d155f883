"""CRePE on the model shapes people compress: mixture-of-experts (tiny Mixtral and Qwen3-MoE,
experts fused 3-D in transformers 5), and 2:4 on the MLP projections only."""

import json
import shutil

import pytest
import torch

from crepe_plugin.cli import main
from crepe_plugin.core import is_nm

from .conftest import ROOT


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory, calib_file):
    from crepe_plugin.testing import save_tiny_moe

    d = tmp_path_factory.mktemp(request.param)
    dense = save_tiny_moe(d / "dense", arch=request.param)
    out = d / "pruned"
    assert main(["prune", str(dense), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib", str(calib_file),
                 "--out", str(out), "--num-samples", "8", "--seqlen", "64"]) == 0  # fmt: skip
    return request.param, dense, out


def _load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    return model, info


def test_moe_experts_are_pruned_and_reload_as_saved(moe):
    """Every expert of every layer is 2:4 in the fused 3-D tensors transformers loads back (no weight
    re-initialised), the router stays dense, and kept weights are the dense ones (names mapped right)."""
    arch, dense_dir, out = moe
    pruned, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    dense, _ = _load(dense_dir)
    for layer_p, layer_d in zip(pruned.model.layers, dense.model.layers):
        ep, ed = layer_p.mlp.experts, layer_d.mlp.experts
        for fused in ("gate_up_proj", "down_proj"):
            wp, wd = getattr(ep, fused), getattr(ed, fused)
            assert wp.dim() == 3
            for e in range(wp.shape[0]):  # (experts, out, in): N:M along `in`, per expert
                assert is_nm(wp[e], 2, 4), (arch, fused, e)
                assert abs(float((wp[e] == 0).float().mean()) - 0.5) < 1e-6
                kept = wp[e] != 0
                assert torch.equal(wp[e][kept], wd[e][kept]), (arch, fused, e)
        assert torch.equal(layer_p.mlp.gate.weight, layer_d.mlp.gate.weight)  # the router is dense
        assert is_nm(layer_p.self_attn.q_proj.weight, 2, 4)


def test_moe_record_names_the_saved_expert_tensors(moe, capsys):
    arch, _, out = moe
    record = json.loads((out / "config.json").read_text())["crepe_sparsity"]
    experts = [n for n in record["modules"] if ".experts." in n]
    assert len(experts) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    assert not any(n.endswith(".gate") for n in record["modules"])  # router not recorded
    if arch == "mixtral":  # Mixtral's own checkpoint layout: block_sparse_moe.experts.N.w1/w2/w3
        assert all(".block_sparse_moe.experts." in n and n.rsplit(".", 1)[1] in ("w1", "w2", "w3") for n in experts)
    assert main(["verify", str(out), "--require-record"]) == 0
    assert "OK: 32 recorded layers" in capsys.readouterr().out


def test_experts_without_calibration_tokens_get_the_weight_only_score(tmp_path, calib_file):
    """With llm-compressor's all-experts calibration turned off and top-1 routing over 8 experts,
    experts that see no token are still pruned 2:4 (weight-only score) and marked in the record."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crepe_plugin.data import calibration_dataset
    from crepe_plugin.testing import save_tiny_moe

    path = save_tiny_moe(tmp_path / "m", arch="qwen3_moe", experts=8, top_k=1, layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ds = calibration_dataset(str(calib_file), tok, 1, 3)
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=str(ROOT / "recipes" / "crepe_2of4.yaml"),
            num_calibration_samples=1, max_seq_length=3, moe_calibrate_all_experts=False)  # fmt: skip
    record = model.config.crepe_sparsity["modules"]
    idle = [n for n, m in record.items() if m.get("calibration")]
    assert idle and all(".experts." in n for n in idle)  # 3 tokens, top-1, 8 experts: some got none
    assert len([n for n in record if ".experts." in n]) == 8 * 3
    for lin in model.modules():
        if isinstance(lin, torch.nn.Linear) and lin.weight.shape[1] % 4 == 0 and lin is not model.lm_head:
            assert is_nm(lin.weight, 2, 4)


def test_mlp_only_recipe_keeps_attention_dense(tmp_path, tiny_model_dir, calib_file, capsys):
    out = tmp_path / "mlp"
    assert main(["prune", str(tiny_model_dir), "--recipe", str(ROOT / "recipes" / "crepe_2of4_mlp_only.yaml"),
                 "--calib", str(calib_file), "--out", str(out), "--num-samples", "4", "--seqlen", "64"]) == 0  # fmt: skip
    record = json.loads((out / "config.json").read_text())["crepe_sparsity"]
    assert sorted(record["modules"]) == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("down_proj", "gate_proj", "up_proj")]
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    assert all(float((sd[k] == 0).float().mean()) < 0.01 for k in sd if "self_attn" in k and k.endswith(".weight"))
    capsys.readouterr()
    assert main(["verify", str(out), "--require-record"]) == 0
    assert "OK: 6 recorded layers" in capsys.readouterr().out
    shutil.rmtree(out)


def test_vision_language_model_prunes_its_language_model_only(tmp_path, calib_file, capsys):
    """A tiny LLaVA pruned 2:4 on text alone: the language model is 2:4, the vision tower and the
    projector stay dense (the default ignore), the processor is saved, and the checkpoint loads
    in transformers whole, verifies, and evaluates."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from crepe_plugin.testing import save_tiny_llava

    dense = save_tiny_llava(tmp_path / "llava")
    out = tmp_path / "llava-2of4"
    assert main(["prune", str(dense), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib", str(calib_file),
                 "--out", str(out), "--num-samples", "4", "--seqlen", "64"]) == 0  # fmt: skip
    record = json.loads((out / "config.json").read_text())["crepe_sparsity"]["modules"]
    assert record and all("language_model." in n for n in record) and len(record) == 2 * 7  # as saved
    sd, sd0 = load_file(out / "model.safetensors"), load_file(dense / "model.safetensors")
    for k in sd:
        if ("vision_tower" in k or "multi_modal_projector" in k) and k.endswith("weight"):
            assert torch.equal(sd[k], sd0[k]), k
    assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "LlavaProcessor"
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info
    assert is_nm(model.model.language_model.layers[0].mlp.up_proj.weight, 2, 4)
    capsys.readouterr()
    assert main(["verify", str(out), "--require-record"]) == 0
    assert main(["eval", str(out), "--text", str(calib_file), "--seqlen", "32", "--max-segments", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"] > 1


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_channel_permutation_folds_through_every_expert(arch, tmp_path, calib_file):
    """ChannelPermutationModifier on a MoE permutes each expert's down_proj inputs through its own
    gate/up rows: with the pruner told to keep every layer dense, the permuted model computes
    exactly what the dense one does, and every expert was permuted."""
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crepe_plugin.data import calibration_dataset
    from crepe_plugin.testing import save_tiny_moe

    path = save_tiny_moe(tmp_path / "m", arch=arch)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("The tower is 324 metres tall.")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    recipe = ("s_stage:\n  s_modifiers:\n    ChannelPermutationModifier:\n      layers: ['down_proj']\n"
              "    CRePEPruningModifier:\n      mask_structure: '2:4'\n      sparsity: {default: 0.0}\n")  # fmt: skip
    oneshot(model=model, tokenizer=tok, dataset=calibration_dataset(str(calib_file), tok, 4, 64), recipe=recipe,
            num_calibration_samples=4, max_seq_length=64)  # fmt: skip
    with torch.no_grad():
        after = model(ids).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4), (before - after).abs().max()
    gains = model.config.crepe_sparsity["permuted"]["kept_importance_gain"]
    assert sorted(n for n in gains if ".experts." in n) == sorted(
        f"model.layers.{i}.mlp.experts.{e}.down_proj" for i in range(2) for e in range(4))  # fmt: skip
    assert all(g >= 0 for g in gains.values())


def test_vision_language_model_calibrates_on_images_and_text(tmp_path, calib_file):
    """--calib naming a dataset with an `image` column calibrates on the processor's image+text
    inputs (the image tokens reach the language model), and prunes the same layers."""
    import datasets
    import numpy as np
    from PIL import Image

    from crepe_plugin.data import image_text_dataset
    from crepe_plugin.models import load_processor
    from crepe_plugin.testing import save_tiny_llava

    dense = save_tiny_llava(tmp_path / "llava")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    datasets.Dataset.from_dict({"image": images, "text": ["a tower", "a bridge", "a river", "a field"]}).save_to_disk(
        str(tmp_path / "images"))  # fmt: skip
    proc = load_processor(str(dense))
    rows = image_text_dataset(str(tmp_path / "images"), proc, 4)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert len(rows) == 4 and all(r["input_ids"].count(image_id) == 16 for r in rows)  # (32 / 8)^2 patches
    assert "pixel_values" in rows.column_names
    assert image_text_dataset(str(calib_file), proc, 4) is None  # a text file: text calibration
    out = tmp_path / "llava-2of4"
    assert main(["prune", str(dense), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib",
                 str(tmp_path / "images"), "--out", str(out), "--num-samples", "4", "--seqlen", "64"]) == 0  # fmt: skip
    record = json.loads((out / "config.json").read_text())["crepe_sparsity"]["modules"]
    assert len(record) == 2 * 7 and all("language_model." in n for n in record)
    assert main(["verify", str(out), "--require-record"]) == 0


def test_verify_reads_a_fused_experts_tensor_per_expert(tmp_path, capsys):
    """An architecture that saves its experts fused, (experts, out, in) under one name: the
    record names the tensor, verify checks N:M along `in` for every expert and names a broken one."""
    from safetensors.torch import save_file

    w = torch.sign(torch.randn(4, 8, 16)) * (1 + torch.rand(4, 8, 16))
    w.view(4, 8, -1, 4)[..., :2] = 0
    name = "model.layers.0.mlp.experts.gate_up_proj"
    (tmp_path / "config.json").write_text(json.dumps(
        {"crepe_sparsity": {"method": "crepe", "structure": "2:4", "modules": {name: {"structure": "2:4"}}}}))  # fmt: skip
    save_file({name: w, "model.layers.0.mlp.gate.weight": torch.randn(4, 16)}, tmp_path / "model.safetensors")
    assert main(["verify", str(tmp_path), "--require-record"]) == 0
    assert "OK: 1 recorded layers" in capsys.readouterr().out
    w[3, 0, :4] = 1.0  # expert 3, row 0: a full group
    save_file({name: w, "model.layers.0.mlp.gate.weight": torch.randn(4, 16)}, tmp_path / "model.safetensors")
    assert main(["verify", str(tmp_path)]) == 1
    assert f"layer '{name}' is recorded as 2:4 but 1 groups violate it" in capsys.readouterr().err
