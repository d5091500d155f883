"""PHO from Python and from `crepe search`: load, gather statistics once, search, write.

    from crepe_plugin.pho import search
    result = search("smollm2", calib="wiki.valid.tokens.txt", structure="2:4",
                    config=SearchConfig(proxy="energy", trials=60), out_dir="pho-run")

Writes into ``out_dir``: the Optuna study (``pho.db``, SQLite, unless a storage URL is
given), the cached statistics, ``best_<proxy>.json`` and ``recipe_<proxy>.yaml`` (a
drop-in CRePEPruningModifier stage that prunes exactly what the search evaluated: the same
layers, structure, sparsity, scope and coefficients), and ``report.md``.

What the search does not choose comes from where the modifier takes it: kernel, border and
neighbor_map from the structure's shipped defaults (``core.config.crepe_defaults``), the scope
from ``core.config.default_scope``, the layers from the modifier's default targets and ignore
list (``crepe_plugin.selection``) plus the caller's ``ignore``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from ..core import PruningError, crepe_defaults, default_scope, parse_structure
from ..core.files import atomic_write
from ..core.layers import check_name_patterns
from ..selection import PRUNABLE
from .config import SearchConfig
from .report import write_report
from .search import fixed_part, run_search
from .session import build_evaluator, load_session, search_ignore, stats_meta

__all__ = ["search", "recipe_yaml"]


def recipe_yaml(result: dict) -> str:
    """A CRePEPruningModifier stage that prunes what the search ``result`` evaluated, with its best point."""
    import yaml

    n, _ = parse_structure(result["structure"])
    args = {"mask_structure": result["structure"]}
    if not n:
        args.update(sparsity=result["sparsity"], scope=result["scope"])
    args.update(result["config"])  # every coefficient, at full precision
    args.update(targets=list(result["targets"]), ignore=list(result["ignore"]))
    head = (
        f"# CRePE coefficients found by PHO (proxy '{result['proxy']}', {result['trials']} trials,\n"
        f"# study '{result['study_name']}'). Drop-in stage for an llm-compressor recipe.\n"
    )
    body = {"sparsity_stage": {"sparsity_modifiers": {"CRePEPruningModifier": args}}}
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


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
    scope: str | None = None,
    ignore: tuple[str, ...] = (),
) -> dict:
    """Run PHO (resuming the stored study if any) and write its outputs into ``out_dir``.

    ``fixed``: values for the fields PHO does not search (kernel, border, neighbor_map) instead
    of the structure's defaults. ``scope`` (unstructured): default the structure's. ``ignore``:
    layers left out besides the defaults (name suffixes or 're:' regexes), e.g. a layer whose
    input width is not divisible by M."""
    cfg = config or SearchConfig()
    sparsity = _search_sparsity(structure, sparsity)
    n, m = parse_structure(structure)
    structure = f"{n}:{m}"
    check_name_patterns(ignore, "--ignore")  # before the model loads
    scope = scope or default_scope(structure)
    ignore = search_ignore(ignore)
    fixed = {**fixed_part(crepe_defaults(structure)), **(fixed or {})}
    out, created, cfg = _open_folder(out_dir, model, calib, cfg)
    try:  # a search that fails before its first trial leaves no folder it created
        mdl, _tok, batches = load_session(model, calib, num_samples, seqlen, seed)
        meta = stats_meta(model, calib, num_samples, seqlen, seed, cfg.layers, ignore)
        ev, info = build_evaluator(mdl, batches, out, structure, sparsity, cfg, meta, scope, ignore)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    t0 = time.perf_counter()
    result = run_search(ev, cfg, fixed, identity=meta)
    result.update(info, search_seconds=time.perf_counter() - t0, structure=structure, sparsity=sparsity,
                  model=str(model), calib=str(calib), num_samples=num_samples, seqlen=seqlen, seed=seed,
                  scope=scope, targets=list(PRUNABLE), ignore=ignore)  # fmt: skip
    if out is not None:
        atomic_write(out / f"best_{cfg.proxy}.json", json.dumps(result, indent=2) + "\n")
        atomic_write(out / f"recipe_{cfg.proxy}.yaml", recipe_yaml(result))
        write_report(out)
    return result
