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
    "zero in a list of learning rates": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n"
                                         "      mask_structure: '2:4'\n      local_reconstruction:\n        lr: [1.0e-3, 0]\n",
                                         "local_reconstruction.lr: Value error, each learning rate must be in (0, 1], not 0.0"),
    "a trial fraction above 1": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n"
                                 "      mask_structure: '2:4'\n      local_reconstruction:\n        lr: [1.0e-3, 1.0e-4]\n"
                                 "        trial: 1.5\n", "local_reconstruction.trial: Input should be less than or equal to 1"),
    "no tokens for the MLP": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n"
                              "      mask_structure: '2:4'\n      local_reconstruction:\n        mlp_tokens: 0\n",
                              "local_reconstruction.mlp_tokens: Input should be greater than 0"),
    "MLP tokens without a pruned MLP": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n"
                                        "      mask_structure: '2:4'\n      targets: ['re:.*self_attn.*']\n"
                                        "      local_reconstruction:\n        mlp_tokens: 0.5\n",
                                        "mlp_tokens runs 'model.layers.0.self_attn' on a subset of tokens, but it is called "
                                        "with more than its hidden states"),
    "an unknown attention choice": ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n"
                                    "      mask_structure: '2:4'\n      local_reconstruction:\n        attention: frozen\n",
                                    "local_reconstruction.attention: Input should be 'all' or 'output'"),
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

    from crepe_plugin.core import CRePEConfig, crepe_scores

    with pytest.raises(ValidationError, match="both 0"):
        CRePEConfig(row_coef=0.0, col_coef=0.0)
    W, s = torch.rand(8, 16) + 0.1, torch.rand(16) + 0.1  # one zero coefficient is fine: the column term alone
    want = W / W.sum(dim=0, keepdim=True) * torch.sqrt(s) ** 0.5
    assert torch.allclose(crepe_scores(W, s, CRePEConfig(row_coef=0.0, col_coef=1.0)), want)


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
    (["prune", "{model}", "--recipe", "{recipe}", "--calib", "{calib}", "--out", "{model}"], "is the source model"),
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
    def torch_loaded():  # `crepe prune` is then past argument parsing, into its imports (llm-compressor: seconds more)
        try:
            with open(f"/proc/{p.pid}/maps") as fh:
                return "libtorch" in fh.read()
        except OSError:
            return False

    deadline = time.time() + 120
    while p.poll() is None and time.time() < deadline and not torch_loaded():
        time.sleep(0.02)
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
    fragments |= {expect for *_, expect in VERIFY_CASES.values()} | {e for _, e in RECIPES_R2.values()}
    missing = sorted(f for f in fragments if f not in section)
    assert not missing, missing


# ---------------------------------------------------------------- round 2: output folders (issue 23)
# A layout a careful user has: a working directory holding their notes, the source model with a note
# of its own, the calibration text, a recipe, a folder of their own, an earlier search, a file.
# Every refusal leaves every byte of it as it was, and writes nothing anywhere.


def _tree(root):
    """{relative path: bytes (files) or None (folders)} of everything under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*"))}  # fmt: skip


@pytest.fixture
def world(tmp_path, tiny_model_dir, calib_file, monkeypatch):
    import shutil

    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    (work / "notes.md").write_text("my notes")
    model = home / "models" / "tiny"
    shutil.copytree(tiny_model_dir, model)
    (model / "NOTES.md").write_text("where this model came from")
    (home / "models" / "list.txt").write_text("tiny")
    shutil.copy(calib_file, work / "calib.txt")
    shutil.copy(ROOT / "recipes" / "crepe_2of4.yaml", work / "recipe.yaml")
    (work / "mine").mkdir()
    (work / "mine" / "draft.txt").write_text("draft")
    (work / "pho-run").mkdir()
    (work / "pho-run" / "best_energy.json").write_text("{}")
    (work / "pho-run" / "pho.db").write_bytes(b"SQLite format 3\x00")
    (work / "a-file").write_text("not a folder")
    (work / "empty").mkdir()
    monkeypatch.chdir(work)
    return {"root": tmp_path, "home": home, "work": work, "model": model}


_P = ["prune", "{model}", "--recipe", "recipe.yaml", "--calib", "calib.txt", "--num-samples", "2", "--seqlen", "16"]
_S = ["search", "{model}", "--calib", "calib.txt", "--trials", "1", "--layers", "1", "--num-samples", "2", "--seqlen", "16"]
OUTPUT_TARGETS = [  # (argv, expect); run in {work}, the model is {model} = {home}/models/tiny
    ([*_P, "--out", ".", "--overwrite"], "is the working directory"),
    ([*_P, "--out", "", "--overwrite"], "--out is empty"),
    ([*_P, "--out", "..", "--overwrite"], "holds the working directory"),
    ([*_P, "--out", "{model}", "--overwrite"], "is the source model"),
    ([*_P, "--out", "{home}/models", "--overwrite"], "contains the source model"),
    ([*_P, "--out", "{model}/pruned"], "lies inside the source model"),
    ([*_P, "--out", "calib.txt", "--overwrite"], "is the calibration text"),
    ([*_P, "--out", "pho-run", "--overwrite"], "is a `crepe search` folder"),
    ([*_P, "--out", "mine", "--overwrite"], "not an earlier crepe output"),
    ([*_P, "--out", "a-file", "--overwrite"], "is not a directory"),
    ([*_P, "--out", "mine"], "not an earlier crepe output"),
    ([*_P, "--out", "empty"], "pass --overwrite"),
    ([*_S, "--out", "{model}"], "is the source model"),
    ([*_S, "--out", "{home}/models"], "contains the source model"),
    ([*_S, "--out", "mine"], "holds files that are not from a crepe search"),
    ([*_S, "--out", ""], "--out is empty"),
    ([*_S, "--out", "a-file"], "is not a directory"),
]  # fmt: skip


def _fill(argv, world):
    return [a.format(**{k: v for k, v in world.items() if k != "root"}) for a in argv]


@pytest.mark.parametrize("argv,expect", OUTPUT_TARGETS, ids=[f"{a[0]} --out {a[a.index('--out') + 1]!r}{' --overwrite' if '--overwrite' in a else ''}" for a, _ in OUTPUT_TARGETS])  # fmt: skip
def test_an_output_target_that_would_destroy_files_is_refused(argv, expect, world, capsys):
    before = _tree(world["root"])
    assert main(_fill(argv, world)) == 2
    _one_error(capsys, expect)
    assert _tree(world["root"]) == before  # every byte as it was, nothing written


def test_search_into_a_model_directory_is_refused(tmp_path, tiny_model_dir, calib_file, capsys):
    """A model folder that is not an input of this search: the statistics would sit beside its weights."""
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    before = _tree(tmp_path)
    assert main(["search", str(tiny_model_dir), "--calib", str(calib_file), "--out", str(other)]) == 2
    _one_error(capsys, "holds a model (config.json)")
    assert _tree(tmp_path) == before


def test_overwrite_replaces_an_earlier_output_and_an_empty_folder(world, capsys):
    argv = _fill(_P, world)
    assert main([*argv, "--out", "out"]) == 0
    first = _tree(world["work"] / "out")
    assert ".crepe-output" in first
    assert main([*argv, "--out", "out", "--overwrite", "--seed", "1"]) == 0  # ours: replaced
    assert _tree(world["work"] / "out") != first
    assert main([*argv, "--out", "empty", "--overwrite"]) == 0  # empty: replaced
    assert (world["work"] / "empty" / "model.safetensors").is_file()
    from crepe_plugin.checkpoint.verify import verify_checkpoint

    assert verify_checkpoint(world["work"] / "out").ok and verify_checkpoint(world["work"] / "empty").ok
    assert not [p for p in world["work"].iterdir() if p.name.startswith(".")]  # no temporary left


def test_output_targets_property(tmp_path, tiny_model_dir, calib_file, monkeypatch, capsys):
    """Random layouts of source model, working directory and --out (the same, a parent, a child, a
    sibling, '.', '..', empty, new, an earlier output, a user folder), with and without --overwrite:
    each run refuses without touching anything, or writes only --out (and it verifies)."""
    import os
    import random
    import shutil

    from crepe_plugin.checkpoint.verify import verify_checkpoint

    tmp_path = tmp_path.resolve()
    rng = random.Random(23)
    outcomes = {0: 0, 2: 0}
    for case in range(24):
        root = tmp_path / f"c{case}"
        depth = rng.randint(1, 3)
        model = root.joinpath(*[f"d{i}" for i in range(depth)], "model")
        shutil.copytree(tiny_model_dir, model)
        (model.parent / "keep.txt").write_text(f"case {case}")
        cwd = rng.choice([root, model.parent, model, root / "elsewhere", model.parent / "sib"])
        cwd.mkdir(parents=True, exist_ok=True)
        (cwd / "mine.txt").write_text("user file")
        earlier = root / "earlier"
        earlier.mkdir()
        (earlier / ".crepe-output").write_text("x")
        (earlier / "config.json").write_text("{}")
        rel = lambda p: os.path.relpath(p, cwd)  # noqa: E731
        out = rng.choice([str(model), str(model.parent), str(model / "child"), str(model.parent / "sibling"), ".",
                          "..", "", rel(model), rel(model.parent), rel(root / "new" / "deeper"), str(earlier),
                          rel(cwd / "mine.txt"), str(root)])  # fmt: skip
        overwrite = rng.random() < 0.7
        before = _tree(root)
        monkeypatch.chdir(cwd)
        argv = ["prune", str(model), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib", str(calib_file),
                "--out", out, "--num-samples", "2", "--seqlen", "16"] + ["--overwrite"] * overwrite  # fmt: skip
        rc = main(argv)
        capsys.readouterr()
        after = _tree(root)
        assert rc in (0, 2), (case, out, rc)
        outcomes[rc] += 1
        if rc == 2:
            assert after == before, (case, out)
            continue
        target = (cwd / out).resolve()
        assert verify_checkpoint(target).ok
        # --out itself, and the folders above it that had to be created
        inside = lambda k: target == root / k or target in (root / k).parents or (  # noqa: E731
            k not in before and after.get(k, 0) is None and root / k in target.parents)
        changed = {k for k in set(before) | set(after) if before.get(k, 0) != after.get(k, 0)}
        assert changed and all(inside(k) for k in changed), (case, out, sorted(k for k in changed if not inside(k)))
        assert all(inside(k) or before[k] == after[k] for k in before)
    assert outcomes[0] >= 3 and outcomes[2] >= 10, outcomes  # both branches exercised


# ---------------------------------------------------------------- round 2: verify reads what a loader reads
@pytest.fixture(scope="module")
def pruned_ckpt(tmp_path_factory, tiny_model_dir, calib_file):
    out = tmp_path_factory.mktemp("r2") / "pruned"
    assert main(["prune", str(tiny_model_dir), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib",
                 str(calib_file), "--out", str(out), "--num-samples", "2", "--seqlen", "16"]) == 0  # fmt: skip
    return out


def _shard(d):
    """Split model.safetensors into two shards and an index, as transformers writes them."""
    import json

    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    names = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for f, ks in parts.items():
        save_file({k: sd[k] for k in ks}, d / f, metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}))
    (d / "model.safetensors").unlink()
    return sd


def _dense(d, dense_dir, name="model.safetensors"):
    import shutil

    shutil.copy(dense_dir / "model.safetensors", d / name)


def _edit_tensors(d, fn, f="model.safetensors"):
    from safetensors.torch import load_file, save_file

    sd = load_file(d / f)
    fn(sd)
    save_file(sd, d / f, metadata={"format": "pt"})


def _edit_config_text(d, fn):
    (d / "config.json").write_text(fn((d / "config.json").read_text()))


_UP0 = "model.layers.0.mlp.up_proj"
VERIFY_CASES = {  # name: (change the pruned checkpoint in folder d (dense: the source model), expected exit, "message")
    "a stale dense model.safetensors beside shards and their index": (lambda d, dense: (_shard(d), _dense(d, dense)), 2,
        "transformers reads ['model.safetensors'] but vLLM reads"),
    "a dense model.safetensors beside a pruned file that sorts after it": (lambda d, dense: ((d / "model.safetensors").rename(
        d / "pruned.safetensors"), _dense(d, dense)), 2, "but vLLM reads"),
    "shards without their index": (lambda d, dense: (_shard(d), (d / "model.safetensors.index.json").unlink()), 2,
        "transformers loads nothing"),
    "a stray *.safetensors beside shards and their index (read by no loader)": (lambda d, dense: (_shard(d), _dense(
        d, dense, "calib_stats.safetensors")), 2, "is read by no loader"),
    "a tensor stored in two shards": (lambda d, dense: (_shard(d), _copy_tensor_to_other_shard(d)), 2, "is stored in both"),
    "an index that places a tensor in a shard without it": (lambda d, dense: (_shard(d), _edit_index(d)), 2,
        "which does not hold it"),
    "a 2:4-recorded layer that is entirely zero": (lambda d, dense: _edit_tensors(d, lambda sd: sd[_UP0 + ".weight"].zero_()),
        1, "every weight is zero"),
    "a record that lists a layer twice": (lambda d, dense: _edit_config_text(d, lambda t: t.replace(
        f'"{_UP0}": {{', f'"{_UP0}": {{"structure": "1:4"}}, "{_UP0}": {{', 1)), 2, "appears twice"),
    "a 2:4-recorded layer holding fewer zeros than recorded": (lambda d, dense: _edit_config_text(d, lambda t: t.replace(
        '"sparsity": 0.5', '"sparsity": 0.75', 1)), 1, "is recorded with sparsity 0.7500 but has 0.5000"),
}  # fmt: skip


def _copy_tensor_to_other_shard(d):
    import json

    idx = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    other = next(f for f in sorted(set(idx.values())) if f != idx[_UP0 + ".weight"])
    w = load_tensor(d / idx[_UP0 + ".weight"], _UP0 + ".weight")
    _edit_tensors(d, lambda sd: sd.update({_UP0 + ".weight": torch.ones_like(w)}), other)


def load_tensor(f, k):
    from safetensors.torch import load_file

    return load_file(f)[k]


def _edit_index(d):
    import json

    idx = json.loads((d / "model.safetensors.index.json").read_text())
    k = sorted(idx["weight_map"])[0]
    idx["weight_map"][k] = "model-00002-of-00002.safetensors" if idx["weight_map"][k].startswith("model-00001") else "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))


def test_a_sharded_checkpoint_verifies(pruned_ckpt, tmp_path, capsys):
    import shutil

    d = tmp_path / "sharded"
    shutil.copytree(pruned_ckpt, d)
    _shard(d)
    assert main(["verify", str(d), "--require-record"]) == 0
    assert "OK: 14 recorded layers" in capsys.readouterr().out


@pytest.mark.parametrize("case", list(VERIFY_CASES))
def test_verify_checks_the_weights_a_loader_loads(case, pruned_ckpt, tiny_model_dir, tmp_path, capsys):
    import shutil

    change, code, expect = VERIFY_CASES[case]
    d = tmp_path / "ckpt"
    shutil.copytree(pruned_ckpt, d)
    change(d, tiny_model_dir)
    before = _tree(tmp_path)
    assert main(["verify", str(d)]) == code
    _one_error(capsys, expect)
    assert _tree(tmp_path) == before  # verify writes nothing


def test_two_pruning_stages_over_one_layer_are_refused(tmp_path, tiny_model_dir, calib_file, capsys):
    """2:4 then 1:4 left a 1:4 record over weights at 50%; refused before calibration."""
    r = tmp_path / "two.yaml"
    r.write_text("first_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
                 "second_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '1:4'\n")  # fmt: skip
    before = _tree(tmp_path)
    assert main(["prune", str(tiny_model_dir), "--recipe", str(r), "--calib", str(calib_file), "--out", str(tmp_path / "o"),
                 "--num-samples", "2", "--seqlen", "16"]) == 2  # fmt: skip
    _one_error(capsys, "would be pruned twice")
    assert _tree(tmp_path) == before


def test_pruning_an_already_pruned_layer_is_refused(tmp_path, pruned_ckpt, calib_file, capsys):
    assert main(["prune", str(pruned_ckpt), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib",
                 str(calib_file), "--out", str(tmp_path / "o"), "--num-samples", "2", "--seqlen", "16"]) == 2  # fmt: skip
    _one_error(capsys, "is already pruned")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- round 2: recipes that silently meant something else
_STAGE = "sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
RECIPES_R2 = {  # name: (recipe text, message fragment)
    "a modifier written twice in one group": (_STAGE + "    CRePEPruningModifier:\n      mask_structure: '1:4'\n",
                                              "key 'CRePEPruningModifier' appears twice (lines 3 and 5)"),
    "a field written twice": (_STAGE + "      mask_structure: '1:4'\n", "key 'mask_structure' appears twice (lines 4 and 5)"),
    "sparsity 0 with 2:4": (_STAGE + "      sparsity: 0\n", "sparsity is 0 for every layer"),
    "a bad ignore regex": (_STAGE + "      ignore: ['re:[']\n", "CRePEPruningModifier.ignore[0]: 're:[' is not a valid regular expression"),
    "a bad regex in an upstream modifier": (_STAGE + "quant_stage:\n  quant_modifiers:\n    QuantizationModifier:\n"
                                            "      scheme: FP8_DYNAMIC\n      targets: [Linear]\n      ignore: ['re:(']\n",
                                            "QuantizationModifier.ignore[0]"),
    "a bad regex as a sparsity-map key": (_STAGE.replace("'2:4'", "'0:0'") + "      sparsity: {'re:*': 0.5, default: 0.5}\n",
                                          "CRePEPruningModifier.sparsity[0]"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RECIPES_R2))
def test_a_recipe_that_would_mean_something_else_is_refused(case, tmp_path, tiny_model_dir, calib_file, capsys):
    text, expect = RECIPES_R2[case]
    (tmp_path / "r.yaml").write_text(text)
    before = _tree(tmp_path)
    assert main(["prune", str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--calib", str(calib_file),
                 "--out", str(tmp_path / "out"), "--num-samples", "2", "--seqlen", "16"]) == 2  # fmt: skip
    _one_error(capsys, expect)
    assert _tree(tmp_path) == before


SEARCH_R2 = [
    (["--ignore", "lm_head", "re:["], "--ignore[1]: 're:[' is not a valid regular expression"),
]


@pytest.mark.parametrize("args,expect", SEARCH_R2)
def test_bad_search_ignore(args, expect, tmp_path, tiny_model_dir, calib_file, capsys):
    before = _tree(tmp_path)
    assert main(["search", str(tiny_model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "s"), *args]) == 2
    _one_error(capsys, expect)
    assert _tree(tmp_path) == before


def test_a_search_ignore_entry_that_matches_nothing_warns(tmp_path, tiny_model_dir, calib_file):
    from loguru import logger

    lines = []
    sink = logger.add(lines.append, level="WARNING", format="{message}")
    try:
        assert main(["search", str(tiny_model_dir), "--calib", str(calib_file), "--out", str(tmp_path / "s"), "--trials",
                     "1", "--layers", "1", "--num-samples", "2", "--seqlen", "16", "--proxy", "diag", "--ignore",
                     "lm_head", "down_prj"]) == 0  # fmt: skip
    finally:
        logger.remove(sink)
    assert sum("'down_prj' matches no layer" in x for x in lines) == 1, lines
    assert not any("'lm_head'" in x for x in lines)


def test_a_huge_act_exponent_ranks_as_the_exact_score():
    """||X_j|| ** 500 overflows float32; the scores fall back to log space and rank exactly as the
    real-valued score does (a float64 reference where it is finite, else the input norms)."""
    from crepe_plugin.core import CRePEConfig, crepe_scores, neighborhood, prune_mask, relative_importance

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    s = torch.exp(torch.randn(32, generator=g) * 4)  # input norms over ~7 orders of magnitude
    for nmap in ("ri", "score"):
        for border in ("mean", "zero", "reflect", "replicate"):
            cfg = CRePEConfig(act_exponent=30.0, neighbor_coef=0.4, neighbor_map=nmap, border=border, kernel="gaussian")
            scores = crepe_scores(w, s, cfg)
            assert scores.dtype == torch.float64 and bool((scores <= -1).all())  # the log form: float32 overflows
            ri = relative_importance(w.double().abs(), cfg.row_coef, cfg.col_coef)
            act = s.double().sqrt() ** cfg.act_exponent  # finite in float64
            ref = ri * act if nmap == "score" else ri
            ref = ref + cfg.neighbor_coef * neighborhood(ref, 3, "gaussian", border)
            ref = ref if nmap == "score" else ref * act
            for structure, sp in (("2:4", 0.5), ("0:0", 0.6)):
                assert torch.equal(prune_mask(scores, sp, structure), prune_mask(ref, sp, structure)), (nmap, border)
    huge = crepe_scores(w, s, CRePEConfig(act_exponent=500.0))
    assert bool(torch.isfinite(huge).all())
    by_norm = torch.log(s).expand_as(w)  # at a = 500 the input norm decides every group of 4
    assert torch.equal(prune_mask(huge, 0.5, "2:4"), prune_mask(by_norm, 0.5, "2:4"))


def test_prune_with_a_huge_act_exponent_is_not_index_order(tmp_path, tiny_model_dir, calib_file):
    from safetensors.torch import load_file

    (tmp_path / "r.yaml").write_text(_STAGE + "      act_exponent: 500\n")
    out = tmp_path / "out"
    assert main(["prune", str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--calib", str(calib_file),
                 "--out", str(out), "--num-samples", "2", "--seqlen", "16"]) == 0  # fmt: skip
    sd = load_file(out / "model.safetensors")
    w = sd["model.layers.0.mlp.up_proj.weight"].reshape(-1, 4)
    first_two = ((w[:, :2] == 0).all(1) & (w[:, 2:] != 0).all(1)).float().mean()
    assert first_two < 0.5, float(first_two)  # was 1.0: every group pruned inputs 0 and 1


# ---------------------------------------------------------------- round 2: text sources, models and arguments
@pytest.fixture(scope="module")
def inputs_r2(tmp_path_factory, tiny_model_dir, calib_file):
    """Bad text sources and broken model folders, each a copy of a good one with one thing wrong."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from crepe_plugin.testing import tiny_tokenizer

    d = tmp_path_factory.mktemp("inputs")
    (d / "oneword.txt").write_text("x" * 5000)  # no line break, no space: nowhere to cut
    (d / "latin1.txt").write_bytes(b"word " * 400 + "café".encode("latin-1"))
    shutil.copy(tiny_model_dir / "model.safetensors", d / "weights.safetensors")
    (d / "notext.jsonl").write_text('{"title": "a"}\n{"title": "b"}\n')
    (d / "checkpoints").mkdir()
    shutil.copy(tiny_model_dir / "model.safetensors", d / "checkpoints" / "step1.safetensors")
    (d / "short.txt").write_text("a few words only\n")
    models = {"notok": lambda m: [f.unlink() for f in m.glob("tokenizer*")],
              "emptycfg": lambda m: (m / "config.json").write_text("{}"),
              "noweights": lambda m: (m / "model.safetensors").unlink(),
              "hidden": lambda m: (m / "config.json").write_text(json.dumps({**json.loads((m / "config.json").read_text()), "hidden_size": 96}))}  # fmt: skip
    for name, breakit in models.items():
        shutil.copytree(tiny_model_dir, d / name)
        breakit(d / name)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d / "tied")
    tiny_tokenizer().save_pretrained(d / "tied")
    (d / "no_ignore.yaml").write_text(_STAGE + "      ignore: []\n")
    shutil.copytree(tiny_model_dir, d / "halfsaved")
    (d / "halfsaved" / ".crepe-incomplete").write_text("interrupted save; do not use\n")
    return d


_E = ["eval", "{model}", "--seqlen", "32", "--max-segments", "1", "--text"]
_PR = ["prune", "{model}", "--recipe", "{recipe}", "--calib", "{calib}", "--out", "{tmp}/out", "--num-samples", "2", "--seqlen", "16"]
ROUND2 = [  # (argv, expect): {model} {calib} {tmp} {recipe} and {in} (the inputs_r2 folder) are filled in
    ([*_E, "{in}/oneword.txt[:0.1]"], "too few lines and words to slice"),
    ([*_E, "{in}/latin1.txt"], "is not UTF-8 text (byte 0xe9 at offset 2003)"),
    ([*_E, "{in}/weights.safetensors"], "weights.safetensors' is not UTF-8 text"),
    ([*_E, "{in}/notext.jsonl"], "line 1 has no string field 'text'"),
    ([*_E, "{in}/checkpoints"], "is a folder with no dataset in it"),
    ([*_E, "{model}"], "is a model folder (it holds config.json), not text"),
    ([*_E, "someone/no-such-dataset"], "was not found locally and the hub is offline"),
    (["eval", "{model}", "--text", "{in}/short.txt", "--seqlen", "64"], "fewer than one segment of --seqlen 64"),
    (["eval", "{in}/notok", "--text", "{calib}"], "holds no tokenizer"),
    (["eval", "{in}/emptycfg", "--text", "{calib}"], "config.json: transformers cannot read it"),
    (["eval", "{in}/noweights", "--text", "{calib}"], "holds no weight files"),
    ([*_PR[:1], "{in}/hidden", *_PR[2:]], "config.json does not describe these weights"),
    ([*_PR[:1], "{in}/notok", *_PR[2:]], "holds no tokenizer"),
    ([*_PR[:1], "someone/no-such-model", *_PR[2:]], "'someone/no-such-model' was not found locally and the hub is offline"),
    (["eval", "{model}", "--text", "{calib}", "--dtype", "float33"], "--dtype must be one of"),
    (["eval", "{model}", "--text", "{calib}", "--device", "cuda:99"], "no such cuda device"),
    (["eval", "{model}", "--text", "{calib}", "--device", "gpu"], "is not a torch device"),
    (["eval", "{model}", "--text", "{calib}", "--seqlen", "abc"], "argument --seqlen: invalid int value: 'abc'"),
    ([*_PR[:7], "/proc/crepe-test/out", *_PR[8:]], "cannot write in /proc"),
    ([*_PR[:1], "{in}/tied", "--recipe", "{in}/no_ignore.yaml", *_PR[4:]], "shares its weight with 'model.embed_tokens'"),
    ([*_PR[:3], "{in}", *_PR[4:]], "is a directory, not a recipe file"),
    ([*_PR[:3], "{in}/latin1.txt", *_PR[4:]], "latin1.txt is not UTF-8 text (byte at offset 2003)"),
    (["eval", "{in}/halfsaved", "--text", "{calib}"], "is marked incomplete (an interrupted save)"),
    (["search-validate", "{tmp}/nowhere"], "no such directory; give the --out folder of a `crepe search`"),
    (["demo", "--data-dir", "{tmp}/nowhere", "--out", "{tmp}/d"], "nowhere: no wikitext2/wiki.valid.tokens.txt and wiki.test.raw.txt in it"),
    (["serve-check", "{model}"], "serve-check runs vLLM, which this environment lacks"),
    (["search", "{model}", "--calib", "{calib}", "--out", "{tmp}/s", "--storage", "foo://bar"], "--storage 'foo://bar': cannot open it"),
    (["search", "{model}", "--calib", "{calib}", "--out", "{tmp}/s", "--storage", "sqlite:////proc/crepe/pho.db"],
     "--storage 'sqlite:////proc/crepe/pho.db': cannot open it"),
]  # fmt: skip


@pytest.mark.parametrize("argv,expect", ROUND2, ids=[f"{a[0]} {expect[:40]}" for a, expect in ROUND2])
def test_bad_text_models_and_arguments(argv, expect, tmp_path, tiny_model_dir, calib_file, inputs_r2, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fill = {"model": tiny_model_dir, "calib": calib_file, "tmp": tmp_path, "recipe": ROOT / "recipes" / "crepe_2of4.yaml",
            "in": inputs_r2}  # fmt: skip
    before, shared = _tree(tmp_path), _tree(inputs_r2)
    assert main([a.format(**fill) for a in argv]) == 2
    _one_error(capsys, expect)
    assert _tree(tmp_path) == before and _tree(inputs_r2) == shared  # nothing written, nothing left behind


def test_slices_of_a_file_without_line_breaks_cut_at_whitespace(tmp_path):
    """FILE[lo:hi] cut at line starts: a one-line file gave all of it for [:0.1] and nothing for [0.5:]."""
    from crepe_plugin.data import read_text

    words = " ".join(f"w{i}" for i in range(4000))
    f = tmp_path / "one-line.txt"
    f.write_text(words)
    head, tail = read_text(f"{f}[:0.1]"), read_text(f"{f}[0.5:]")
    assert abs(len(head) / len(words) - 0.1) < 0.01 and abs(len(tail) / len(words) - 0.5) < 0.01
    assert read_text(f"{f}[:0.5]") + tail == words  # disjoint, and together the whole text
    assert head.endswith(" ") and tail.startswith("w")  # cut between words


def test_a_jsonl_file_is_read_through_its_text_field(tmp_path):
    import json

    from crepe_plugin.data import read_text

    rows = ["first row of text", "second row, with a comma", "third"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    (tmp_path / "t.json").write_text(json.dumps([{"text": r} for r in rows]))
    assert read_text(str(tmp_path / "t.jsonl")) == read_text(str(tmp_path / "t.json")) == "\n\n".join(rows)


def test_a_search_that_fails_before_its_first_trial_leaves_no_folder(tmp_path, tiny_model_dir, calib_file, capsys):
    """The layer-width refusal comes after the statistics pass: the folder this run created goes with it."""
    from crepe_plugin.testing import save_tiny_llama

    model = save_tiny_llama(tmp_path / "odd", hidden=64, intermediate=126)
    assert main(["search", str(model), "--calib", str(calib_file), "--out", str(tmp_path / "s"), "--trials", "2",
                 "--layers", "1", "--num-samples", "2", "--seqlen", "16", "--proxy", "diag"]) == 2  # fmt: skip
    _one_error(capsys, "down_proj")
    assert not (tmp_path / "s").exists()


def test_ctrl_c_during_a_search_prints_one_line(tmp_path, tiny_model_dir, calib_file):
    """Optuna logged the interrupted trial with a traceback before the 'interrupted' line."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "crepe_plugin.cli", "search", str(tiny_model_dir), "--calib", str(calib_file),
                          "--out", str(out), "--trials", "100000", "--layers", "1", "--num-samples", "2", "--seqlen", "16",
                          "--proxy", "recon"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "calib_stats.safetensors").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # trials start once the statistics are cached
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted", err[-3000:]
    assert (out / "pho.db").is_file()  # the study is kept: the search resumes
