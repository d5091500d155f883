"""What a PHO search and its validation share: the loaded model and calibration windows, the
statistics (cached in the search directory), the evaluator over them, and the stored settings.
``api`` (search) and ``validate`` both import this module; neither imports the other."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from loguru import logger

from ..core.stats import CalibStats
from ..selection import DEFAULT_IGNORE, PRUNABLE
from .calib import STATS_FILE, sample_layer_names, statistics_pass, target_modules
from .config import SearchConfig
from .search import Evaluator

__all__ = ["search_ignore", "stats_meta", "load_session", "build_evaluator", "search_settings"]


def search_ignore(entries: Iterable[str] = ()) -> list[str]:
    """The ignore list of a search: the pruner's default ignores plus ``entries`` (name suffixes,
    or 're:' regexes), written as the recipe's ``ignore`` entries (a suffix S as 're:.*S$')."""
    out = list(DEFAULT_IGNORE)
    for e in entries:
        pattern = e if e.startswith("re:") else f"re:.*{re.escape(e)}$"
        if pattern not in out:
            out.append(pattern)
    return out


def stats_meta(model: str, calib: str, num_samples: int, seqlen: int, seed: int, layers,
               ignore: Iterable[str] = DEFAULT_IGNORE) -> dict:  # fmt: skip
    """What the cached statistics were gathered on (a cache of other settings is recomputed)."""
    return {"model": str(model), "calib": str(calib), "num_samples": num_samples, "seqlen": seqlen, "seed": seed,
            "layers": str(layers), "targets": list(PRUNABLE), "ignore": list(ignore)}  # fmt: skip


def load_session(model: str, calib: str, num_samples: int, seqlen: int, seed: int):
    """(model, tokenizer, calibration batches) with the model in float32 on CPU, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import calibration_dataset
    from ..pipeline import resolve_model

    from ..models import check_model

    path = resolve_model(model)
    check_model(path)
    tok = AutoTokenizer.from_pretrained(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    limit = getattr(m.config, "max_position_embeddings", None)
    ds = calibration_dataset(calib, tok, num_samples, seqlen, seed, max_positions=limit)
    batches = [torch.tensor([row]) for row in ds["input_ids"]]
    return m, tok, batches


def build_evaluator(
    model: torch.nn.Module,
    batches: list[torch.Tensor],
    out_dir: Path | None,
    structure: str,
    sparsity: float,
    cfg: SearchConfig,
    meta: dict,
    scope: str = "matrix",
    ignore: Iterable[str] = DEFAULT_IGNORE,
) -> tuple[Evaluator, dict]:
    """Evaluator over the layers the pruner would prune (``calib.target_modules``), with statistics
    from ``out_dir``'s cache when its metadata matches."""
    modules = target_modules(model, ignore)
    sampled = sample_layer_names(modules, cfg.layers)
    info: dict[str, Any] = {}
    stats = None
    cache = out_dir / STATS_FILE if out_dir else None
    lock = None
    if cache is not None:
        from filelock import FileLock

        lock = FileLock(str(cache) + ".lock")
        lock.acquire()
    try:
        if cache is not None and cache.is_file():
            stats = CalibStats.load(cache)
            if {k: v for k, v in stats.meta.items() if k != "seconds"} != meta:
                logger.warning(f"{cache} was gathered with other settings ({stats.meta}); recomputing")
                stats = None
            else:
                info["stats_seconds"] = stats.meta.get("seconds")
                logger.info(f"PHO: statistics loaded from {cache}")
        if stats is None:
            t0 = time.perf_counter()
            stats = statistics_pass(model, batches, modules, sampled, meta=dict(meta))
            info["stats_seconds"] = time.perf_counter() - t0
            if cache is not None:
                stats.meta = {**meta, "seconds": info["stats_seconds"]}
                cache.parent.mkdir(parents=True, exist_ok=True)
                stats.save(cache)
    finally:
        if lock is not None:
            lock.release()
    info["stats_mib"] = stats.nbytes() / 2**20
    info["sampled_layers"] = len(sampled)
    info["layers"] = len(modules)
    ev = Evaluator(model, modules, stats, structure, sparsity, scope, sampled, batches[: cfg.ppl_samples])
    return ev, info


def search_settings(out: Path) -> dict:
    """The settings a finished search stored in its best_*.json (model, calibration, seed...)."""
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such directory; give the --out folder of a `crepe search`")
    found = sorted(out.glob("best_*.json"))
    if not found:
        raise FileNotFoundError(f"{out} holds no search result (best_*.json); run `crepe search ... --out {out}` first")
    return json.loads(found[0].read_text())
