"""Bad input: every case ends in exit 2 and one `error:` line that names what is wrong,
never a traceback, a plausible wrong number or an output directory."""

import pytest
import torch

from crepe_plugin.cli import main

from .conftest import ROOT, SHARED_DATA

GOOD = (ROOT / "recipes" / "crepe_2of4.yaml").read_text()
TEST_TEXT = SHARED_DATA / "wikitext2" / "wiki.test.raw.txt"

RECIPES = {
    "misspelled stage": (GOOD + "quant_stag:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n", "'quant_stag'"),
    "misspelled group": (GOOD + "quant_stage:\n  quant_modifers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n", "quant_modifers"),
    "unquoted 2:4": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: 2:4\n", "quote it"),
    "invalid yaml": ("sparsity_stage:\n  sparsity_modifiers: [\n", "not valid YAML"),
    "empty": ("\n", "is empty"),
    "misspelled modifier": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruninModifier:\n      mask_structure: '2:4'\n", "CRePEPruningModifier"),
    "degenerate score": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
                         "      row_coef: 0\n      col_coef: 0\n", "row_coef"),
    "adaptive without reconstruction": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n"
                                        "      mask_structure: '2:4'\n      mask_selection: adaptive\n", "reconstruct"),
}  # fmt: skip


def _one_error(capsys, expect: str):
    err = capsys.readouterr().err.strip().splitlines()
    noise = ("WARNING", "| INFO", "it/s]", "s/it]")  # log lines and progress bars are not messages
    err = [line for line in err if line.strip() and not any(x in line for x in noise)]
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and expect in err[0], err[0]


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipe(case, tmp_path, tiny_model_dir, calib_file, capsys):
    text, expect = RECIPES[case]
    r = tmp_path / "r.yaml"
    r.write_text(text)
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--recipe", str(r), "--calib", str(calib_file), "--out", str(out),
                 "--num-samples", "2", "--seqlen", "16"]) == 2  # fmt: skip
    _one_error(capsys, expect)
    assert not out.exists()


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--num-samples", "0"], "--num-samples"),
        (["--seqlen", "-8"], "--seqlen"),
        (["--calib-override", "/nonexistent/calib.txt"], "no such file"),
        (["--calib-override", "{empty}"], "is empty"),
        (["--calib-override", "{calib}[0.9:0.1]"], "slice"),
        (["--seqlen", "100000"], "fewer than --seqlen"),
    ],
)
def test_bad_prune_arguments(args, expect, tmp_path, tiny_model_dir, calib_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    calib = str(calib_file)
    if args[0] == "--calib-override":
        calib, args = args[1].format(empty=empty, calib=calib_file), []
    out = tmp_path / "out"
    argv = ["prune", str(tiny_model_dir), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib", calib,
            "--out", str(out), "--num-samples", "2", "--seqlen", "16", *args]  # fmt: skip
    assert main(argv) == 2
    _one_error(capsys, expect)
    assert not out.exists()


@pytest.mark.parametrize(
    "args,expect", [(["--seqlen", "1"], "--seqlen"), (["--seqlen", "0"], "--seqlen"), (["--max-segments", "-1"], "--max-segments")]
)
def test_bad_eval_arguments(args, expect, tiny_model_dir, calib_file, capsys):
    assert main(["eval", str(tiny_model_dir), "--text", str(calib_file), *args]) == 2
    _one_error(capsys, expect)


def test_eval_refuses_a_checkpoint_with_a_missing_tensor(tmp_path, tiny_model_dir, calib_file, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.0.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert main(["eval", str(d), "--text", str(calib_file), "--seqlen", "32", "--max-segments", "1"]) == 2
    _one_error(capsys, "down_proj")


def test_eval_refuses_a_nan_perplexity(tmp_path, tiny_model_dir, calib_file, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert main(["eval", str(d), "--text", str(calib_file), "--seqlen", "32", "--max-segments", "1"]) == 2
    _one_error(capsys, "non-finite")


def test_tuning_on_the_test_text_is_refused(tmp_path, capsys):
    assert main(["search-validate", str(tmp_path), "--eval", str(TEST_TEXT)]) == 2
    _one_error(capsys, "test text")


def test_degenerate_score_is_refused_in_python_too():
    from pydantic import ValidationError

    from crepe_plugin.core import CRePEConfig

    with pytest.raises(ValidationError, match="both 0"):
        CRePEConfig(row_coef=0.0, col_coef=0.0)
    assert torch.isfinite(torch.tensor(CRePEConfig(row_coef=0.0, col_coef=1.0).col_coef))


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--bounds", "{row_coef: 1"], "--bounds is not valid JSON"),
        (["--bounds", "[1, 2]"], "--bounds must be a JSON object"),
        (["--layers", "0"], "--layers"),
        (["--layers", "two"], "--layers"),
        (["--trials", "0"], "--trials"),
    ],
)
def test_bad_search_arguments(args, expect, tmp_path, tiny_model_dir, calib_file, capsys):
    argv = ["search", str(tiny_model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "s"), *args]
    assert main(argv) == 2
    _one_error(capsys, expect)


def test_eval_refuses_a_truncated_checkpoint(tmp_path, tiny_model_dir, calib_file, capsys):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["eval", str(d), "--text", str(calib_file), "--seqlen", "32", "--max-segments", "1"]) == 2
    _one_error(capsys, "cannot load")


@pytest.mark.parametrize("cmd", ["eval", "prune"])
def test_a_directory_that_is_not_a_model(cmd, tmp_path, calib_file, capsys):
    d = tmp_path / "notamodel"
    d.mkdir()
    (d / "README.md").write_text("hello")
    argv = {
        "eval": ["eval", str(d), "--text", str(calib_file)],
        "prune": ["prune", str(d), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib", str(calib_file),
                  "--out", str(tmp_path / "out")],
    }[cmd]  # fmt: skip
    assert main(argv) == 2
    _one_error(capsys, "not a model directory")


def test_gpt2_conv1d_layers_are_pruned_along_their_inputs(tmp_path, calib_file):
    """transformers' Conv1D stores (in, out); a square one (attn.c_proj) must not come back
    transposed. The pruned model must compute exactly the dense model with its mask applied."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from crepe_plugin import is_nm
    from crepe_plugin.testing import save_tiny_gpt2, tiny_tokenizer
    from crepe_plugin.checkpoint.verify import verify_checkpoint

    src = save_tiny_gpt2(tmp_path / "gpt2")
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib", str(calib_file),
                 "--out", str(out), "--num-samples", "4", "--seqlen", "64"]) == 0  # fmt: skip
    rep = verify_checkpoint(out)
    assert rep.ok, rep.errors
    rec = rep.record["modules"]
    assert "transformer.h.0.attn.c_proj" in rec and rec["transformer.h.0.attn.c_proj"]["layout"] == "in_out"
    pruned_sd = load_file(out / "model.safetensors")
    for name in rec:
        assert is_nm(pruned_sd[name + ".weight"].t(), 2, 4), name  # 2:4 along the inputs
    dense = AutoModelForCausalLM.from_pretrained(src).eval()
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        for name in rec:
            w = dense.get_submodule(name).weight
            w.mul_((pruned_sd[name + ".weight"] != 0).to(w.dtype))
        ids = tiny_tokenizer()("the tower is tall", return_tensors="pt").input_ids
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits)


# ---------------------------------------------------------------- output directories
def test_stale_incomplete_temporaries_are_removed(tmp_path):
    from crepe_plugin.pipeline import INCOMPLETE_MARKER, atomic_output

    out = tmp_path / "ckpt"
    stale = tmp_path / ".ckpt.tmp-99999"
    stale.mkdir()
    (stale / INCOMPLETE_MARKER).write_text("x")
    with atomic_output(out) as tmp:
        (tmp / "f").write_text("new")
    assert (out / "f").read_text() == "new" and not stale.exists()
    assert not list(tmp_path.glob(".ckpt.*"))


def test_crash_between_the_two_renames_keeps_a_checkpoint(tmp_path):
    from crepe_plugin.pipeline import atomic_output

    out = tmp_path / "ckpt"
    # what a run killed after moving the old checkpoint aside, before moving the new one in, leaves
    old = tmp_path / ".ckpt.old-99999"
    old.mkdir()
    (old / "f").write_text("old")
    new = tmp_path / ".ckpt.tmp-99999"
    new.mkdir()
    (new / "f").write_text("new, complete")
    atomic_output(out, overwrite=True)  # the next run starts by recovering
    assert (out / "f").read_text() == "old" and not old.exists()


def test_sigterm_leaves_no_output(tmp_path, tiny_model_dir, calib_file):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "crepe_plugin.cli", "prune", str(tiny_model_dir), "--recipe",
                          str(ROOT / "recipes" / "crepe_2of4_reconstruct.yaml"), "--calib", str(calib_file), "--out",
                          str(out), "--num-samples", "64", "--seqlen", "128"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "interrupted" in err.strip().splitlines()[-1]
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_search_ignores_a_layer_not_divisible_by_m(tmp_path, calib_file, capsys):
    """A layer whose input width is not divisible by M: search names it and says to ignore it;
    --ignore then lets the search run."""
    from crepe_plugin.testing import save_tiny_llama

    model = save_tiny_llama(tmp_path / "odd", hidden=64, intermediate=126)  # down_proj has 126 inputs
    argv = ["search", str(model), "--calib", str(calib_file), "--trials", "2", "--layers", "1", "--num-samples", "2",
            "--seqlen", "32", "--proxy", "diag"]  # fmt: skip
    assert main(argv + ["--out", str(tmp_path / "s1")]) == 2
    _one_error(capsys, "down_proj")
    assert main(argv + ["--out", str(tmp_path / "s2"), "--ignore", "lm_head", "re:.*down_proj"]) == 0


MORE = [  # (argv, expect): {model} {calib} {tmp} {recipe} are filled in
    (["verify", "{tmp}/nope"], "not a directory"),
    (["prune", "{model}", "--recipe", "{tmp}/nope.yaml", "--calib", "{calib}", "--out", "{tmp}/o"], "no such file"),
    (["prune", "{model}", "--recipe", "{recipe}", "--calib", "{calib}", "--out", "{model}"], "pass --overwrite"),
    (["eval", "{model}", "--text", "{tmp}/nope.txt"], "no such file or directory"),
    (["eval", "{model}", "--text", "{calib}", "--seqlen", "-64"], "--seqlen"),
    (["search", "{model}", "--calib", "{calib}", "--structure", "2:x", "--out", "{tmp}/s"], "is not 'N:M'"),
    (["search", "{model}", "--calib", "{calib}", "--structure", "0:0", "--out", "{tmp}/s"], "--sparsity is required"),
    (["search", "{model}", "--calib", "{calib}", "--structure", "2:4", "--sparsity", "0.7", "--out", "{tmp}/s"],
     "contradicts --structure"),
    (["search", "{model}", "--calib", "{calib}", "--structure", "0:0", "--sparsity", "1.5", "--out", "{tmp}/s"],
     "strictly between 0 and 1"),
    (["search-validate", "{tmp}", "--proxies", "diag,foo"], "--proxies takes"),
    (["search-validate", "{tmp}"], "holds no search result"),
    (["serve-check", "{model}", "--tensor-parallel-size", "0"], "--tensor-parallel-size"),
]  # fmt: skip


@pytest.mark.parametrize("argv,expect", MORE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in MORE])
def test_more_bad_arguments(argv, expect, tmp_path, tiny_model_dir, calib_file, capsys):
    fill = {"model": tiny_model_dir, "calib": calib_file, "tmp": tmp_path, "recipe": ROOT / "recipes" / "crepe_2of4.yaml"}
    listing = sorted(tmp_path.iterdir())
    assert main([a.format(**fill) for a in argv]) == 2
    _one_error(capsys, expect)
    assert sorted(tmp_path.iterdir()) == listing  # nothing written


def test_ctrl_c_during_start_up_prints_interrupted(tmp_path, tiny_model_dir, calib_file):
    """SIGINT while the heavy imports (torch, llm-compressor) are still loading: no traceback."""
    import signal
    import subprocess
    import sys
    import time

    p = subprocess.Popen([sys.executable, "-m", "crepe_plugin.cli", "prune", str(tiny_model_dir), "--recipe",
                          str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib", str(calib_file), "--out",
                          str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(1.0)  # llm-compressor alone takes several seconds to import here
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert not (tmp_path / "out").exists()


def test_seqlen_and_window_warnings_come_from_one_place(calib_file):
    """--seqlen beyond the model's positions warns once; too few distinct windows warns."""
    from loguru import logger

    from crepe_plugin.data import calibration_dataset
    from crepe_plugin.testing import tiny_tokenizer

    lines = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        tok = tiny_tokenizer()
        calibration_dataset(str(calib_file), tok, num_samples=2, seqlen=64, max_positions=32)
        calibration_dataset(str(calib_file), tok, num_samples=10**5, seqlen=64)
    finally:
        logger.remove(sink)
    assert sum("beyond the model's max_position_embeddings 32" in x for x in lines) == 1, lines
    assert sum("windows will overlap" in x for x in lines) == 1, lines


def test_readme_lists_every_refusal():
    """The README's 'What each command refuses' table is checked against the cases above."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("### What each command refuses") : text.index("## Serving in vLLM")]
    src = (ROOT / "tests" / "test_bad_input.py").read_text()
    fragments = {e for _, e in RECIPES.values()}
    fragments |= set(re.findall(r'\],\s*"([^"]+)"\)', src))  # the (args, expect) tables
    missing = sorted(f for f in fragments if f not in section)
    assert not missing, missing
