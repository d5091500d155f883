"""The `crepe` command on tiny models: prune, eval, verify; the perplexity protocol; checkpoints."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("llmcompressor")

from crepe_plugin.cli import main  # noqa: E402
from crepe_plugin.evaluate import perplexity  # noqa: E402
from crepe_plugin.pipeline import RecipeError, atomic_output, load_recipe  # noqa: E402
from crepe_plugin.checkpoint.record import RECORD_KEY  # noqa: E402
from crepe_plugin.checkpoint.verify import CheckpointError, unpack_int4, verify_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tiny_model_dir, calib_file):
    out = tmp_path_factory.mktemp("pruned") / "crepe-2of4"
    rc = main(
        [
            "prune", str(tiny_model_dir), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"),
            "--calib", str(calib_file), "--out", str(out), "--num-samples", "8", "--seqlen", "64",
        ]
    )  # fmt: skip
    assert rc == 0
    return out


def test_prune_writes_verified_checkpoint(pruned_dir, capsys):
    assert not any(p.name.startswith(".") for p in pruned_dir.parent.iterdir())  # no tmp left
    assert main(["verify", str(pruned_dir)]) == 0
    out = capsys.readouterr().out
    assert "record crepe 2:4 (14 layers)" in out and "OK" in out
    cfg = json.loads((pruned_dir / "config.json").read_text())
    assert cfg[RECORD_KEY]["method"] == "crepe"
    assert "quantization_config" not in cfg or not cfg["quantization_config"].get("sparsity_config")


def test_prune_refuses_existing_out_and_misnamed_recipe(pruned_dir, tiny_model_dir, calib_file, tmp_path, capsys):
    args = ["prune", str(tiny_model_dir), "--calib", str(calib_file), "--num-samples", "4", "--seqlen", "32"]
    assert main(args + ["--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--out", str(pruned_dir)]) == 2
    assert "exists" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsity:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n")
    assert main(args + ["--recipe", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "top-level key 'sparsity' does not end in '_stage'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(RecipeError):
        load_recipe(bad)


def test_invalid_recipe_value_is_one_line_error(tiny_model_dir, calib_file, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("s_stage:\n  s_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '3:2'\n")
    rc = main(["prune", str(tiny_model_dir), "--recipe", str(bad), "--calib", str(calib_file), "--out", str(tmp_path / "o")])
    assert rc == 2 and "0 < N < M" in capsys.readouterr().err


def test_eval_cli_on_pruned_and_dense(pruned_dir, tiny_model_dir, calib_file, capsys):
    assert main(["eval", str(tiny_model_dir), "--text", str(calib_file), "--seqlen", "64", "--max-segments", "4", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert main(["eval", str(pruned_dir), "--text", str(calib_file), "--seqlen", "64", "--max-segments", "4", "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert math.isfinite(dense) and math.isfinite(pruned) and pruned != dense


def test_perplexity_matches_straightforward_reference(tiny_model_dir, calib_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = calib_file.read_text()[:5000]
    ids = tok(text, return_tensors="pt").input_ids[0]
    seqlen, nseg = 50, 5
    nlls = []
    with torch.no_grad():
        for i in range(nseg):
            seg = ids[i * seqlen : (i + 1) * seqlen]
            logp = torch.log_softmax(model(seg[None]).logits[0].double(), -1)
            nlls.append(-logp[torch.arange(seqlen - 1), seg[1:]].mean())
    ref = math.exp(float(torch.stack(nlls).mean()))
    ours = perplexity(model, tok, text, seqlen, nseg, progress=False)
    assert abs(ours - ref) / ref < 1e-4


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_verify_catches_layer_not_2of4(pruned_dir, tmp_path):
    d = _copy(pruned_dir, tmp_path / "broken")
    t = load_file(d / "model.safetensors")
    k = "model.layers.1.mlp.up_proj.weight"
    t[k] = t[k].clone()
    t[k][0, :4] = 1.0  # one group fully dense
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    rep = verify_checkpoint(d)
    assert not rep.ok and any("model.layers.1.mlp.up_proj" in e for e in rep.errors)
    assert main(["verify", str(d)]) == 1


def test_verify_catches_truncated_and_incomplete(pruned_dir, tmp_path):
    d = _copy(pruned_dir, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(d)
    assert main(["verify", str(d)]) == 2
    d2 = _copy(pruned_dir, tmp_path / "nocfg")
    (d2 / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        verify_checkpoint(d2)
    d3 = _copy(pruned_dir, tmp_path / "marked")
    (d3 / ".crepe-incomplete").write_text("x")
    with pytest.raises(CheckpointError, match="incomplete"):
        verify_checkpoint(d3)


def test_verify_record_without_weight(pruned_dir, tmp_path):
    d = _copy(pruned_dir, tmp_path / "rec")
    cfg = json.loads((d / "config.json").read_text())
    cfg[RECORD_KEY]["modules"]["model.layers.9.mlp.up_proj"] = {"structure": "2:4", "sparsity": 0.5}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no weight"):  # incomplete checkpoint: `crepe verify` exits 2
        verify_checkpoint(d)


def _record_cfg(d: Path, name: str):
    (d / "config.json").write_text(
        json.dumps({RECORD_KEY: {"method": "crepe", "structure": "2:4", "modules": {name: {"structure": "2:4"}}}})
    )


def _two_four(rows=8, cols=16):
    w = torch.sign(torch.randn(rows, cols)) * (1 + torch.rand(rows, cols))  # no accidental zeros
    w.view(rows, -1, 4)[..., :2] = 0
    return w


def test_verify_fp8_and_int8(tmp_path):
    w = _two_four()
    for fmt, tensors in {
        "fp8": {"l.weight": w.to(torch.float8_e4m3fn), "l.weight_scale": torch.ones(8, 1)},
        "int8": {"l.weight": (w * 10).round().clamp(-127, 127).to(torch.int8), "l.weight_scale": torch.ones(8, 1)},
    }.items():
        d = tmp_path / fmt
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        _record_cfg(d, "l")
        rep = verify_checkpoint(d)
        assert rep.ok and rep.layers[0].fmt == fmt and rep.layers[0].density == 0.5
        bad = dict(tensors)
        bad["l.weight"] = bad["l.weight"].clone()
        bad["l.weight"].view(torch.int8)[0, 0] = 5
        save_file(bad, d / "model.safetensors")
        assert not verify_checkpoint(d).ok


def _pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Reference packer (compressed-tensors layout): 8 nibbles per int32, value + 8."""
    u = (q.to(torch.int32) + 8) & 0xF
    u = u.reshape(q.shape[0], -1, 8)
    packed = torch.zeros(u.shape[:2], dtype=torch.int64)
    for i in range(8):
        packed |= u[..., i].to(torch.int64) << (4 * i)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def test_verify_packed_int4(tmp_path):
    q = (torch.randint(-8, 8, (8, 32))).to(torch.int8)
    q.view(8, -1, 4)[..., :2] = 0
    assert torch.equal(unpack_int4(_pack_int4(q), (8, 32)), q)
    d = tmp_path / "int4"
    d.mkdir()
    save_file({"l.weight_packed": _pack_int4(q), "l.weight_shape": torch.tensor([8, 32]), "l.weight_scale": torch.ones(8, 1)}, d / "model.safetensors")
    _record_cfg(d, "l")
    rep = verify_checkpoint(d)
    assert rep.ok and rep.layers[0].fmt == "int4-packed"
    q[0, 0:2] = 3
    save_file({"l.weight_packed": _pack_int4(q), "l.weight_shape": torch.tensor([8, 32]), "l.weight_scale": torch.ones(8, 1)}, d / "model.safetensors")
    assert not verify_checkpoint(d).ok


def test_atomic_output_interrupted_leaves_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_help_shows_examples():
    r = subprocess.run([sys.executable, "-m", "crepe_plugin.cli", "--help"], capture_output=True, text=True, env={**os.environ})
    assert r.returncode == 0 and "examples:" in r.stdout and "crepe prune" in r.stdout


def test_calibration_from_local_dataset_dir(tmp_path, tiny_model_dir, calib_file):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from crepe_plugin.data import calibration_dataset, read_text

    d = tmp_path / "ds"
    text = calib_file.read_text()
    Dataset.from_dict({"text": [text[i : i + 2000] for i in range(0, 20000, 2000)]}).save_to_disk(str(d))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = calibration_dataset(str(d), tok, num_samples=4, seqlen=32)
    assert len(ds) == 4 and all(len(r) == 32 for r in ds["input_ids"])
    assert read_text(str(d)).startswith(text[:100])
    with pytest.raises(ValueError, match="fewer than --seqlen"):
        calibration_dataset(str(d), tok, num_samples=2, seqlen=10**7)
