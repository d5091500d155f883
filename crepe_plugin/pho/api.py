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
import shutil
import time
from pathlib import Path

from ..core import PruningError, parse_structure
from ..core.layers import check_name_patterns
from .config import SearchConfig
from .report import write_atomic, write_report
from .search import run_search
from .session import FIXED_DEFAULT, build_evaluator, load_session, stats_meta

__all__ = ["search", "recipe_yaml"]

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


def _search_sparsity(structure: str, sparsity: float | None) -> float:
    """The sparsity searched: N/M for N:M (a --sparsity that contradicts it refused), else given."""
    n, m = parse_structure(structure)
    if n and sparsity is not None and abs(sparsity - n / m) > 1e-9:
        raise PruningError(f"--sparsity {sparsity} contradicts --structure {structure}, which prunes {n}/{m}; "
                           "drop --sparsity for N:M, or give --structure 0:0 for unstructured")  # fmt: skip
    if sparsity is None:
        if not n:
            raise PruningError("--sparsity is required for unstructured search (--structure 0:0)")
        sparsity = n / m
    if not 0 < sparsity < 1:
        raise PruningError(f"--sparsity must lie strictly between 0 and 1, got {sparsity}")
    return sparsity


def _open_folder(out_dir, model: str, calib: str, cfg: SearchConfig) -> tuple[Path | None, bool, SearchConfig]:
    """(the checked --out folder, whether this run created it, cfg with its storage): the folder
    is checked (``outputs.search_folder``) and the study's storage opened before the model loads,
    so a bad --out or --storage fails at once and leaves nothing."""
    from ..outputs import OutputError, search_folder
    from ..pipeline import input_paths, resolve_model

    out, created = None, False
    if out_dir is not None:
        out, created = search_folder(out_dir, input_paths(resolve_model(model), calib=calib))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"--out {out}: cannot create it ({e.strerror or e})") from None
        if cfg.storage is None:
            cfg = cfg.model_copy(update={"storage": f"sqlite:///{(out / 'pho.db').resolve()}"})
    try:
        if cfg.storage is not None:
            open_storage(cfg.storage)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out, created, cfg


def open_storage(url: str):
    """The Optuna storage at ``url``; PruningError in one line naming --storage when it cannot be opened
    (a malformed URL, a database that cannot be reached, SQLite on a read-only file system)."""
    import optuna

    try:
        return optuna.storages.get_storage(url)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy and drivers raise many kinds
        raise PruningError(f"--storage {url!r}: cannot open it ({' '.join(str(e).split())[:200]})") from None


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
    sparsity = _search_sparsity(structure, sparsity)
    check_name_patterns(ignore, "--ignore")  # before the model loads
    out, created, cfg = _open_folder(out_dir, model, calib, cfg)
    try:  # a search that fails before its first trial leaves no folder it created
        mdl, _tok, batches = load_session(model, calib, num_samples, seqlen, seed)
        meta = stats_meta(model, calib, num_samples, seqlen, seed, cfg.layers)
        if tuple(ignore) != ("lm_head",):
            meta["ignore"] = list(ignore)
        ev, info = build_evaluator(mdl, batches, out, structure, sparsity, cfg, meta, scope, tuple(ignore))
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    t0 = time.perf_counter()
    result = run_search(ev, cfg, {**FIXED_DEFAULT, **(fixed or {})}, identity=meta)
    result.update(info, search_seconds=time.perf_counter() - t0, structure=structure, sparsity=sparsity,
                  model=str(model), calib=str(calib), num_samples=num_samples, seqlen=seqlen, seed=seed,
                  scope=scope, ignore=list(ignore))  # fmt: skip
    if out is not None:
        write_atomic(out / f"best_{cfg.proxy}.json", json.dumps(result, indent=2) + "\n")
        write_atomic(out / f"recipe_{cfg.proxy}.yaml", recipe_yaml(result, structure, sparsity))
        write_report(out)
    return result
