"""The bad inputs of issue 23 for benchmarks/bad_input_table.py (imported by it, not run alone).

Each case runs in a scratch layout rebuilt before every run: W/r2/home/work (the working directory:
the user's notes, calibration text, recipe, a folder of their own, an earlier search) and
W/r2/home/models/tiny (the source model, with a note of its own). The command runs with PYTHONPATH
naming the checkout under test and the hub offline; the cell adds the pre-existing files a run lost
or changed (a replaced --out included), the files it wrote outside --out, and for some cases what
the run produced (a mask, a warning).
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))} if root.exists() else {}


def table(W: Path, ROOT: Path, before: Path, PY: str, summary):
    R = str(ROOT / "recipes/crepe_2of4.yaml")
    S = W / "r2"
    L = S / "layout"
    home, work = L / "home", L / "home" / "work"
    model = home / "models" / "tiny"
    fx = S / "fixtures"
    fx.mkdir(parents=True, exist_ok=True)
    _fixtures(W, fx, ROOT, PY)

    def layout():
        shutil.rmtree(L, ignore_errors=True)
        work.mkdir(parents=True)
        (work / "notes.md").write_text("my notes")
        shutil.copytree(W / "tm", model)
        (model / "NOTES.md").write_text("where this model came from")
        shutil.copy(W / "calib.txt", work / "calib.txt")
        shutil.copy(R, work / "recipe.yaml")
        (work / "mine").mkdir()
        (work / "mine" / "draft.txt").write_text("draft")
        (work / "pho-run").mkdir()
        (work / "pho-run" / "best_energy.json").write_text("{}")
        (work / "pho-run" / "pho.db").write_bytes(b"SQLite format 3\x00")
        return work

    P = ["--num-samples", "2", "--seqlen", "16"]
    prune_l = ["prune", str(model), "--recipe", "recipe.yaml", "--calib", "calib.txt", *P]
    search_l = ["search", str(model), "--calib", "calib.txt", "--trials", "1", "--layers", "1", *P, "--proxy", "diag"]
    tm, calib = str(W / "tm"), str(W / "calib.txt")
    prune = lambda m=tm, recipe=R, *extra: ["prune", m, "--recipe", recipe, "--calib", calib, "--out", str(S / "out"), *P, *extra]  # noqa: E731
    ev = lambda text, *extra, m=tm: ["eval", m, "--text", text, "--seqlen", "32", "--max-segments", "1", *extra]  # noqa: E731
    v = lambda name: ["verify", str(fx / name)]  # noqa: E731
    r = lambda name: str(fx / f"{name}.yaml")  # noqa: E731
    cases = [
        # 1. data loss with --overwrite, and search --out into a model directory
        ("prune --out . --overwrite", [*prune_l, "--out", ".", "--overwrite"], layout, None),
        ("prune --out '' --overwrite (an unset variable)", [*prune_l, "--out", "", "--overwrite"], layout, None),
        ("prune --out MODEL --overwrite", [*prune_l, "--out", str(model), "--overwrite"], layout, None),
        ("prune --out PARENT-OF-MODEL --overwrite", [*prune_l, "--out", str(model.parent), "--overwrite"], layout, None),
        ("prune --out .. --overwrite", [*prune_l, "--out", "..", "--overwrite"], layout, None),
        ("prune --out MODEL/child", [*prune_l, "--out", str(model / "pruned")], layout, None),
        ("prune --out a search folder --overwrite", [*prune_l, "--out", "pho-run", "--overwrite"], layout, None),
        ("prune --out a user folder --overwrite", [*prune_l, "--out", "mine", "--overwrite"], layout, None),
        ("search --out MODEL", [*search_l, "--out", str(model)], layout, None),
        ("search --out a folder of user files", [*search_l, "--out", "mine"], layout, None),
        # 2. verify checks the weights a loader loads
        ("verify: stale dense model.safetensors beside shards + index", v("stale"), None, None),
        ("verify: dense model.safetensors + a pruned file sorting after it", v("after"), None, None),
        ("verify: shards without their index", v("noindex"), None, None),
        ("verify: a stray calib_stats.safetensors beside shards + index", v("stray"), None, None),
        ("verify: a tensor stored in two shards", v("twice"), None, None),
        ("verify: a 2:4-recorded layer that is all zero", v("zero"), None, None),
        ("verify: a record listing a layer twice", v("dupkey"), None, None),
        ("prune: two sparsity stages (2:4, then 1:4)", prune(tm, r("two_stages")), None, None),
        ("prune: an already pruned model", prune(str(W / "pruned")), None, None),
        # 3. recipes that silently mean something else
        ("recipe: CRePEPruningModifier twice in one group", prune(tm, r("dup_modifier")), None, None),
        ("recipe: mask_structure written twice", prune(tm, r("dup_field")), None, None),
        ("recipe: act_exponent 500", prune(tm, r("act500")), None, _index_order),
        ("recipe: sparsity 0 with 2:4", prune(tm, r("sparsity0")), None, None),
        ("recipe: ignore ['re:[']", prune(tm, r("bad_regex")), None, None),
        ("search --ignore 're:['", ["search", tm, "--calib", calib, "--out", str(S / "s"), "--ignore", "re:["], None, None),
        ("search --ignore an entry that matches nothing", ["search", tm, "--calib", calib, "--out", str(S / "s"), "--trials",
         "1", "--layers", "1", *P, "--proxy", "diag", "--ignore", "lm_head", "down_prj"], None, _warned("down_prj")),
        # 4. text sources
        ("eval --text ONE-LINE-FILE[:0.1]", ev(f"{fx}/oneline.txt[:0.1]"), None, None),
        ("eval --text ONE-LINE-FILE[0.5:]", ev(f"{fx}/oneline.txt[0.5:]"), None, None),
        ("eval --text a latin-1 file", ev(f"{fx}/latin1.txt"), None, None),
        ("eval --text a safetensors file", ev(f"{fx}/weights.safetensors"), None, None),
        ("eval --text a .parquet file", ev(f"{fx}/rows.parquet"), None, None),
        ("eval --text a folder of checkpoints", ev(f"{fx}/checkpoints"), None, None),
        ("eval --text a .jsonl with a text field", ev(f"{fx}/rows.jsonl"), None, None),
        ("eval --text the same rows as plain text", ev(f"{fx}/rows.txt"), None, None),
        ("eval --text an offline hub dataset", ev("someone/no-such-dataset"), None, None),
        ("eval --seqlen longer than the text", ["eval", tm, "--text", f"{fx}/short.txt", "--seqlen", "64"], None, None),
        # 5. models and arguments
        ("eval a model without tokenizer files", ev(calib, m=str(fx / "notok")), None, None),
        ("prune a model without tokenizer files", prune(str(fx / "notok")), None, None),
        ("eval a model whose config.json is {}", ev(calib, m=str(fx / "emptycfg")), None, None),
        ("eval a model without weight files", ev(calib, m=str(fx / "noweights")), None, None),
        ("prune a model whose hidden_size disagrees with its weights", prune(str(fx / "hidden")), None, None),
        ("prune an offline hub model", prune("someone/no-such-model"), None, None),
        ("eval --dtype float33", ev(calib, "--dtype", "float33"), None, None),
        ("eval --device cuda:99", ev(calib, "--device", "cuda:99"), None, None),
        ("eval --seqlen abc", ["eval", tm, "--text", calib, "--seqlen", "abc"], None, None),
        ("prune --out on a read-only file system (/proc)", [*prune()[:7], "/proc/crepe-test/out", *P], None, None),
        ("prune a tied lm_head with ignore: []", prune(str(fx / "tied"), r("no_ignore")), None, None),
        ("search --storage foo://bar", ["search", tm, "--calib", calib, "--out", str(S / "s"), "--storage", "foo://bar",
                                        "--trials", "1", "--layers", "1", *P, "--proxy", "diag"], None, _left(S / "s")),
        ("search --storage sqlite on a read-only file system", ["search", tm, "--calib", calib, "--out", str(S / "s"),
         "--storage", "sqlite:////proc/crepe/pho.db", "--trials", "1", "--layers", "1", *P, "--proxy", "diag"], None, _left(S / "s")),
        ("Ctrl-C during a search's trials", "SIGINT-SEARCH", None, None),
        ("prune --recipe a directory", prune(tm, str(fx)), None, None),
        ("eval a model folder marked incomplete", ev(calib, m=str(fx / "halfsaved")), None, None),
        ("search-validate a folder that does not exist", ["search-validate", str(S / "nowhere")], None, None),
        ("serve-check in the compression environment", ["serve-check", tm], None, None),
    ]
    for name, argv, setup, post in cases:
        cells = []
        for code in (before, ROOT):
            shutil.rmtree(S / "out", ignore_errors=True)
            shutil.rmtree(S / "s", ignore_errors=True)
            cwd = setup() if setup else S
            snap = _tree(L)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1"}
            if argv == "SIGINT-SEARCH":
                rc, out, err = _interrupt_search(PY, env, S, tm, calib)
            else:
                res = subprocess.run([PY, "-m", "crepe_plugin.cli", *argv], cwd=cwd, capture_output=True, text=True,
                                     timeout=900, env=env)
                rc, out, err = res.returncode, res.stdout, res.stderr
            text = summary(err) if rc != 0 else (out.strip().splitlines() or ["(no output)"])[-1][:150]
            if setup:
                text += _lost(snap, _tree(L), argv, cwd, rc)
            if post:
                text += post(rc, out, err, S)
            cells.append((rc, text))
        yield name, cells[0], cells[1]


def _lost(snap, after, argv, cwd, rc) -> str:
    target = None
    if rc == 0 and "--out" in argv:
        target = (Path(cwd) / argv[argv.index("--out") + 1]).resolve()
    root = Path(cwd).resolve().parents[1]  # the layout's root

    def outside(k):
        p = (root / k).resolve() if (root / k).exists() else root / k
        return target is None or not (p == target or target in p.parents)

    gone = [k for k, v in snap.items() if after.get(k, "absent") != v]  # anywhere: a replaced --out included
    new = [k for k in after if k not in snap and outside(k)]
    msg = ""
    if gone:
        msg += f" [{len(gone)} user files lost or changed, e.g. {sorted(gone)[0]}]"
    if new:
        msg += f" [{len(new)} files written outside --out, e.g. {sorted(new)[0]}]"
    return msg


def _index_order(rc, out, err, S) -> str:
    if rc != 0:
        return ""
    from safetensors.torch import load_file

    w = load_file(S / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].reshape(-1, 4)
    frac = float(((w[:, :2] == 0).all(1) & (w[:, 2:] != 0).all(1)).float().mean())
    return f" [groups pruning inputs 0 and 1: {frac:.0%}]"


def _warned(word):
    return lambda rc, out, err, S: f" [warned: {any(word in l and 'WARNING' in l for l in err.splitlines())}]"


def _left(folder):
    return lambda rc, out, err, S: f" [output folder left: {folder.exists()}]"


def _interrupt_search(PY, env, S, tm, calib):
    out = S / "s"
    p = subprocess.Popen([PY, "-m", "crepe_plugin.cli", "search", tm, "--calib", calib, "--out", str(out), "--trials",
                          "100000", "--layers", "1", "--num-samples", "2", "--seqlen", "16", "--proxy", "recon"],
                         cwd=S, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 600
    while not (out / "calib_stats.safetensors").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    o, e = p.communicate(timeout=600)
    tb = "Traceback" in e
    last = (e.strip().splitlines() or [""])[-1][:80]
    return p.returncode, o, ("traceback, then " if tb else "no traceback; ") + f"last line: {last}"


def _fixtures(W: Path, fx: Path, ROOT: Path, PY: str):
    """Broken checkpoints, recipes, texts and models, each a copy of a good one with one thing wrong."""
    import torch
    from safetensors.torch import load_file, save_file

    pruned, tm = W / "pruned", W / "tm"

    def copy(name, src=pruned):
        d = fx / name
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(src, d)
        return d

    def shard(d):
        sd = load_file(d / "model.safetensors")
        names = sorted(sd)
        parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
        for f, ks in parts.items():
            save_file({k: sd[k] for k in ks}, d / f, metadata={"format": "pt"})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in parts.items() for k in ks}}))
        (d / "model.safetensors").unlink()
        return parts

    d = copy("stale"); shard(d); shutil.copy(tm / "model.safetensors", d / "model.safetensors")
    d = copy("after"); (d / "model.safetensors").rename(d / "pruned.safetensors"); shutil.copy(tm / "model.safetensors", d / "model.safetensors")
    d = copy("noindex"); shard(d); (d / "model.safetensors.index.json").unlink()
    d = copy("stray"); shard(d); shutil.copy(tm / "model.safetensors", d / "calib_stats.safetensors")
    d = copy("twice"); parts = shard(d)
    up = "model.layers.0.mlp.up_proj.weight"
    home_file = next(f for f, ks in parts.items() if up in ks)
    other = next(f for f in parts if f != home_file)
    sd = load_file(d / other); sd[up] = torch.ones_like(load_file(d / home_file)[up]); save_file(sd, d / other, metadata={"format": "pt"})
    d = copy("zero"); sd = load_file(d / "model.safetensors"); sd[up].zero_(); save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    d = copy("dupkey"); c = (d / "config.json").read_text()
    (d / "config.json").write_text(c.replace('"model.layers.0.mlp.up_proj": {', '"model.layers.0.mlp.up_proj": {"structure": "1:4"}, "model.layers.0.mlp.up_proj": {', 1))
    stage = "sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
    recipes = {
        "two_stages": "first_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
                      "second_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '1:4'\n",
        "dup_modifier": stage + "    CRePEPruningModifier:\n      mask_structure: '1:4'\n",
        "dup_field": stage + "      mask_structure: '1:4'\n",
        "act500": stage + "      act_exponent: 500\n",
        "sparsity0": stage + "      sparsity: 0\n",
        "bad_regex": stage + "      ignore: ['re:[']\n",
        "no_ignore": stage + "      ignore: []\n",
    }
    for k, t in recipes.items():
        (fx / f"{k}.yaml").write_text(t)
    words = " ".join(f"w{i}" for i in range(20000))
    (fx / "oneline.txt").write_text(words)
    (fx / "latin1.txt").write_bytes(b"word " * 400 + "caf\u00e9".encode("latin-1"))
    shutil.copy(tm / "model.safetensors", fx / "weights.safetensors")
    rows = [line for line in (W / "calib.txt").read_text().split("\n") if line.strip()][:300]
    (fx / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    (fx / "rows.txt").write_text("\n\n".join(rows))
    from datasets import Dataset

    Dataset.from_dict({"text": rows}).to_parquet(str(fx / "rows.parquet"))
    (fx / "checkpoints").mkdir(exist_ok=True)
    shutil.copy(tm / "model.safetensors", fx / "checkpoints" / "step1.safetensors")
    (fx / "short.txt").write_text("a few words only\n")
    d = copy("notok", tm); [f.unlink() for f in d.glob("tokenizer*")]
    d = copy("emptycfg", tm); (d / "config.json").write_text("{}")
    d = copy("noweights", tm); (d / "model.safetensors").unlink()
    d = copy("hidden", tm); c = json.loads((d / "config.json").read_text()); c["hidden_size"] = 96; (d / "config.json").write_text(json.dumps(c))
    d = copy("halfsaved", tm); (d / ".crepe-incomplete").write_text("interrupted save; do not use\n")
    code = ("from transformers import LlamaConfig, LlamaForCausalLM; import torch; from crepe_plugin.testing import tiny_tokenizer\n"
            "cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, "
            "num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)\n"
            f"torch.manual_seed(0); LlamaForCausalLM(cfg).save_pretrained('{fx}/tied'); tiny_tokenizer().save_pretrained('{fx}/tied')")
    subprocess.run([PY, "-c", code], cwd=ROOT, check=True, capture_output=True)
