"""PHO from Python and from `crepe search`: load, gather statistics once, search, write.

    from crepe_plugin.pho import search
    result = search("smollm2", calib="wiki.valid.tokens.txt", structure="2:4",
                    config=SearchConfig(proxy="energy", trials=60), out_dir="pho-run")

Writes into ``out_dir``: the Optuna study (``pho.db``, SQLite, unless a storage URL is
given), the cached statistics, ``best_<proxy>.json`` and ``recipe_<proxy>.yaml`` (a
drop-in CRePEPruningModifier stage), and ``report.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from loguru import logger

from ..core import parse_structure
from .calib import STATS_FILE, CalibStats, gather_stats, sample_layer_names, target_modules
from .config import SearchConfig
from .search import Evaluator, run_search

__all__ = ["search", "build_evaluator", "recipe_yaml", "load_session"]

FIXED_DEFAULT = {"kernel": "box", "border": "mean", "neighbor_map": "ri"}


def _stats_meta(model: str, calib: str, num_samples: int, seqlen: int, seed: int, layers) -> dict:
    return {"model": str(model), "calib": str(calib), "num_samples": num_samples, "seqlen": seqlen, "seed": seed, "layers": str(layers)}


def load_session(model: str, calib: str, num_samples: int, seqlen: int, seed: int):
    """(model, tokenizer, calibration batches) with the model in float32 on CPU, eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import calibration_dataset
    from ..pipeline import resolve_model

    path = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    ds = calibration_dataset(calib, tok, num_samples, seqlen, seed)
    batches = [torch.tensor([row]) for row in ds["input_ids"]]
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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
    ignore: tuple[str, ...] = ("lm_head",),
) -> tuple[Evaluator, dict]:
    """Evaluator with statistics from ``out_dir``'s cache when its metadata matches."""
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
            stats = gather_stats(model, batches, modules, sampled, meta=dict(meta))
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


def recipe_yaml(result: dict, structure: str, sparsity: float) -> str:
    c = result["config"]
    n, _ = parse_structure(structure)
    lines = [
        f"# CRePE coefficients found by PHO (proxy '{result['proxy']}', {result['trials']} trials,",
        f"# study '{result['study_name']}'). Drop-in stage for an llm-compressor recipe.",
        "sparsity_stage:",
        "  sparsity_modifiers:",
        "    CRePEPruningModifier:",
        f'      mask_structure: "{structure if n else "0:0"}"',
    ]
    if not n:
        lines.append(f"      sparsity: {sparsity}")
    for k in ("row_coef", "col_coef", "neighbor_coef", "kernel_size", "act_exponent", "kernel", "border", "neighbor_map"):
        v = c[k]
        lines.append(f"      {k}: {round(v, 6) if isinstance(v, float) else (repr(v) if isinstance(v, str) else v)}")
    lines += ['      targets: ["Linear"]', '      ignore: ["re:.*lm_head"]']
    return "\n".join(lines).replace("'", '"') + "\n"


def search(
    model: str,
    calib: str,
    structure: str = "2:4",
    sparsity: float | None = None,
    config: SearchConfig | None = None,
    out_dir: str | Path | None = None,
    num_samples: int = 64,
    seqlen: int = 512,
    seed: int = 0,
    fixed: dict | None = None,
    scope: str = "matrix",
    ignore: tuple[str, ...] = ("lm_head",),
) -> dict:
    """Run PHO (resuming the stored study if any) and write its outputs into ``out_dir``.

    ``ignore``: layers left out (name suffixes or 're:' regexes), e.g. a layer whose input
    width is not divisible by M."""
    cfg = config or SearchConfig()
    n, m = parse_structure(structure)
    if sparsity is None:
        if not n:
            raise ValueError("--sparsity is required for unstructured search (structure 0:0)")
        sparsity = n / m
    out = Path(out_dir) if out_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if cfg.storage is None:
            cfg = cfg.model_copy(update={"storage": f"sqlite:///{(out / 'pho.db').resolve()}"})
    mdl, _tok, batches = load_session(model, calib, num_samples, seqlen, seed)
    meta = _stats_meta(model, calib, num_samples, seqlen, seed, cfg.layers)
    if tuple(ignore) != ("lm_head",):
        meta["ignore"] = list(ignore)
    ev, info = build_evaluator(mdl, batches, out, structure, sparsity, cfg, meta, scope, tuple(ignore))
    t0 = time.perf_counter()
    result = run_search(ev, cfg, {**FIXED_DEFAULT, **(fixed or {})}, identity=meta)
    result.update(info, search_seconds=time.perf_counter() - t0, structure=structure, sparsity=sparsity,
                  model=str(model), calib=str(calib), num_samples=num_samples, seqlen=seqlen, seed=seed,
                  scope=scope, ignore=list(ignore))  # fmt: skip
    if out is not None:
        (out / f"best_{cfg.proxy}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"recipe_{cfg.proxy}.yaml").write_text(recipe_yaml(result, structure, sparsity))
        from .report import write_report

        write_report(out)
    return result
