"""PHO report: does each proxy track held-out perplexity, and what did it cost?

Two halves: ``report_data`` reads a search directory (its Optuna studies, ``best_*.json`` and
the validation rows of ``crepe search-validate``) and computes the correlations;
``render_report`` turns that into ``report.md``, ``trajectory.png`` and ``scatter.png``.
``write_report`` does both. Neither imports the search or the validation code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..core.files import atomic_write
from .config import PROXY_NAMES

__all__ = ["VALIDATION_FILE", "StudySummary", "ProxyFit", "ReportData", "report_data", "render_report", "write_report"]

VALIDATION_FILE = "validation.jsonl"


@dataclass
class StudySummary:
    name: str
    proxy: str | None
    sampler: str | None
    values: list[float]  # finished trials, in trial order
    seconds: float  # trial time, summed
    best_value: float | None
    best_params: dict


@dataclass
class ProxyFit:
    proxy: str
    spearman: float
    pearson: float
    pearson_log: float  # against log perplexity
    seconds: float  # mean per evaluation


@dataclass
class ReportData:
    bests: dict[str, dict] = field(default_factory=dict)  # proxy -> best_<proxy>.json
    studies: list[StudySummary] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # validation.jsonl
    fits: list[ProxyFit] = field(default_factory=list)


def _studies(out: Path) -> list[StudySummary]:
    import optuna

    db = out / "pho.db"
    if not db.is_file():
        return []
    storage = f"sqlite:///{db.resolve()}"
    res = []
    for s in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        done = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
        best = min(done, key=lambda t: t.value) if done else None
        res.append(StudySummary(
            s.study_name, study.user_attrs.get("proxy"), study.user_attrs.get("sampler"), [t.value for t in done],
            sum(t.user_attrs.get("seconds", 0.0) for t in done), best.value if best else None,
            {k: round(v, 3) for k, v in best.params.items()} if best else {},
        ))  # fmt: skip
    return res


def report_data(out_dir: str | Path) -> ReportData:
    from scipy.stats import pearsonr, spearmanr

    out = Path(out_dir)
    data = ReportData()
    for f in sorted(out.glob("best_*.json")):
        b = json.loads(f.read_text())
        data.bests[b["proxy"]] = b
    data.studies = _studies(out)
    vpath = out / VALIDATION_FILE
    data.rows = [json.loads(line) for line in vpath.read_text().splitlines()] if vpath.is_file() else []
    if data.rows:
        y = [r["heldout_ppl"] for r in data.rows]
        ly = [math.log(v) for v in y]
        for p in PROXY_NAMES:
            if not all(p in r for r in data.rows):
                continue
            x = [r[p] for r in data.rows]
            secs = sum(r[f"{p}_seconds"] for r in data.rows) / len(data.rows)
            data.fits.append(ProxyFit(p, spearmanr(x, y).statistic, pearsonr(x, y).statistic, pearsonr(x, ly).statistic, secs))
    return data


def _trajectories(studies: list[StudySummary], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(5 * len(studies), 3.6), squeeze=False)
    for ax, st in zip(axes[0], studies):
        run = [min(st.values[: i + 1]) for i in range(len(st.values))]
        ax.plot(range(len(st.values)), st.values, ".", alpha=0.5, label="trial")
        ax.plot(range(len(st.values)), run, "-", label="best so far")
        ax.set_title(f"{st.proxy} ({st.sampler})")
        ax.set_xlabel("trial")
        ax.set_ylabel(st.proxy or "value")
        if st.proxy == "ppl":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def _scatter(rows: list[dict], fits: list[ProxyFit], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(4.2 * len(fits), 3.6), squeeze=False)
    for ax, fit in zip(axes[0], fits):
        p = fit.proxy
        for kind, mk in (("sample", "o"), ("ria", "s"), ("best", "*")):
            pts = [(r[p], r["heldout_ppl"]) for r in rows if r["kind"].startswith(kind)]
            if pts:
                ax.scatter(*zip(*pts), marker=mk, s=30 if mk != "*" else 90, label=kind)
        ax.set_yscale("log")
        ax.set_xlabel(p)
        ax.set_ylabel("held-out ppl")
        ax.set_title(f"{p}: Spearman {fit.spearman:.2f}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def _row(label: str, r: dict) -> str:
    nan = float("nan")
    pp = {k: round(v, 3) for k, v in r["params"].items()}
    return (f"| {label} | `{pp}` | {r['heldout_ppl']:.2f} | {r.get('recon', nan):.4g} | {r.get('energy', nan):.4g} | "
            f"{r.get('diag', nan):.4g} | {r.get('gini', nan):.4g} | {r.get('ppl', nan):.2f} |")  # fmt: skip


def render_report(data: ReportData, out_dir: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    lines = ["# PHO report", ""]
    if data.bests:
        b = next(iter(data.bests.values()))
        lines += [
            f"Model `{b['model']}`, structure {b['structure']} (sparsity {b['sparsity']:g}), calibration "
            f"{b['num_samples']} x {b['seqlen']} tokens of `{b['calib']}`. The proxies score "
            f"{b.get('sampled_layers')} of {b.get('layers')} linear layers; statistics cached once "
            f"({b.get('stats_mib', 0):.1f} MiB, gathered in {b.get('stats_seconds') or 0:.1f} s).",
            "",
        ]
    if data.studies:
        lines += ["## Searches", "", "| study | proxy | sampler | finished trials | trial time, total s | per trial s | best value | best parameters |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for st in data.studies:
            n = len(st.values)
            best = st.best_value if st.best_value is not None else float("nan")
            lines.append(f"| {st.name} | {st.proxy} | {st.sampler} | {n} | {st.seconds:.1f} | {st.seconds / max(n, 1):.2f} | {best:.5g} | `{st.best_params}` |")
        _trajectories(data.studies, out / "trajectory.png")
        lines += ["", "![search trajectories](trajectory.png)", ""]
        per = {st.proxy: (st.seconds, len(st.values)) for st in data.studies}
        if "ppl" in per and per["ppl"][1]:
            ppl_s, ppl_n = per["ppl"]
            lines += ["### Wall time against the perplexity baseline", "", "Trial time only (statistics are gathered once and shared by all).", "", "| proxy | trials | seconds | ppl baseline, same trials, s | ratio |", "| --- | --- | --- | --- | --- |"]  # fmt: skip
            for p, (s, n) in per.items():
                if p == "ppl" or not n:
                    continue
                same = ppl_s / ppl_n * n
                lines.append(f"| {p} | {n} | {s:.1f} | {same:.1f}{'' if n == ppl_n else ' (scaled from ' + str(ppl_n) + ')'} | 1/{same / max(s, 1e-9):.0f} |")
            lines.append("")
    if data.rows:
        rows, ev = data.rows, data.rows[0]["eval"]
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
        lines += [f"| {f.proxy} | {f.spearman:.3f} | {f.pearson:.3f} | {f.pearson_log:.3f} | {f.seconds:.2f} |" for f in data.fits]
        _scatter(rows, data.fits, out / "scatter.png")
        lines += ["", "![proxy vs held-out perplexity](scatter.png)", "", "| configuration | parameters | held-out ppl | recon | energy | diag | gini | calib ppl |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        lines += [_row(r["kind"], r) for r in sorted((r for r in rows if r["kind"] != "sample"), key=lambda r: r["heldout_ppl"])]
        best_sample = min((r for r in rows if r["kind"] == "sample"), key=lambda r: r["heldout_ppl"], default=None)
        if best_sample:
            lines.append(_row("best uniform sample", best_sample))
        lines.append("")
    atomic_write(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"


def write_report(out_dir: str | Path) -> Path:
    """``report.md`` (and its figures) from what the search directory holds now."""
    return render_report(report_data(out_dir), out_dir)
