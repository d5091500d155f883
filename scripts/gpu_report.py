"""The GPU check's results file and closing table (scripts/gpu_check.sh calls this after every part).

    env     the machine, versions, and the two GEMM ceilings (dense bf16 and 2:4 bf16 at 8192^3)
    junit   tests/gpu's JUnit XML as a part (counts, failures with their messages)
    status  record one part's outcome (ok, failed, timed out, skipped) and merge every part's JSON
            into one results file, so a later failure or the time limit keeps what is done
    table   print the targets of issue 24 side by side, the parts and section 3, from that file
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LIMIT = 2.0  # a 2:4 GEMM does half the multiply-adds: 2x is its ceiling


def merge(parts: Path, out: Path) -> dict:
    status = json.loads((parts / "_status.json").read_text()) if (parts / "_status.json").exists() else []
    res = {"parts": status}
    for f in sorted(parts.glob("*.json")):
        if f.name.startswith("_"):
            continue
        try:
            res[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            res[f.stem] = {"error": f"unreadable part file: {e}"}
    res["targets"] = targets(res)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    tmp.replace(out)
    return res


def cmd_status(a) -> None:
    parts = Path(a.parts)
    f = parts / "_status.json"
    status = json.loads(f.read_text()) if f.exists() else []
    entry = {"part": a.name, "status": a.status, "rc": a.rc, "seconds": a.seconds, "limit_s": a.limit}
    if a.note:
        entry["note"] = a.note
    status = [s for s in status if s["part"] != a.name] + [entry]
    f.write_text(json.dumps(status, indent=1))
    merge(parts, Path(a.out))


def cmd_env(a) -> None:
    import platform
    import subprocess

    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "dry_run": a.dry_run,
           "cuda_available": torch.cuda.is_available()}  # fmt: skip
    for name in ("transformers", "numpy", "llmcompressor", "compressed_tensors", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - recorded, not fatal
            env[name] = f"not importable: {type(e).__name__}"
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
        env["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = str(e)
        env["gemm_8192"] = _ceilings()
    else:
        env["device"] = "CPU (dry run)" if a.dry_run else "CPU"
        env["gemm_8192"] = "skipped: no CUDA"
    Path(a.out).write_text(json.dumps(env, indent=1))
    print(json.dumps(env))


def _ceilings() -> dict:
    """TFLOP/s of one 8192^3 bf16 product, dense (torch.mm) and 2:4 (cuSPARSELt), random data."""
    import torch

    from crepe_plugin.core.masks import nm_mask
    from crepe_plugin.vllm.sparse import compress, search_algs, sparse_linear

    n = 8192
    w = torch.randn(n, n, device="cuda")
    w = (w * nm_mask(w.abs(), 2, 4)).to(torch.bfloat16)
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    packed = compress(w)
    algs = search_algs(packed, n, torch.bfloat16)

    def tflops(fn):
        for _ in range(3):
            fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        a.record()
        for _ in range(10):
            fn()
        b.record()
        b.synchronize()
        return 2 * n**3 / (a.elapsed_time(b) / 10 / 1e3) / 1e12

    dense = tflops(lambda: torch.nn.functional.linear(x, w))
    sparse = tflops(lambda: sparse_linear(x, packed, n, algs=algs))  # dense-equivalent FLOPs
    return {"dense_bf16_tflops": dense, "sparse_2of4_bf16_tflops_dense_equiv": sparse, "speedup": sparse / dense}


def cmd_junit(a) -> None:
    import xml.etree.ElementTree as ET

    p = Path(a.xml)
    if not p.exists():
        res = {"summary": "no JUnit file (pytest did not run to the end)"}
    else:
        root = ET.parse(p).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
        failed = []
        for case in root.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:300]})
        n["passed"] = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
        res = {**n, "failed": failed,
               "summary": f"{n['passed']} passed, {n['failures'] + n['errors']} failed, {n['skipped']} skipped"}  # fmt: skip
    if a.note:
        res["note"] = a.note
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"tests/gpu: {res['summary']}")


def _ratio(s, d):
    return s / d if s and d else None


def targets(res: dict) -> list[dict]:
    """Each target of the issue: goal, measured ratio, fraction of the 2x limit, met or not."""
    rows = []
    bf16 = (res.get("model_bf16") or {}).get("results", {}).get("bf16")
    if bf16:
        for k in sorted(bf16["dense"]["prefill"], key=lambda k: [int(x) for x in k.split("x")]):
            if k.endswith("x2048"):
                rows.append(_row(f"bf16 prefill {k.replace('x', ' x ')} tokens", 1.25,
                                 _ratio(bf16["sparse"]["prefill"].get(k), bf16["dense"]["prefill"][k])))
        for k in sorted(bf16["dense"]["decode"], key=int):
            modes = {(bf16[v].get("decode_mode") or {}).get(k) for v in ("dense", "sparse")} - {"cuda graph", None}
            rows.append(_row(f"bf16 decode batch {k} (CUDA graph)", 1.0, _ratio(bf16["sparse"]["decode"].get(k), bf16["dense"]["decode"][k]),
                             note="; ".join(sorted(modes)) or None))  # fmt: skip
    fp8 = res.get("fp8_gemm") or {}
    for t, v in (fp8.get("decoder_layer") or {}).items():
        rows.append(_row(f"FP8 2:4 / FP8 dense, decoder-layer linears at {t} tokens", 1.2, v.get("layer_speedup"),
                         note=f"GEMMs alone {v['gemm_speedup']:.2f}x" if "gemm_speedup" in v else v.get("skipped")))  # fmt: skip
    m8 = (res.get("model_fp8") or {}).get("results", {}).get("fp8")
    if m8:
        for k in m8["dense"]["prefill"]:
            if k.endswith("x2048"):
                rows.append(_row(f"FP8 model prefill {k.replace('x', ' x ')} tokens", 1.2,
                                 _ratio(m8["sparse"]["prefill"].get(k), m8["dense"]["prefill"][k])))
    return rows


def _row(what: str, goal: float, measured, note: str | None = None) -> dict:
    r = {"target": what, "goal": goal, "measured": measured}
    if measured is not None:
        r["met"] = measured >= goal
        r["of_2x_limit"] = measured / LIMIT
    if note:
        r["note"] = note
    return r


def _f(v, fmt="{:.2f}"):
    return "-" if v is None else fmt.format(v)


def cmd_table(a) -> None:
    res = json.loads(Path(a.json).read_text())
    print("\n## GPU check (issue 24)")
    env = res.get("env") or {}
    print(f"device: {env.get('device', '-')}, torch {env.get('torch', '-')}, cuSPARSELt {env.get('cusparselt', '-')}"
          + (" (DRY RUN on CPU: ratios mean nothing)" if env.get("dry_run") else ""))  # fmt: skip
    print("\n| part | status | seconds |\n| --- | --- | --- |")
    for p in res.get("parts", []):
        print(f"| {p['part']} | {p['status']}{' (' + p['note'] + ')' if p.get('note') else ''} | {_f(p.get('seconds'), '{:.0f}')} |")
    print("\n| target | goal | measured | share of the 2x limit | met |\n| --- | --- | --- | --- | --- |")
    for t in res.get("targets", []):
        met = "-" if "met" not in t else ("yes" if t["met"] else "NO")
        print(f"| {t['target']} | >= {t['goal']:.2f}x | {_f(t['measured'])}x{' (' + t['note'] + ')' if t.get('note') else ''} "
              f"| {_f(t.get('of_2x_limit'), '{:.0%}')} | {met} |")  # fmt: skip
    bf16 = (res.get("model_bf16") or {}).get("results", {}).get("bf16")
    if bf16:
        gib = 2**30
        print(f"\nbf16 linear weights: dense {bf16['dense']['weight_bytes'] / gib:.2f} GiB, 2:4 {bf16['sparse']['weight_bytes'] / gib:.2f} GiB; "
              f"load-time swap {bf16.get('load_s', 0):.1f} s (dispatch timings {bf16.get('dispatch_s', 0):.1f} s); "
              f"swap check {bf16.get('check')}")  # fmt: skip
        for k, v in (bf16.get("dispatch") or {}).get("decisions", {}).items():
            print(f"dispatch {v['table']}")
    c = res.get("compress")
    if c:
        print(f"\nsection 3 ({c.get('device')}): model identical {c.get('model_identical')}, calibration identical "
              f"{c.get('calib_identical')}, dense ppl {_f(c.get('dense_ppl'), '{:.3f}')} "
              f"(CPU {_f(c.get('reference', {}).get('dense_ppl'), '{:.3f}')})")  # fmt: skip
        print("\n| recipe | GPU prune s | CPU prune s | ppl GPU | ppl CPU | within 1% | exactly 2:4 | rows differing | sampled groups differing (ties / not) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, r in c.get("recipes", {}).items():
            m = c.get("masks", {}).get(label)
            rows = f"{m['rows_differ']} / {m['rows']}" if m else "-"
            smp = f"{m['sampled']['differ']} / {m['sampled']['groups']} ({m['sampled']['ties']} / {m['sampled']['not_ties']})" if m else "-"
            print(f"| {label} | {_f(r.get('seconds'), '{:.1f}')} | {_f(r.get('cpu_seconds'), '{:.1f}')} | {_f(r.get('ppl'), '{:.3f}')} "
                  f"| {_f(r.get('cpu_ppl'), '{:.3f}')} | {r.get('ppl_within_1pct', '-')} | {r.get('exactly_2of4', '-')} | {rows} | {smp} |")  # fmt: skip
    t = res.get("tests_gpu")
    if t:
        print(f"\ntests/gpu: {t.get('summary', t)}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status")
    st.add_argument("--parts", required=True)
    st.add_argument("--out", required=True)
    st.add_argument("--name", required=True)
    st.add_argument("--status", required=True)
    st.add_argument("--rc", type=int, default=None)
    st.add_argument("--seconds", type=float, default=None)
    st.add_argument("--limit", type=int, default=None)
    st.add_argument("--note", default=None)
    tb = sub.add_parser("table")
    tb.add_argument("--json", required=True)
    en = sub.add_parser("env")
    en.add_argument("--out", required=True)
    en.add_argument("--dry-run", action="store_true")
    ju = sub.add_parser("junit")
    ju.add_argument("--xml", required=True)
    ju.add_argument("--out", required=True)
    ju.add_argument("--note", default=None)
    a = ap.parse_args()
    {"status": cmd_status, "table": cmd_table, "env": cmd_env, "junit": cmd_junit}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
