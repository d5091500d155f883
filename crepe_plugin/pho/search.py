"""PHO: search CRePE's coefficients against a cheap proxy with Optuna (CMA-ES).

The engine is Optuna: its CmaEsSampler (backed by the `cmaes` package) for the proxies,
and, as the baseline PHO replaces, perplexity hill climbing (``--proxy ppl``) whose
proposals are enqueued into the same kind of study. A study lives in an Optuna storage
(SQLite by default from the CLI), so an interrupted search resumes, and several
processes or machines sharing one storage URL run trials of one search at once; every
process stops when the study holds ``trials`` finished trials.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import socket
import time
from typing import Any, Iterable

import torch
from loguru import logger

from ..core import (RIA_CONFIG, CRePEConfig, LayerStats, PruneConfig, PruningError, check_nm_width, layer_mask,
                    parse_structure, prune_layer, set_weight, weight_out_in)  # fmt: skip
from ..core.proxies import layer_proxy, output_energy, output_error_terms
from ..core.stats import CalibStats
from .config import SEARCHED, SearchConfig, SearchSpace

__all__ = ["Evaluator", "run_search", "suggest_config", "RIA_PARAMS", "space_dims", "fixed_part"]

RIA_PARAMS = {k: getattr(RIA_CONFIG, k) for k in SEARCHED}  # the searched fields at RIA's point


def fixed_part(config: CRePEConfig) -> dict[str, Any]:
    """The fields of ``config`` a search keeps fixed (kernel, border, neighbor_map)."""
    return {k: v for k, v in config.model_dump().items() if k not in SEARCHED}


def space_dims(space: SearchSpace) -> dict[str, Any]:
    """The searched parameters that are not fixed by their bounds."""
    out = {}
    for k in SEARCHED:
        r = getattr(space, k)
        if r.low != r.high:
            out[k] = r
    return out


def _clip_ria(space: SearchSpace) -> dict[str, Any]:
    """RIA's point, moved inside the bounds where they exclude it."""
    p = {}
    for k, v in RIA_PARAMS.items():
        r = getattr(space, k)
        p[k] = min(max(v, r.low), r.high)
    if p["kernel_size"] % 2 == 0:
        p["kernel_size"] -= 1
    return p


def suggest_config(trial, space: SearchSpace, fixed: dict[str, Any]) -> CRePEConfig:
    params = {}
    for k in SEARCHED:
        r = getattr(space, k)
        if r.low == r.high:
            params[k] = r.low
        elif k == "kernel_size":
            params[k] = trial.suggest_int(k, r.low, r.high, step=2)
        else:
            params[k] = trial.suggest_float(k, r.low, r.high)
    return CRePEConfig(**params, **fixed)


class Evaluator:
    """Scores CRePE configurations on one model from cached statistics.

    ``proxy(cfg, name)`` touches only the sampled layers; ``prune_model(cfg)`` prunes
    every targeted layer in place (a context manager that restores the dense weights).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        modules: dict[str, torch.nn.Module],
        stats: CalibStats,
        structure: str = "2:4",
        sparsity: float | dict[str, float] = 0.5,
        scope: str = "matrix",
        sampled: Iterable[str] | None = None,
        ppl_batches: list[torch.Tensor] | None = None,
    ):
        self.model = model
        self.modules = modules
        self.stats = stats
        self.structure = structure
        self.sparsity = sparsity
        self.scope = scope
        self.sampled = list(sampled) if sampled is not None else list(modules)
        self.ppl_batches = ppl_batches or []
        self._energy: dict[str, float] = {}  # tr(W H W^T) per sampled layer: config-independent
        n, m = parse_structure(structure)
        # refuse before any trial: a shape error inside Optuna would come as a logged traceback
        for name, mod in modules.items():
            leaf = name.rsplit(".", 1)[-1]
            check_nm_width(weight_out_in(mod).shape[1], m, name, f"leave it out with --ignore (e.g. --ignore '{leaf}')", n=n)

    def _config(self, cfg: CRePEConfig) -> PruneConfig:
        return PruneConfig(score=cfg, structure=self.structure, scope=self.scope)

    def _sparsity(self, name: str) -> float:
        return self.sparsity[name] if isinstance(self.sparsity, dict) else self.sparsity

    def _mask(self, name: str, cfg: PruneConfig):
        w = weight_out_in(self.modules[name]).detach()
        s = self.stats.sq_norms[name].to(w.device)
        scores, mask = layer_mask(w, s, cfg, self._sparsity(name), name)
        return w, s, scores, mask

    @torch.no_grad()
    def proxy(self, score: CRePEConfig, name: str) -> float:
        if name == "ppl":
            return self.calib_ppl(score)
        cfg = self._config(score)
        if name == "energy":  # pooled: sum of errors over sum of output energies
            num = den = 0.0
            for layer in self.sampled:
                w, _, _, mask = self._mask(layer, cfg)
                H = self.stats.H(layer)
                if H is None:
                    raise ValueError(f"the 'energy' proxy needs the Gram matrix of layer '{layer}'")
                if layer not in self._energy:
                    self._energy[layer] = output_energy(w, H)
                num += output_error_terms(w, mask, H)
                den += self._energy[layer]
            return num / den if den > 0 else 0.0
        vals = []
        for layer in self.sampled:
            w, s, scores, mask = self._mask(layer, cfg)
            H = self.stats.H(layer) if name == "recon" else None
            if H is not None and layer not in self._energy:
                self._energy[layer] = output_energy(w, H)
            vals.append(layer_proxy(name, w, mask, scores, s, H, layer, self._energy.get(layer)))
        return float(sum(vals) / len(vals))

    @contextlib.contextmanager
    def prune_model(self, score: CRePEConfig):
        """Every layer pruned with ``core.prune_layer`` as the modifier prunes it (mask only, dense statistics)."""
        cfg = self._config(score)
        saved = {}
        try:
            with torch.no_grad():
                for name, mod in self.modules.items():
                    w = weight_out_in(mod).detach()
                    pruned, _ = prune_layer(w, LayerStats(self.stats.sq_norms[name].to(w.device)), cfg, self._sparsity(name), layer_name=name)
                    saved[name] = mod.weight.data
                    set_weight(mod, pruned)
            yield self.model
        finally:
            for name, data in saved.items():
                self.modules[name].weight.data = data

    @torch.no_grad()
    def calib_ppl(self, cfg: CRePEConfig) -> float:
        if not self.ppl_batches:
            raise ValueError("the 'ppl' proxy needs calibration batches (ppl_samples)")
        from ..evaluate import perplexity_of_ids

        with self.prune_model(cfg) as m:
            nll = 0.0
            for ids in self.ppl_batches:
                nll += math.log(perplexity_of_ids(m, ids, ids.numel(), progress=False))
            return math.exp(nll / len(self.ppl_batches))


def _hillclimb_params(study, space: SearchSpace, seed: int) -> dict[str, Any]:
    """Next point of a stochastic hill climb: perturb one coordinate of the best point.

    The step starts at 20% of the range and halves after 2 * dims proposals without
    improvement. Deterministic given the study's history and the seed, so it resumes.
    """
    dims = space_dims(space)
    done = _finished(study)
    if not done:
        return _clip_ria(space)
    best = min(done, key=lambda t: t.value)
    stall = sum(1 for t in done if t.number > best.number)
    sigma = 0.2 * 0.5 ** (stall // max(2 * len(dims), 1))
    rng = random.Random(seed * 1_000_003 + len(study.get_trials(deepcopy=False)))
    params = {k: best.params.get(k, RIA_PARAMS[k]) for k in dims}
    k = rng.choice(sorted(dims))
    r = dims[k]
    if k == "kernel_size":
        params[k] = min(max(params[k] + rng.choice((-2, 2)), r.low), r.high)
    else:
        params[k] = min(max(params[k] + rng.gauss(0.0, sigma * (r.high - r.low)), r.low), r.high)
    return params


def _sampler(cfg: SearchConfig, space: SearchSpace):
    import optuna

    if cfg.sampler_name == "cmaes":
        import warnings

        # RIA is enqueued as trial 0; CMA-ES starts from the centre of the space.
        # with_margin keeps the integer kernel size from collapsing to one value.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaEsSampler(seed=cfg.seed, with_margin=True, warn_independent_sampling=False)
    if cfg.sampler_name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.RandomSampler(seed=cfg.seed)  # hill climbing enqueues every point


def default_study_name(structure: str, sparsity, proxy: str) -> str:
    sp = f"s{sparsity:g}" if isinstance(sparsity, float) else "smap"
    return f"crepe-{structure.replace(':', 'of')}-{sp}-{proxy}"


def study_identity(inputs: dict[str, Any]) -> str:
    """A short hash of everything that decides a trial's value (model, calibration, sample
    count, sequence length, seed, layer sample, structure, bounds, fixed choices)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_search(
    evaluator: Evaluator,
    cfg: SearchConfig,
    fixed: dict[str, Any] | None = None,
    progress: bool = True,
    identity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the study until it holds ``cfg.trials`` completed trials.

    ``fixed``: CRePEConfig fields not searched (kernel, border, neighbor_map; ``fixed_part`` of
    the pruner's resolved config). ``identity``: what the trials were measured on; a stored
    study of other inputs is refused rather than resumed (its trials would not be comparable).
    Returns {"params", "config", "value", "proxy", "sampler", "study_name", "trials", "trial_seconds"}.
    """
    import optuna

    # ERROR: a failed trial is re-raised to the caller anyway, and its WARNING would print a traceback (Ctrl-C included)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    fixed = dict(fixed or {})
    name = cfg.study_name or default_study_name(evaluator.structure, evaluator.sparsity, cfg.proxy)
    study = _open_study(name, evaluator, cfg, fixed, identity)
    _run_trials(study, name, cfg, _objective(evaluator, cfg, fixed), progress)
    return _result(study, name, cfg, fixed)


def _finished(study) -> list:
    """The completed trials (failed or interrupted ones do not count)."""
    import optuna

    return [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]


def _waiting(study) -> list:
    """Enqueued trials not yet run (RIA's point at the start)."""
    import optuna

    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))


def _open_study(name: str, evaluator: Evaluator, cfg: SearchConfig, fixed: dict[str, Any], identity: dict[str, Any] | None):
    """Create the study, or load it when its identity (what its trials were measured on) matches;
    a new study starts with RIA's point as trial 0."""
    import optuna

    space = cfg.bounds
    study = optuna.create_study(
        study_name=name, storage=cfg.storage, direction="minimize", sampler=_sampler(cfg, space), load_if_exists=True
    )
    sparsity = evaluator.sparsity if isinstance(evaluator.sparsity, float) else "map"
    ident = study_identity({
        **(identity or {}), "proxy": cfg.proxy, "structure": evaluator.structure, "scope": evaluator.scope,
        "sparsity": sparsity, "bounds": cfg.bounds.model_dump(), "fixed": fixed, "layers": cfg.layers,
    })  # fmt: skip
    stored = study.user_attrs.get("identity")
    if stored is not None and stored != ident and study.get_trials(deepcopy=False):
        raise PruningError(
            f"PHO study '{name}' in {cfg.storage or 'memory'} was measured on other inputs (model, calibration, "
            "samples, seqlen, seed, layers, structure, bounds or kernel choices differ); resuming would mix "
            "incomparable trials. Use another --out or --study, or delete the study to start afresh"
        )
    attrs = {"identity": ident, "proxy": cfg.proxy, "structure": evaluator.structure, "sparsity": sparsity,
             "sampler": cfg.sampler_name}  # fmt: skip
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({k: v for k, v in _clip_ria(space).items() if k in space_dims(space)}, user_attrs={"ria": True})
    return study


def _objective(evaluator: Evaluator, cfg: SearchConfig, fixed: dict[str, Any]):
    """The proxy of one trial's point; an invalid point or a non-finite value prunes the trial."""
    import optuna
    from pydantic import ValidationError

    def objective(trial):
        try:
            c = suggest_config(trial, cfg.bounds, fixed)
        except ValidationError as e:  # e.g. row_coef = col_coef = 0: no score at all
            raise optuna.TrialPruned(" ".join(str(e).split())) from None
        t0 = time.perf_counter()
        v = evaluator.proxy(c, cfg.proxy)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if not math.isfinite(v):
            raise optuna.TrialPruned(f"non-finite proxy {v}")
        return v

    return objective


def _run_trials(study, name: str, cfg: SearchConfig, objective, progress: bool) -> None:
    """One trial at a time until the study (shared with other processes, maybe) holds ``cfg.trials``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.trials, initial=min(len(_finished(study)), cfg.trials), desc=f"PHO ({cfg.proxy})", disable=not progress)
    try:  # closed before an error or Ctrl-C reaches the caller, so its last refresh comes first
        while (done := len(_finished(study))) < cfg.trials:
            others = len(study.get_trials(deepcopy=False)) - done
            if others > max(20, cfg.trials):
                raise PruningError(
                    f"PHO study '{name}': {others} trials failed or were pruned (non-finite proxy or invalid point) "
                    f"and only {done} completed; check the bounds and the calibration data"
                )
            if cfg.sampler_name == "hillclimb" and not _waiting(study):  # one proposal at a time, from all results so far
                study.enqueue_trial(_hillclimb_params(study, cfg.bounds, cfg.seed))
            study.optimize(objective, n_trials=1)
            bar.n = min(len(_finished(study)), cfg.trials)
            bar.refresh()
    finally:
        bar.close()


def _result(study, name: str, cfg: SearchConfig, fixed: dict[str, Any]) -> dict[str, Any]:
    space = cfg.bounds
    best = study.best_trial
    params = {k: (getattr(space, k).low if getattr(space, k).low == getattr(space, k).high else best.params[k]) for k in SEARCHED}
    done = _finished(study)
    logger.info(f"PHO ({cfg.proxy}): best {cfg.proxy} {best.value:.6g} at {params} after {len(done)} trials")
    return {
        "params": params,
        "config": CRePEConfig(**params, **fixed).model_dump(),
        "value": best.value,
        "proxy": cfg.proxy,
        "sampler": cfg.sampler_name,
        "study_name": name,
        "trials": len(done),
        "trial_seconds": sum(t.user_attrs.get("seconds", 0.0) for t in done),
    }
