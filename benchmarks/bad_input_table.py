"""Every bad input of the bad-input issue, run through `python -m crepe_plugin.cli` from an older
checkout and from this one; prints a markdown table of exit code and message per input.

usage: git worktree add /tmp/old 6617cd0
       python benchmarks/bad_input_table.py --before /tmp/old [--work /tmp/ba] [--cases round1|round2|all] > table.md
(the data file is ../shared/data/wikitext2/wiki.valid.tokens.txt; both trees run in this
interpreter's environment, the compression one)

round2 (issue 23) runs each case in a scratch layout rebuilt before every run (a working directory
holding the user's notes, the source model, an earlier search...), with PYTHONPATH naming the
checkout, so an older checkout that deletes files deletes only scratch copies; the cell then says
which pre-existing files were lost or changed, and which were written outside --out.
"""
import argparse, json, os, shutil, signal, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--before", required=True, help="a checkout of the older commit")
ap.add_argument("--work", default="/tmp/bad-input-table", help="scratch folder (recreated)")
ap.add_argument("--cases", default="all", choices=["round1", "round2", "all"], help="which rounds of bad inputs")
args = ap.parse_args()
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
W = Path(args.work); shutil.rmtree(W, ignore_errors=True); W.mkdir(parents=True)
def sh(code):
    subprocess.run([PY, "-c", code], cwd=ROOT, check=True, capture_output=True)
sh(f"from crepe_plugin.testing import save_tiny_llama, save_tiny_gpt2; save_tiny_llama('{W}/tm'); save_tiny_llama('{W}/odd', hidden=64, intermediate=126); save_tiny_gpt2('{W}/gpt2')")
(W / "calib.txt").write_text((ROOT.parent / "shared/data/wikitext2/wiki.valid.tokens.txt").read_text()[:60000])
(W / "empty.txt").write_text("   \n")
(W / "notamodel").mkdir(); (W / "notamodel/README.md").write_text("hi")
good = (ROOT / "recipes/crepe_2of4.yaml").read_text()
recipes = {
 "misspelled stage": good + "quant_stag:\n  quant_modifiers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n      targets: [Linear]\n      ignore: [lm_head]\n",
 "misspelled group": good + "quant_stage:\n  quant_modifers:\n    QuantizationModifier:\n      scheme: FP8_DYNAMIC\n      targets: [Linear]\n      ignore: [lm_head]\n",
 "unquoted 2:4": "sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: 2:4\n",
 "invalid yaml": "sparsity_stage:\n  sparsity_modifiers: [\n",
 "empty recipe": "\n",
 "misspelled modifier": "sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruninModifier:\n      mask_structure: '2:4'\n",
 "row_coef 0 and col_coef 0": "sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n      row_coef: 0\n      col_coef: 0\n",
}
for k, v in recipes.items():
    (W / (k.replace(" ", "_").replace(":", "") + ".yaml")).write_text(v)
from safetensors.torch import load_file, save_file
for name, how in [("missing", "del"), ("nan", "nan"), ("trunc", "trunc")]:
    d = W / name; shutil.copytree(W / "tm", d); f = d / "model.safetensors"
    if how == "trunc":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]); continue
    sd = load_file(f)
    if how == "del": del sd["model.layers.0.mlp.down_proj.weight"]
    else: sd["model.layers.0.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
# a pruned checkpoint to corrupt for verify
subprocess.run([PY, "-m", "crepe_plugin.cli", "prune", f"{W}/tm", "--recipe", str(ROOT / "recipes/crepe_2of4.yaml"), "--calib", f"{W}/calib.txt", "--out", f"{W}/pruned", "--num-samples", "4", "--seqlen", "64"], cwd=ROOT, check=True, capture_output=True)
def rec(name, value):
    d = W / name; shutil.copytree(W / "pruned", d); c = json.loads((d / "config.json").read_text())
    if value == "DROP": c.pop("crepe_sparsity", None)
    else: c["crepe_sparsity"] = value
    (d / "config.json").write_text(json.dumps(c) if value is not None or True else "")
    return d
rec("rec_str", "hello"); rec("rec_list", [1, 2]); rec("rec_num", 3); rec("norec", "DROP")
d = W / "rec_nan"; shutil.copytree(W / "pruned", d); c = (d / "config.json").read_text(); c = json.loads(c); c["crepe_sparsity"] = float("nan"); (d / "config.json").write_text(json.dumps(c))
d = W / "missing_layer"; shutil.copytree(W / "pruned", d); sd = load_file(d / "model.safetensors")
k = next(k for k in sd if "layers.0.mlp.down_proj.weight" in k); del sd[k]; save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
d = W / "nan_layer"; shutil.copytree(W / "pruned", d); sd = load_file(d / "model.safetensors")
k = next(k for k in sd if "layers.0.mlp.up_proj.weight" in k); sd[k] = sd[k].clone(); sd[k][0, 0] = float("nan"); save_file(sd, d / "model.safetensors", metadata={"format": "pt"})

R = str(ROOT / "recipes/crepe_2of4.yaml")
P = ["--num-samples", "2", "--seqlen", "16"]
def prune(recipe, *extra, model="tm", calib="calib.txt", out="out"):
    return ["prune", f"{W}/{model}", "--recipe", recipe, "--calib", f"{W}/{calib}" if "/" not in calib else calib, "--out", f"{W}/{out}", *P, *extra]
CASES = [(f"recipe: {k}", prune(str(W / (k.replace(' ', '_').replace(':', '') + '.yaml')))) for k in recipes]
CASES += [
 ("prune --num-samples 0", prune(R, "--num-samples", "0")),
 ("prune --seqlen -8", prune(R, "--seqlen", "-8")),
 ("prune --calib that does not exist", prune(R, calib="/nonexistent/calib.txt")),
 ("prune --calib empty file", prune(R, calib="empty.txt")),
 ("prune --seqlen beyond the text", prune(R, "--seqlen", "100000")),
 ("prune a dir that is not a model", prune(R, model="notamodel")),
 ("prune --recipe missing file", prune(f"{W}/nope.yaml")),
 ("prune --out existing", prune(R, out="tm")),
 ("eval --seqlen 1", ["eval", f"{W}/tm", "--text", f"{W}/calib.txt", "--seqlen", "1", "--max-segments", "2"]),
 ("eval --seqlen 0", ["eval", f"{W}/tm", "--text", f"{W}/calib.txt", "--seqlen", "0"]),
 ("eval --seqlen -64", ["eval", f"{W}/tm", "--text", f"{W}/calib.txt", "--seqlen", "-64", "--max-segments", "2"]),
 ("eval --max-segments -1", ["eval", f"{W}/tm", "--text", f"{W}/calib.txt", "--max-segments", "-1", "--seqlen", "64"]),
 ("eval a checkpoint missing a tensor", ["eval", f"{W}/missing", "--text", f"{W}/calib.txt", "--seqlen", "32", "--max-segments", "1"]),
 ("eval NaN weights", ["eval", f"{W}/nan", "--text", f"{W}/calib.txt", "--seqlen", "32", "--max-segments", "1"]),
 ("eval truncated safetensors", ["eval", f"{W}/trunc", "--text", f"{W}/calib.txt", "--seqlen", "32", "--max-segments", "1"]),
 ("eval a dir that is not a model", ["eval", f"{W}/notamodel", "--text", f"{W}/calib.txt"]),
 ("eval --text missing", ["eval", f"{W}/tm", "--text", f"{W}/nope.txt"]),
 ("search --bounds not JSON", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s", "--bounds", "{row_coef: 1"]),
 ("search --bounds a list", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s", "--bounds", "[1, 2]"]),
 ("search --layers 0", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s", "--layers", "0"]),
 ("search --layers two", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s", "--layers", "two"]),
 ("search --trials 0", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s", "--trials", "0"]),
 ("search --structure 2:x", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s", "--structure", "2:x"]),
 ("search 0:0 without --sparsity", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s", "--structure", "0:0"]),
 ("search 2:4 --sparsity 0.7", ["search", f"{W}/tm", "--calib", f"{W}/calib.txt", "--out", f"{W}/s7", "--structure", "2:4", "--sparsity", "0.7", "--trials", "2", "--layers", "1", *P]),
 ("search layer width not divisible by 4", ["search", f"{W}/odd", "--calib", f"{W}/calib.txt", "--out", f"{W}/s8", "--trials", "2", "--layers", "1", "--proxy", "diag", "--num-samples", "2", "--seqlen", "32"]),
 ("search-validate on the test text", ["search-validate", f"{W}", "--eval", str(ROOT.parent / "shared/data/wikitext2/wiki.test.raw.txt")]),
 ("search-validate --proxies diag,foo", ["search-validate", f"{W}", "--proxies", "diag,foo"]),
 ("verify a path that is not a dir", ["verify", f"{W}/nope"]),
 ("verify record is a string", ["verify", f"{W}/rec_str"]),
 ("verify record is a list", ["verify", f"{W}/rec_list"]),
 ("verify record is a number", ["verify", f"{W}/rec_num"]),
 ("verify record is NaN", ["verify", f"{W}/rec_nan"]),
 ("verify no record", ["verify", f"{W}/norec"]),
 ("verify recorded layer missing", ["verify", f"{W}/missing_layer"]),
 ("verify NaN in a recorded layer", ["verify", f"{W}/nan_layer"]),
 ("prune a tiny GPT-2 (Conv1D)", ["prune", f"{W}/gpt2", "--recipe", R, "--calib", f"{W}/calib.txt", "--out", f"{W}/gpt2out", *P]),
 ("Ctrl-C during start-up", "SIGINT"),
]
def summary(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip() and "| INFO" not in l and "WARNING" not in l and "it/s]" not in l and "s/it]" not in l and "Loading weights" not in l]
    tb = any(l.startswith("Traceback") for l in lines)
    errs = [l for l in lines if l.startswith("error:")]
    if errs: return ("traceback, then " if tb else "") + errs[0][:150]
    if tb: return "traceback: " + lines[-1][:150]
    return (lines[-1][:150] if lines else "(nothing)")
def run(cwd, argv):
    for p in W.glob("out*"): shutil.rmtree(p, ignore_errors=True)
    for p in ["s", "s7", "s8", "gpt2out"]: shutil.rmtree(W / p, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if argv == "SIGINT":
        p = subprocess.Popen([PY, "-m", "crepe_plugin.cli", *prune(R)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        time.sleep(1.0); p.send_signal(signal.SIGINT); out, err = p.communicate(timeout=300); rc = p.returncode
    else:
        r = subprocess.run([PY, "-m", "crepe_plugin.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
        out, err, rc = r.stdout, r.stderr, r.returncode
    s = summary(err)
    if rc == 0: s = (out.strip().splitlines() or ["(no output)"])[-1][:150]
    return rc, s
cell = lambda x: f"{x[0]}: {x[1]}".replace("|", "\\|")
print("| input | before: exit, message | after: exit, message |\n| --- | --- | --- |", flush=True)
if args.cases in ("round1", "all"):
    for name, argv in CASES:
        b = run(args.before, argv); a = run(str(ROOT), argv)
        print(f"| {name} | {cell(b)} | {cell(a)} |", flush=True)
if args.cases in ("round2", "all"):
    import round2_cases  # benchmarks/round2_cases.py: the layouts and cases of issue 23
    for name, b, a in round2_cases.table(W, ROOT, Path(args.before), PY, summary):
        print(f"| {name} | {cell(b)} | {cell(a)} |", flush=True)
