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

from ..core import RIA_CONFIG, CRePEConfig, LayerShapeError, crepe_scores, parse_structure, prune_mask, set_weight, weight_out_in
from ..core.proxies import layer_proxy, output_energy, output_error_terms
from ..core.stats import CalibStats
from .config import SEARCHED, SearchConfig, SearchSpace

__all__ = ["Evaluator", "run_search", "suggest_config", "RIA_PARAMS", "space_dims"]

RIA_PARAMS = {k: getattr(RIA_CONFIG, k) for k in SEARCHED}  # the searched fields at RIA's point


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
        if n:  # refuse before any trial: a shape error inside Optuna would come as a logged traceback
            for name, mod in modules.items():
                cols = weight_out_in(mod).shape[1]
                if cols % m:
                    raise LayerShapeError(
                        f"layer '{name}': input dimension {cols} is not divisible by M={m} for {structure}; "
                        f"leave it out with --ignore (e.g. --ignore lm_head 're:.*{name.rsplit('.', 1)[-1]}')"
                    )

    def _mask(self, name: str, cfg: CRePEConfig):
        w = weight_out_in(self.modules[name]).detach()
        s = self.stats.sq_norms[name].to(w.device)
        scores = crepe_scores(w, s, cfg, layer_name=name)
        sp = self.sparsity[name] if isinstance(self.sparsity, dict) else self.sparsity
        mask = prune_mask(scores, sp, self.structure, self.scope, layer_name=name)
        return w, s, scores, mask

    @torch.no_grad()
    def proxy(self, cfg: CRePEConfig, name: str) -> float:
        if name == "ppl":
            return self.calib_ppl(cfg)
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
    def prune_model(self, cfg: CRePEConfig):
        saved = {}
        try:
            with torch.no_grad():
                for name, mod in self.modules.items():
                    w, _, _, mask = self._mask(name, cfg)
                    saved[name] = mod.weight.data
                    pruned = w.masked_fill(mask, 0)
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
    import optuna

    dims = space_dims(space)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
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

    ``fixed``: CRePEConfig fields not searched (kernel, border, neighbor_map).
    ``identity``: what the trials were measured on; a stored study of other inputs is refused
    rather than resumed (its trials would not be comparable).
    Returns {"params", "config", "value", "proxy", "study_name", "trials", "trial_seconds"}.
    """
    import optuna

    fixed = dict(fixed or {})
    space = cfg.bounds
    name = cfg.study_name or default_study_name(evaluator.structure, evaluator.sparsity, cfg.proxy)
    # ERROR: a failed trial is re-raised to the caller anyway, and its WARNING would print a traceback (Ctrl-C included)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(
        study_name=name, storage=cfg.storage, direction="minimize", sampler=_sampler(cfg, space), load_if_exists=True
    )
    ident = study_identity({
        **(identity or {}), "proxy": cfg.proxy, "structure": evaluator.structure, "scope": evaluator.scope,
        "sparsity": evaluator.sparsity if isinstance(evaluator.sparsity, float) else "map",
        "bounds": cfg.bounds.model_dump(), "fixed": fixed, "layers": cfg.layers,
    })  # fmt: skip
    stored = study.user_attrs.get("identity")
    if stored is not None and stored != ident and study.get_trials(deepcopy=False):
        from ..core.errors import PruningError

        raise PruningError(
            f"PHO study '{name}' in {cfg.storage or 'memory'} was measured on other inputs (model, calibration, "
            "samples, seqlen, seed, layers, structure, bounds or kernel choices differ); resuming would mix "
            "incomparable trials. Use another --out or --study, or delete the study to start afresh"
        )
    study.set_user_attr("identity", ident)
    study.set_user_attr("proxy", cfg.proxy)
    study.set_user_attr("structure", evaluator.structure)
    study.set_user_attr("sparsity", evaluator.sparsity if isinstance(evaluator.sparsity, float) else "map")
    study.set_user_attr("sampler", cfg.sampler_name)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial({k: v for k, v in _clip_ria(space).items() if k in space_dims(space)}, user_attrs={"ria": True})

    def objective(trial):
        from pydantic import ValidationError

        try:
            c = suggest_config(trial, space, fixed)
        except ValidationError as e:  # e.g. row_coef = col_coef = 0: no score at all
            raise optuna.TrialPruned(" ".join(str(e).split())) from None
        t0 = time.perf_counter()
        v = evaluator.proxy(c, cfg.proxy)
        trial.set_user_attr("seconds", time.perf_counter() - t0)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if not math.isfinite(v):
            raise optuna.TrialPruned(f"non-finite proxy {v}")
        return v

    def finished() -> int:  # failed or interrupted trials do not count
        return sum(1 for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.trials, initial=min(finished(), cfg.trials), desc=f"PHO ({cfg.proxy})", disable=not progress)
    try:  # closed before an error or Ctrl-C reaches the caller, so its last refresh comes first
        while finished() < cfg.trials:
            others = len(study.get_trials(deepcopy=False)) - finished()
            if others > max(20, cfg.trials):
                from ..core.errors import PruningError

                raise PruningError(
                    f"PHO study '{name}': {others} trials failed or were pruned (non-finite proxy or invalid point) "
                    f"and only {finished()} completed; check the bounds and the calibration data"
                )
            if cfg.sampler_name == "hillclimb":
                study.enqueue_trial(_hillclimb_params(study, space, cfg.seed))
            study.optimize(objective, n_trials=1)
            bar.n = min(finished(), cfg.trials)
            bar.refresh()
    finally:
        bar.close()
    best = study.best_trial
    params = {k: (getattr(space, k).low if getattr(space, k).low == getattr(space, k).high else best.params[k]) for k in SEARCHED}
    config = CRePEConfig(**params, **fixed)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    out = {
        "params": params,
        "config": config.model_dump(),
        "value": best.value,
        "proxy": cfg.proxy,
        "sampler": cfg.sampler_name,
        "study_name": name,
        "trials": len(done),
        "trial_seconds": sum(t.user_attrs.get("seconds", 0.0) for t in done),
    }
    logger.info(f"PHO ({cfg.proxy}): best {cfg.proxy} {best.value:.6g} at {params} after {len(done)} trials")
    return out
