"""PHO validation report: does each proxy track held-out perplexity, and what did it cost?

``validate`` prunes the model with RIA, with every searched optimum in the directory and
with ``samples`` configurations drawn uniformly from the search space, and records every
proxy next to held-out perplexity. ``write_report`` turns the directory's studies and
validation rows into ``report.md`` with a scatter plot and the search trajectories.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from loguru import logger
from tqdm.auto import tqdm

from ..core import CRePEConfig
from .config import SEARCHED, SearchConfig, SearchSpace

__all__ = ["validate", "write_report", "sample_configs"]

VALIDATION_FILE = "validation.jsonl"
PROXIES = ("recon", "energy", "diag", "gini", "ppl")


def _settings(out: Path) -> dict:
    found = sorted(out.glob("best_*.json"))
    if not found:
        raise FileNotFoundError(f"{out} holds no search result (best_*.json); run `crepe search ... --out {out}` first")
    return json.loads(found[0].read_text())


def sample_configs(space: SearchSpace, n: int, seed: int) -> list[dict]:
    """n points drawn uniformly from the space (kernel sizes uniform over the odd values)."""
    rng = random.Random(seed)
    pts = []
    for _ in range(n):
        p = {}
        for k in SEARCHED:
            r = getattr(space, k)
            if k == "kernel_size":
                p[k] = rng.choice(list(range(r.low, r.high + 1, 2)))
            else:
                p[k] = r.low + (r.high - r.low) * rng.random()
        pts.append(p)
    return pts


def validate(
    out_dir: str | Path,
    eval_text: str,
    samples: int = 30,
    eval_seqlen: int = 1024,
    eval_segments: int = 8,
    seed: int = 1,
    space: SearchSpace | None = None,
    proxies: tuple[str, ...] = PROXIES,
) -> Path:
    """Add rows to DIR/validation.jsonl (resuming) and rewrite DIR/report.md."""
    from ..data import read_text
    from ..evaluate import perplexity_of_ids
    from .api import FIXED_DEFAULT, _stats_meta, build_evaluator, load_session
    from .search import RIA_PARAMS

    out = Path(out_dir)
    st = _settings(out)
    from .calib import STATS_FILE, CalibStats

    cfg = SearchConfig()
    if (out / STATS_FILE).is_file():  # score the proxies on the layers the search sampled
        layers = CalibStats.load(out / STATS_FILE).meta.get("layers", "6")
        cfg = SearchConfig(layers="all" if layers == "all" else int(layers))
    seed = st.get("seed", 0)  # the search's own calibration windows
    model, tok, batches = load_session(st["model"], st["calib"], st["num_samples"], st["seqlen"], seed)
    meta = _stats_meta(st["model"], st["calib"], st["num_samples"], st["seqlen"], seed, cfg.layers)
    ignore = tuple(st.get("ignore", ("lm_head",)))
    if ignore != ("lm_head",):
        meta["ignore"] = list(ignore)
    ev, _ = build_evaluator(model, batches, out, st["structure"], st["sparsity"], cfg, meta, st.get("scope", "matrix"), ignore)
    ids = tok(read_text(eval_text), return_tensors="pt").input_ids

    points = [("ria", RIA_PARAMS)]
    for f in sorted(out.glob("best_*.json")):
        points.append((f"best_{json.loads(f.read_text())['proxy']}", json.loads(f.read_text())["params"]))
    points += [("sample", p) for p in sample_configs(space or cfg.bounds, samples, seed)]

    path = out / VALIDATION_FILE
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {json.dumps(r["params"], sort_keys=True) for r in rows}
    # rows from an earlier run lacking a proxy asked for now: add it (held-out ppl is kept)
    filled = False
    for r in rows:
        for name in proxies:
            if name not in r:
                t0 = time.perf_counter()
                r[name] = ev.proxy(CRePEConfig(**r["params"], **FIXED_DEFAULT), name)
                r[f"{name}_seconds"] = time.perf_counter() - t0
                filled = True
    if filled:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    for kind, p in tqdm(points, desc="PHO validation"):
        key = json.dumps(p, sort_keys=True)
        if key in done:
            continue
        c = CRePEConfig(**p, **FIXED_DEFAULT)
        row = {"kind": kind, "params": p}
        for name in proxies:
            t0 = time.perf_counter()
            row[name] = ev.proxy(c, name)
            row[f"{name}_seconds"] = time.perf_counter() - t0
        with ev.prune_model(c) as m:
            row["heldout_ppl"] = perplexity_of_ids(m, ids, eval_seqlen, eval_segments, progress=False)
        row["eval"] = {"text": str(eval_text), "seqlen": eval_seqlen, "segments": eval_segments}
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done.add(key)
        logger.info(f"validation {kind}: held-out ppl {row['heldout_ppl']:.2f}, " + ", ".join(f"{n} {row[n]:.4g}" for n in proxies))
    write_report(out)
    return out / "report.md"


def _studies(out: Path):
    import optuna

    db = out / "pho.db"
    if not db.is_file():
        return []
    storage = f"sqlite:///{db.resolve()}"
    res = []
    for s in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        res.append((s.study_name, study.user_attrs, done))
    return res


def write_report(out_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy.stats import pearsonr, spearmanr

    out = Path(out_dir)
    nan = float("nan")
    lines = ["# PHO report", ""]
    bests = {json.loads(f.read_text())["proxy"]: json.loads(f.read_text()) for f in sorted(out.glob("best_*.json"))}
    if bests:
        b = next(iter(bests.values()))
        lines += [
            f"Model `{b['model']}`, structure {b['structure']} (sparsity {b['sparsity']:g}), calibration "
            f"{b['num_samples']} x {b['seqlen']} tokens of `{b['calib']}`. The proxies score "
            f"{b.get('sampled_layers')} of {b.get('layers')} linear layers; statistics cached once "
            f"({b.get('stats_mib', 0):.1f} MiB, gathered in {b.get('stats_seconds') or 0:.1f} s).",
            "",
        ]

    studies = _studies(out)
    if studies:
        lines += ["## Searches", "", "| study | proxy | sampler | finished trials | trial time, total s | per trial s | best value | best parameters |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        fig, axes = plt.subplots(1, len(studies), figsize=(5 * len(studies), 3.6), squeeze=False)
        for ax, (name, attrs, done) in zip(axes[0], studies):
            secs = sum(t.user_attrs.get("seconds", 0.0) for t in done)
            best = min(done, key=lambda t: t.value) if done else None
            bp = {k: round(v, 3) for k, v in best.params.items()} if best else {}
            lines.append(f"| {name} | {attrs.get('proxy')} | {attrs.get('sampler')} | {len(done)} | {secs:.1f} | {secs / max(len(done), 1):.2f} | {best.value if best else float('nan'):.5g} | `{bp}` |")
            vals = [t.value for t in sorted(done, key=lambda t: t.number)]
            run = [min(vals[: i + 1]) for i in range(len(vals))]
            ax.plot(range(len(vals)), vals, ".", alpha=0.5, label="trial")
            ax.plot(range(len(vals)), run, "-", label="best so far")
            ax.set_title(f"{attrs.get('proxy')} ({attrs.get('sampler')})")
            ax.set_xlabel("trial")
            ax.set_ylabel(attrs.get("proxy") or "value")
            if attrs.get("proxy") in ("ppl",):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "trajectory.png", dpi=110)
        plt.close(fig)
        lines += ["", "![search trajectories](trajectory.png)", ""]
        per = {attrs.get("proxy"): (sum(t.user_attrs.get("seconds", 0.0) for t in done), len(done)) for _, attrs, done in studies}
        if "ppl" in per and per["ppl"][1]:
            ppl_s, ppl_n = per["ppl"]
            lines += ["### Wall time against the perplexity baseline", "", "Trial time only (statistics are gathered once and shared by all).", "", "| proxy | trials | seconds | ppl baseline, same trials, s | ratio |", "| --- | --- | --- | --- | --- |"]
            for p, (s, n) in per.items():
                if p == "ppl" or not n:
                    continue
                same = ppl_s / ppl_n * n
                lines.append(f"| {p} | {n} | {s:.1f} | {same:.1f}{'' if n == ppl_n else ' (scaled from ' + str(ppl_n) + ')'} | 1/{same / max(s, 1e-9):.0f} |")
            lines.append("")

    vpath = out / VALIDATION_FILE
    rows = [json.loads(line) for line in vpath.read_text().splitlines()] if vpath.is_file() else []
    if rows:
        y = [r["heldout_ppl"] for r in rows]
        ev = rows[0]["eval"]
        lines += [
            "## Proxy against held-out perplexity",
            "",
            f"{len(rows)} configurations ({sum(r['kind'] == 'sample' for r in rows)} drawn uniformly from the search space, "
            f"plus RIA and the searched optima), each pruning every targeted layer from the cached statistics; "
            f"held-out perplexity on `{Path(ev['text']).name}`, {ev['segments']} segments of {ev['seqlen']} tokens.",
            "",
            "| proxy | Spearman | Pearson | Pearson vs log ppl | mean s per evaluation |",
            "| --- | --- | --- | --- | --- |",
        ]
        present = [p for p in PROXIES if all(p in r for r in rows)]
        fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.6), squeeze=False)
        ly = [math.log(v) for v in y]
        for ax, p in zip(axes[0], present):
            x = [r[p] for r in rows]
            rs, rp, rl = spearmanr(x, y).statistic, pearsonr(x, y).statistic, pearsonr(x, ly).statistic
            secs = sum(r[f"{p}_seconds"] for r in rows) / len(rows)
            lines.append(f"| {p} | {rs:.3f} | {rp:.3f} | {rl:.3f} | {secs:.2f} |")
            for kind, mk in (("sample", "o"), ("ria", "s"), ("best", "*")):
                pts = [(r[p], r["heldout_ppl"]) for r in rows if r["kind"].startswith(kind)]
                if pts:
                    ax.scatter(*zip(*pts), marker=mk, s=30 if mk != "*" else 90, label=kind)
            ax.set_yscale("log")
            ax.set_xlabel(p)
            ax.set_ylabel("held-out ppl")
            ax.set_title(f"{p}: Spearman {rs:.2f}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "scatter.png", dpi=110)
        plt.close(fig)
        lines += ["", "![proxy vs held-out perplexity](scatter.png)", "", "| configuration | parameters | held-out ppl | recon | energy | diag | gini | calib ppl |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in sorted((r for r in rows if r["kind"] != "sample"), key=lambda r: r["heldout_ppl"]):
            pp = {k: round(v, 3) for k, v in r["params"].items()}
            lines.append(f"| {r['kind']} | `{pp}` | {r['heldout_ppl']:.2f} | {r.get('recon', nan):.4g} | {r.get('energy', nan):.4g} | {r.get('diag', nan):.4g} | {r.get('gini', nan):.4g} | {r.get('ppl', nan):.2f} |")
        best_sample = min((r for r in rows if r["kind"] == "sample"), key=lambda r: r["heldout_ppl"], default=None)
        if best_sample:
            b = best_sample
            lines.append(f"| best uniform sample | `{ {k: round(v, 3) for k, v in b['params'].items()} }` | {b['heldout_ppl']:.2f} | {b.get('recon', nan):.4g} | {b.get('energy', nan):.4g} | {b.get('diag', nan):.4g} | {b.get('gini', nan):.4g} | {b.get('ppl', nan):.2f} |")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
