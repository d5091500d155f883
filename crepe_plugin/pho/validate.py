"""``crepe search-validate``: the proxies against held-out perplexity over sampled
configurations, RIA and the searched optima (rows in ``validation.jsonl``, resumable)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from loguru import logger
from tqdm.auto import tqdm

from ..core import CRePEConfig, crepe_defaults
from ..core.files import atomic_write
from ..core.stats import CalibStats
from .calib import STATS_FILE
from .config import PROXY_NAMES, SEARCHED, SearchConfig, SearchSpace
from .report import VALIDATION_FILE, write_report
from .search import RIA_PARAMS, fixed_part
from .session import build_evaluator, load_session, search_ignore, search_settings, stats_meta

__all__ = ["validate", "sample_configs"]


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
    proxies: tuple[str, ...] = PROXY_NAMES,
) -> Path:
    """Add rows to DIR/validation.jsonl (resuming) and rewrite DIR/report.md."""
    from ..data import read_text
    from ..evaluate import perplexity_of_ids

    out = Path(out_dir)
    st = search_settings(out)
    cfg = SearchConfig()
    if (out / STATS_FILE).is_file():  # score the proxies on the layers the search sampled
        layers = CalibStats.load(out / STATS_FILE).meta.get("layers", "6")
        cfg = SearchConfig(layers="all" if layers == "all" else int(layers))
    calib_seed = st.get("seed", 0)  # the search's own calibration windows; ``seed`` draws the samples
    ignore = search_ignore(st.get("ignore", ()))
    model, tok, batches = load_session(st["model"], st["calib"], st["num_samples"], st["seqlen"], calib_seed)
    meta = stats_meta(st["model"], st["calib"], st["num_samples"], st["seqlen"], calib_seed, cfg.layers, ignore)
    ev, _ = build_evaluator(model, batches, out, st["structure"], st["sparsity"], cfg, meta, st.get("scope", "matrix"), ignore)
    # what the search kept fixed (kernel, border, neighbor_map), as it stored it
    fixed = fixed_part(CRePEConfig(**st["config"]) if "config" in st else crepe_defaults(st["structure"]))
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
                r[name] = ev.proxy(CRePEConfig(**r["params"], **fixed), name)
                r[f"{name}_seconds"] = time.perf_counter() - t0
                filled = True
    if filled:
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
    for kind, p in tqdm(points, desc="PHO validation"):
        key = json.dumps(p, sort_keys=True)
        if key in done:
            continue
        c = CRePEConfig(**p, **fixed)
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
