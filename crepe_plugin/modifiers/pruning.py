"""CRePEPruningModifier and RIAPruningModifier: llm-compressor 0.14 glue around crepe_plugin.core.

Memory profile as WandaPruningModifier: one input-norm vector per targeted Linear, and
one score matrix at a time while a layer is pruned (at the end of its sequential epoch).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

import torch
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..checkpoint.record import merge_record, new_record
from ..compat.compressed_tensors import align_module_device, get_execution_device, match_named_modules
from ..compat.llmcompressor import GPTQModifier, QuantizationMixin, State, sequential_layer_targets
from ..core import (
    RIA_CONFIG,
    CRePEConfig,
    HessianStats,
    InputNormStats,
    LayerShapeError,
    PruningError,
    compensate_adaptive_nm,
    compensate_adaptive_unstructured,
    compensate_fixed_mask,
    crepe_defaults,
    crepe_saliency,
    crepe_scores,
    is_conv1d,
    parse_structure,
    prune_mask,
    refine_fixed_mask,
    weight_out_in,
)
from ..core.config import Border, Coef, KernelName, KernelSize, NeighborMap
from ..core.layers import check_name_patterns
from ..pho.config import SearchConfig
from .base import PRUNABLE, LayerwiseModifier

__all__ = ["CRePEPruningModifier", "RIAPruningModifier"]

SparsityArg = float | list[float] | dict[str, float] | None


def _key_matches(key: str, name: str) -> bool:
    """A sparsity-map key matches a module by exact name, name prefix, or 're:' regex."""
    if key.startswith("re:"):
        return re.match(key[3:], name) is not None
    return name == key or name.startswith(key + ".")


def _check_fraction(v: float, where: str) -> float:
    v = float(v)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {v}")
    return v


class CRePEPruningModifier(LayerwiseModifier):
    """One-shot CRePE pruning (RIA generalised with adaptive coefficients and a k x k
    neighborhood term). See docs/method.md.

    Sample yaml:

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        CRePEPruningModifier:
          mask_structure: "2:4"
          row_coef: 1.0
          col_coef: 1.0
          neighbor_coef: 0.0
          kernel_size: 3
          ignore: ["re:.*lm_head"]
    ```

    :param sparsity: fraction pruned: a float, a list with one value per decoder layer,
        or a dict {module name, name prefix or 're:' regex: value} (first match wins; a
        'default' key covers the rest). For N:M structures it defaults to N/M and every
        value must be N/M or 0 (0 leaves the layer dense).
    :param mask_structure: "N:M" (prune N of every M consecutive inputs) or "0:0".
    :param scope: unstructured only: "matrix" (one threshold per matrix, RIA) or "row".
    :param targets: module classes, names or 're:' regexes to prune (containers such as a
        decoder layer expand to their Linear layers).
    :param ignore: modules never pruned. Defaults to the lm_head.
    :param reconstruct: after the mask is fixed, update the kept weights to minimise the
        layer's output error on the calibration inputs (OBS / SparseGPT-style, blockwise,
        pruned positions stay exactly zero). Costs one fp32 Hessian (in x in) per layer.
    :param mask_selection: with ``reconstruct``: "fixed" chooses the whole mask from the
        scores first, then updates the kept weights; "adaptive" chooses each group
        of M inputs inside the OBS sweep, from CRePE's score of the weights as compensated so
        far (as SparseGPT chooses its mask; unstructured: each block of ``block_size`` inputs at
        its start), then refines on that mask. See docs/method.md.
    :param dampening_frac: Hessian dampening, as a fraction of its mean diagonal.
    :param block_size: columns per block of the reconstruction.
    :param refine_steps: conjugate-gradient steps after OBS towards the exact fixed-mask
        least-squares optimum (0 = OBS only). One (out x in) @ (in x in) matmul per step.
    :param search: a PHO block (proxy, trials, storage, bounds, layers, seed...). When
        given, PHO searches row_coef, col_coef, neighbor_coef, kernel_size and
        act_exponent on this oneshot's calibration data before any layer is pruned (one
        extra dense forward pass), then prunes with the best point. The coefficient
        fields above are then only the search's fallback. See docs/method.md.
    """

    sparsity: SparsityArg = None
    mask_structure: str = "0:0"
    scope: Literal["matrix", "row"] = "matrix"
    targets: str | list[str] = Field(default_factory=lambda: list(PRUNABLE))

    row_coef: Coef = 1.0
    col_coef: Coef = 1.0
    neighbor_coef: Coef = 0.0
    kernel_size: KernelSize = 3
    kernel: KernelName = "box"
    act_exponent: Coef = 0.5
    border: Border = "mean"
    neighbor_map: NeighborMap = "ri"

    reconstruct: bool = False
    mask_selection: Literal["fixed", "adaptive"] = "fixed"
    dampening_frac: float = Field(0.01, gt=0.0, lt=1.0)
    block_size: int = Field(128, ge=1)
    refine_steps: int = Field(20, ge=0, le=1000)
    search: SearchConfig | None = None

    method_name: ClassVar[str] = "crepe"

    _sparsities: dict[torch.nn.Module, float] = PrivateAttr(default_factory=dict)
    _pruned: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)
    _search_result: dict[str, Any] | None = PrivateAttr(default=None)

    # ---------------------------------------------------------------- validation
    @classmethod
    def _default_coefficients(cls, structure: str) -> dict:
        """Values for the coefficient fields (and unstructured scope) a recipe leaves out."""
        return crepe_defaults(structure)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        try:
            defaults = cls._default_coefficients(str(data.get("mask_structure", "0:0")))
        except PruningError:
            return data  # the structure's own validator reports it
        return {**{k: v for k, v in defaults.items() if k in cls.model_fields}, **data}

    @field_validator("mask_structure", mode="before")
    @classmethod
    def _valid_structure(cls, v: Any) -> str:
        n, m = parse_structure(str(v))
        return f"{n}:{m}"

    @field_validator("sparsity", mode="after")
    @classmethod
    def _valid_sparsity(cls, v: SparsityArg) -> SparsityArg:
        if v is None:
            return v
        if isinstance(v, dict):
            if not v:
                raise ValueError("sparsity: the per-layer map is empty")
            check_name_patterns([k for k in v if k != "default"], "sparsity")
            return {k: _check_fraction(x, f"sparsity[{k!r}]") for k, x in v.items()}
        if isinstance(v, list):
            if not v:
                raise ValueError("sparsity: the per-layer list is empty")
            return [_check_fraction(x, f"sparsity[{i}]") for i, x in enumerate(v)]
        return _check_fraction(v, "sparsity")

    @field_validator("search", mode="after")
    @classmethod
    def _valid_search(cls, v: SearchConfig | None) -> SearchConfig | None:
        if v is not None and v.proxy == "ppl":
            raise ValueError(
                "search.proxy 'ppl' is the perplexity baseline PHO replaces; it runs only from "
                "`crepe search`. Use 'recon', 'energy', 'diag' or 'gini' in a recipe"
            )
        return v

    @model_validator(mode="after")
    def _valid_combination(self) -> "CRePEPruningModifier":
        n, m = parse_structure(self.mask_structure)
        values = (
            [self.sparsity]
            if isinstance(self.sparsity, float)
            else list(self.sparsity.values())
            if isinstance(self.sparsity, dict)
            else list(self.sparsity or [])
        )
        if n == 0:
            if self.sparsity is None:
                raise ValueError("sparsity is required for unstructured pruning (mask_structure '0:0')")
            return self
        implied = n / m
        for x in values:
            if x not in (0.0, implied) and abs(x - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {x} conflicts with mask_structure '{self.mask_structure}', which "
                    f"prunes exactly {implied:g}; use {implied:g} (or 0 to keep a layer dense), "
                    "or mask_structure '0:0' for unstructured"
                )
        return self

    @model_validator(mode="after")
    def _valid_mask_selection(self) -> "CRePEPruningModifier":
        self.crepe_config  # noqa: B018  refuses a degenerate score (row_coef = col_coef = 0) at parse time
        if self.mask_selection == "adaptive" and not self.reconstruct:
            raise ValueError("mask_selection 'adaptive' chooses the mask during reconstruction; set reconstruct: true")
        return self

    @property
    def prunes_nothing(self) -> bool:
        """Every sparsity given is 0 (a pruner kept only to guide a channel permutation, or a mistake)."""
        sp = self.sparsity
        values = [sp] if isinstance(sp, float) else list(sp.values()) if isinstance(sp, dict) else list(sp or [None])
        return not any(v is None or v > 0 for v in values)

    @property
    def crepe_config(self) -> CRePEConfig:
        return CRePEConfig(**{k: getattr(self, k) for k in CRePEConfig.model_fields})

    # ---------------------------------------------------------------- lifecycle
    def _check_recipe_order(self) -> None:
        """Quantizing before pruning, or plain GPTQ after it, gives a model that is not
        N:M; refuse such a recipe instead of saving it."""
        from .gptq import MaskedGPTQModifier

        before, after = self._split_recipe()
        quant = [type(m).__name__ for m in before if isinstance(m, QuantizationMixin)]
        if quant:
            raise PruningError(
                f"{type(self).__name__} comes after {quant[0]} in the recipe: quantizing before pruning "
                "leaves quantized weights that pruning then changes; put the pruning stage first"
            )
        if any(isinstance(m, GPTQModifier) and not isinstance(m, MaskedGPTQModifier) for m in after):
            raise PruningError(
                "GPTQModifier after pruning refills the pruned weights (its error compensation knows no "
                "mask) and the saved model would not be N:M; use MaskedGPTQModifier (same fields)"
            )

    def on_initialize(self, state: State, **kwargs) -> bool:
        self._check_recipe_order()
        model = state.model
        modules = self.resolve_layers(model, self.targets, self.ignore)
        if not modules:
            raise PruningError(
                f"{type(self).__name__}: targets {self.targets} (ignore {self.ignore}) match no "
                "Linear layer in the model (GPT-2-style models use transformers' Conv1D: target 'Conv1D')"
            )
        sparsities = self._resolve_sparsities(model, modules, kwargs.get("sequential_targets"))
        n, m = parse_structure(self.mask_structure)
        for name, module in modules.items():
            if n and sparsities[name] > 0:
                cols = weight_out_in(module).shape[1]
                if cols % m:
                    raise LayerShapeError(
                        f"layer '{name}': input dimension {cols} is not divisible by M={m} for "
                        f"{self.mask_structure} sparsity; add it to `ignore`"
                    )
        self.refuse_pruning_twice(model, [name for name in modules if sparsities[name] > 0])
        self._layers = {mod: name for name, mod in modules.items() if sparsities[name] > 0}
        self._sparsities = {mod: sparsities[name] for name, mod in modules.items() if sparsities[name] > 0}
        if self.search is not None:
            self._run_search(state, {n: m for n, m in modules.items() if sparsities[n] > 0}, sparsities)
        logger.info(
            f"{type(self).__name__}: {len(self._layers)} layers to prune "
            f"({self.mask_structure if n else f'{self.scope} unstructured'}), config {self.crepe_config}"
        )
        return True

    def _run_search(self, state: State, modules: dict[str, torch.nn.Module], sparsities: dict[str, float]) -> None:
        """PHO on this oneshot's calibration data, before any layer is pruned."""
        from ..pho.calib import sample_layer_names, statistics_pass
        from ..pho.search import Evaluator, run_search

        loader = getattr(getattr(state, "data", None), "calib", None)
        if loader is None:
            raise PruningError(f"{type(self).__name__}: `search` needs calibration data, and oneshot got none")
        sampled = sample_layer_names(modules, self.search.layers)
        try:
            device = get_execution_device(state.model)
        except Exception:
            device = next(state.model.parameters()).device
        stats = statistics_pass(state.model, loader, modules, sampled, device=device)
        ev = Evaluator(state.model, modules, stats, self.mask_structure, {n: sparsities[n] for n in modules}, self.scope, sampled)
        fixed = {"kernel": self.kernel, "border": self.border, "neighbor_map": self.neighbor_map}
        res = run_search(ev, self.search, fixed)
        del stats, ev
        for k, v in res["params"].items():
            setattr(self, k, v)
        self._search_result = {k: res[k] for k in ("proxy", "sampler", "trials", "value", "params", "study_name")}
        logger.info(f"{type(self).__name__}: PHO chose {res['params']} ({res['proxy']} {res['value']:.6g})")

    def new_stats(self, module: torch.nn.Module) -> InputNormStats | HessianStats:
        cls = HessianStats if self.reconstruct else InputNormStats
        return cls(weight_out_in(module).shape[1], device=get_execution_device(module))

    def on_finalize(self, state: State, **kwargs) -> bool:
        super().on_finalize(state, **kwargs)
        self._prune_idle_experts()
        missing = [name for name in self._layers.values() if name not in self._pruned]
        if missing:
            raise PruningError(
                f"{type(self).__name__}: {len(missing)} layers received no calibration data and were "
                f"not pruned (first: '{missing[0]}'); check the calibration dataset"
            )
        record = new_record(
            self.method_name,
            self._pruned,
            config={
                **self.crepe_config.model_dump(),
                "scope": self.scope,
                "reconstruct": self.reconstruct,
                **(
                    {"mask_selection": self.mask_selection, "dampening_frac": self.dampening_frac,
                     "block_size": self.block_size, "refine_steps": self.refine_steps}
                    if self.reconstruct
                    else {}
                ),  # fmt: skip
                **({"search": self._search_result} if self._search_result else {}),
            },
            targets=self.targets if isinstance(self.targets, list) else [self.targets],
            ignore=list(self.ignore),
        )
        self.update_record(state.model, lambda old: merge_record(old, record))
        return True

    # ---------------------------------------------------------------- internals
    def _resolve_sparsities(
        self, model: torch.nn.Module, modules: dict[str, torch.nn.Module], seq_targets
    ) -> dict[str, float]:
        n, m = parse_structure(self.mask_structure)
        sp = self.sparsity
        if sp is None:
            sp = n / m
        if isinstance(sp, float):
            return {name: sp for name in modules}
        if isinstance(sp, dict):
            unused = {k for k in sp if k != "default"}
            out = {}
            for name in modules:
                key = next((k for k in sp if k != "default" and _key_matches(k, name)), None)
                if key is None:
                    if "default" not in sp:
                        raise PruningError(
                            f"sparsity map has no entry for layer '{name}'; add one or a 'default' key"
                        )
                    out[name] = sp["default"]
                else:
                    unused.discard(key)
                    out[name] = sp[key]
            if unused:
                raise PruningError(f"sparsity map keys match no targeted layer: {sorted(unused)}")
            return out
        # list: one value per decoder layer (the sequential targets)
        seq = sequential_layer_targets(model, seq_targets)
        layers = [name for name, _ in match_named_modules(model, seq)]
        if len(sp) != len(layers):
            raise PruningError(
                f"sparsity list has {len(sp)} values but the model has {len(layers)} decoder "
                f"layers ({seq}); give one value per layer, or a dict keyed by module name"
            )
        out = {}
        for name in modules:
            idx = next((i for i, ln in enumerate(layers) if name.startswith(ln + ".")), None)
            if idx is None:
                raise PruningError(f"layer '{name}' is outside every decoder layer; use a sparsity dict")
            out[name] = sp[idx]
        return out

    def _prune_idle_experts(self) -> None:
        """Experts the router never sent a calibration token (possible only when llm-compressor's
        ``moe_calibrate_all_experts`` is turned off): their input statistics do not exist, so they
        are pruned with the weight-only relative importance (CRePE's score with every input norm
        1) and marked in the record. Any other layer without statistics is an error (raised by
        the caller)."""
        idle = {m: n for m, n in self._layers.items() if n not in self._pruned and ".experts." in n}
        if not idle:
            return
        logger.warning(f"{type(self).__name__}: {len(idle)} experts received no calibration token (first: "
                       f"'{next(iter(idle.values()))}'); pruned with the weight-only score")  # fmt: skip
        n, _ = parse_structure(self.mask_structure)
        for module, name in idle.items():
            with torch.no_grad(), align_module_device(module):
                w = weight_out_in(module).detach()
                mask = self._score_mask(w, torch.ones(w.shape[1], device=w.device), self._sparsities[module], name)
                self.write_weight(module, w.masked_fill(mask, 0))
            self._record_layer(module, name, mask, n, calibration="none: weight-only score")

    def _score_mask(self, w: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float, name: str) -> torch.Tensor:
        """The pruned positions CRePE's score chooses (True = pruned)."""
        scores = crepe_scores(w, input_sq_norm, self.crepe_config, layer_name=name)
        return prune_mask(scores, sparsity, self.mask_structure, self.scope, layer_name=name)

    def _record_layer(self, module: torch.nn.Module, name: str, mask: torch.Tensor, n: int, **extra) -> float:
        density = 1.0 - float(mask.float().mean())
        self._pruned[name] = {
            "structure": self.mask_structure if n else "0:0",
            "sparsity": round(1.0 - density, 6),
            **({"layout": "in_out"} if is_conv1d(module) else {}),  # verify checks N:M along the inputs
            **extra,
        }
        return density

    def process_layer(self, module: torch.nn.Module, name: str, stats: InputNormStats | HessianStats) -> None:
        if stats.num_samples == 0:  # hooked, but no token reached it (an idle expert): see on_finalize
            return
        cfg = self.crepe_config
        n, m = parse_structure(self.mask_structure)
        sparsity = self._sparsities[module]
        with torch.no_grad(), align_module_device(module):
            w = weight_out_in(module).detach()
            if self.mask_selection == "adaptive":
                sal = crepe_saliency(w, cfg, layer_name=name)
                if n:
                    pruned, mask = compensate_adaptive_nm(
                        w, stats.H, n, m, sal, self.dampening_frac, self.block_size, layer_name=name
                    )
                else:
                    pruned, mask = compensate_adaptive_unstructured(
                        w, stats.H, sparsity, sal, self.scope, self.dampening_frac, self.block_size, layer_name=name
                    )
            else:
                mask = self._score_mask(w, stats.input_sq_norm() if self.reconstruct else stats.value(name), sparsity, name)
            if self.reconstruct:
                if self.mask_selection == "fixed":
                    pruned = compensate_fixed_mask(
                        w, stats.H, mask, self.dampening_frac, self.block_size, layer_name=name
                    )
                if self.refine_steps:
                    pruned = refine_fixed_mask(
                        w, pruned, stats.H, mask, self.refine_steps, self.dampening_frac, name
                    )
                pruned = pruned.to(w.dtype)
            else:
                pruned = w.masked_fill(mask, 0)
            self.write_weight(module, pruned)
        density = self._record_layer(module, name, mask, n)
        logger.info(f"{name}: pruned with {stats.num_samples} samples, density {density:.4f}")


class RIAPruningModifier(CRePEPruningModifier):
    """RIA (Zhang et al., ICLR 2024): CRePE with row_coef = col_coef = 1, no neighborhood
    term. ``act_exponent`` (RIA's ``a``) stays tunable; default 0.5.

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        RIAPruningModifier:
          mask_structure: "2:4"
    ```
    """

    method_name: ClassVar[str] = "ria"

    @classmethod
    def _default_coefficients(cls, structure: str) -> dict:
        return {**RIA_CONFIG.model_dump(), "scope": "matrix"}  # RIA's point, whatever CRePE's defaults are

    @model_validator(mode="after")
    def _ria_only(self) -> "RIAPruningModifier":
        if self.row_coef != 1.0 or self.col_coef != 1.0 or self.neighbor_coef != 0.0:
            raise ValueError(
                "RIAPruningModifier fixes row_coef = col_coef = 1 and neighbor_coef = 0; "
                "use CRePEPruningModifier to change them"
            )
        return self
