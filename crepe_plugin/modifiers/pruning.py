"""CRePEPruningModifier and RIAPruningModifier: llm-compressor 0.14 glue around crepe_plugin.core.

The modifier resolves its configuration once, when the recipe is parsed (``prune_config``: the
score's coefficients, the structure, the scope and the reconstruction settings; a coefficient the
recipe leaves out takes the structure's shipped default, ``core.config.CREPE_DEFAULTS``). PHO in
the recipe, every layer and the record read that one object; the per-Linear work is
``core.prune_layer``.

Memory profile as WandaPruningModifier: one input-norm vector per targeted Linear, and
one score matrix at a time while a layer is pruned (at the end of its sequential epoch).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from loguru import logger
from pydantic import PrivateAttr, field_validator, model_validator

from ..checkpoint.record import merge_record, new_record
from ..compat.compressed_tensors import align_module_device, get_execution_device
from ..compat.llmcompressor import State, sequential_layer_targets
from ..core import (
    RIA_CONFIG,
    CRePEConfig,
    HessianStats,
    InputNormStats,
    LayerStats,
    PruneConfig,
    PruningError,
    Reconstruction,
    check_nm_width,
    crepe_defaults,
    default_scope,
    is_conv1d,
    prune_layer,
    weight_out_in,
)
from ..core.config import Border, Coef, KernelName, KernelSize, NeighborMap
from ..core.local import LocalReconstruction
from ..core.prune import BlockSize, DampeningFrac, MaskSelection, RefineSteps, Scope
from ..pho.config import SearchConfig
from .base import Pruner, PruningModifier
from .teacher import LocalReconstructor

__all__ = ["CRePEPruningModifier", "RIAPruningModifier"]


class CRePEPruningModifier(PruningModifier):
    """One-shot CRePE pruning (RIA generalised with adaptive coefficients and a k x k
    neighborhood term). See docs/method.md.

    Sample yaml (the coefficients shown are the 2:4 defaults; leave any out to get its default):

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        CRePEPruningModifier:
          mask_structure: "2:4"
          row_coef: 2.513921
          col_coef: 2.002273
          neighbor_coef: 0.203327
          kernel_size: 3
          kernel: gaussian
          act_exponent: 0.855673
          border: zero
          neighbor_map: ri
    ```

    :param sparsity: fraction pruned: a float, a list with one value per decoder layer,
        or a dict whose keys select layers as ``targets`` does (a module name, a container such
        as a decoder layer, or a 're:' regex; first match wins; a 'default' key covers the
        rest). For N:M structures it defaults to N/M and every value must be N/M or 0 (0 leaves
        the layer dense).
    :param mask_structure: "N:M" (prune N of every M consecutive inputs) or "0:0".
    :param scope: unstructured only: "matrix" (one threshold per matrix, RIA) or "row".
        Unset: the structure's default (row for unstructured).
    :param row_coef, col_coef, neighbor_coef, kernel_size, kernel, act_exponent, border,
        neighbor_map: CRePE's coefficients (``core.CRePEConfig``). Each one left unset takes
        the structure's shipped default (``core.config.CREPE_DEFAULTS``: searched on SmolLM2-135M
        and Gemma 3 270M, chosen by validation perplexity; docs/method.md, "Defaults").
    :param targets: module classes, names or 're:' regexes to prune (containers such as a
        decoder layer expand to their Linear layers); ``crepe_plugin.selection``.
    :param ignore: modules never pruned. Defaults to the lm_head, MoE routers and a
        vision-language model's vision tower and projector.
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
    :param local_reconstruction: a block (epochs, lr, batch_size, granularity, loss,
        mask_moves, teacher_dtype; ``core.local.LocalReconstruction``). When given, the modifier
        keeps the dense model's activations beside the pipeline's (a dense teacher stream), and
        once a decoder layer's Linears are masked (and, with ``reconstruct``, compensated) it
        fits their kept weights by Adam so that the layer's output on the pruned model's inputs
        matches the dense layer's output on the dense inputs. Masks stay fixed (unless
        ``mask_moves``) and pruned weights stay exactly zero. Needs llm-compressor's sequential
        pipeline (one decoder layer per subgraph). See docs/method.md, "Local reconstruction".
    :param search: a PHO block (proxy, trials, storage, bounds, layers, seed...). When
        given, PHO searches row_coef, col_coef, neighbor_coef, kernel_size and
        act_exponent on this oneshot's calibration data before any layer is pruned (one
        extra dense forward pass), then prunes with the best point; kernel, border and
        neighbor_map stay at this modifier's values. See docs/method.md.
    """

    scope: Scope | None = None

    row_coef: Coef | None = None
    col_coef: Coef | None = None
    neighbor_coef: Coef | None = None
    kernel_size: KernelSize | None = None
    kernel: KernelName | None = None
    act_exponent: Coef | None = None
    border: Border | None = None
    neighbor_map: NeighborMap | None = None

    reconstruct: bool = False
    mask_selection: MaskSelection = "fixed"
    dampening_frac: DampeningFrac = 0.01
    block_size: BlockSize = 128
    refine_steps: RefineSteps = 20
    search: SearchConfig | None = None
    local_reconstruction: LocalReconstruction | None = None

    method_name: ClassVar[str] = "crepe"

    _prune: PruneConfig | None = PrivateAttr(None)
    _pruned: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)
    _search_result: dict[str, Any] | None = PrivateAttr(default=None)
    _local: LocalReconstructor | None = PrivateAttr(None)  # with local_reconstruction: the teacher and the fit

    # ---------------------------------------------------------------- the one resolved configuration
    @classmethod
    def structure_defaults(cls, structure: tuple[int, int]) -> tuple[CRePEConfig, str]:
        """(coefficients, scope) for the fields a recipe leaves out, for the parsed (N, M)."""
        return crepe_defaults(structure), default_scope(structure)

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
    def _resolve(self) -> "CRePEPruningModifier":
        """Build ``prune_config`` once: the recipe's fields over the structure's defaults (this also
        refuses a degenerate score, row_coef = col_coef = 0, at parse time)."""
        if self.mask_selection == "adaptive" and not self.reconstruct:
            raise ValueError("mask_selection 'adaptive' chooses the mask during reconstruction; set reconstruct: true")
        if self.local_reconstruction is not None and self.local_reconstruction.mask_moves and not self.structure[0]:
            raise ValueError("local_reconstruction.mask_moves re-chooses N:M groups; it needs an N:M mask_structure")
        base, scope = self.structure_defaults(self.structure)
        recon = None
        if self.reconstruct:
            recon = Reconstruction(mask_selection=self.mask_selection, dampening_frac=self.dampening_frac,
                                   block_size=self.block_size, refine_steps=self.refine_steps)  # fmt: skip
        self._prune = PruneConfig(
            score=base.override(**{k: getattr(self, k) for k in CRePEConfig.model_fields}),
            structure=self.mask_structure,
            scope=self.scope or scope,
            reconstruction=recon,
        )
        return self

    @property
    def prune_config(self) -> PruneConfig:
        """How every layer is pruned (after a ``search``, with the point it chose)."""
        return self._prune

    @property
    def prunes_nothing(self) -> bool:
        """Every sparsity given is 0 (a pruner kept only to guide a channel permutation, or a mistake)."""
        sp = self.sparsity
        values = [sp] if isinstance(sp, float) else list(sp.values()) if isinstance(sp, dict) else list(sp or [None])
        return not any(v is None or v > 0 for v in values)

    @property
    def crepe_config(self) -> CRePEConfig:
        """The score's coefficients: ``prune_config.score``."""
        return self._prune.score

    def contract(self) -> Pruner:
        label = type(self).__name__ + (" with reconstruct" if self.reconstruct else "")
        score = None if self.search is not None else self.crepe_config
        dense = not self.reconstruct and self.local_reconstruction is None
        return Pruner(self, label, self.structure, self.sparsity, score, keeps_dense_values=dense)

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs) -> bool:
        self.check_recipe_order()
        modules = self.prunable_layers(state.model)
        sparsities = self.layer_sparsities(state.model, modules, kwargs.get("sequential_targets"))
        modules = {name: mod for name, mod in modules.items() if sparsities[name] > 0}
        n, m = self.structure
        for name, mod in modules.items():
            check_nm_width(weight_out_in(mod).shape[1], m, name, "add it to `ignore`", n=n)
        self.refuse_pruning_twice(state.model, list(modules))
        self._layers = {mod: name for name, mod in modules.items()}
        self._sparsities = {mod: sparsities[name] for name, mod in modules.items()}
        if self.search is not None:
            self._run_search(state, modules, {name: sparsities[name] for name in modules})
        if self.local_reconstruction is not None:
            self._local = LocalReconstructor(self.local_reconstruction, self.structure, type(self).__name__)
            self._local.set_up(state.model, self._layers, sequential_layer_targets(state.model, kwargs.get("sequential_targets")))
        what = self.mask_structure if n else f"{self._prune.scope} unstructured"
        logger.info(f"{type(self).__name__}: {len(self._layers)} layers to prune ({what}), config {self.crepe_config}")
        return True

    def _run_search(self, state: State, modules: dict[str, torch.nn.Module], sparsities: dict[str, float]) -> None:
        """PHO on this oneshot's calibration data, before any layer is pruned; the searched
        coefficients replace the score in ``prune_config``, the rest stays as resolved."""
        from ..pho.calib import sample_layer_names, statistics_pass
        from ..pho.search import Evaluator, fixed_part, run_search

        loader = getattr(getattr(state, "data", None), "calib", None)
        if loader is None:
            raise PruningError(f"{type(self).__name__}: `search` needs calibration data, and oneshot got none")
        sampled = sample_layer_names(modules, self.search.layers)
        try:
            device = get_execution_device(state.model)
        except Exception:
            device = next(state.model.parameters()).device
        stats = statistics_pass(state.model, loader, modules, sampled, device=device)
        ev = Evaluator(state.model, modules, stats, self.mask_structure, sparsities, self._prune.scope, sampled)
        res = run_search(ev, self.search, fixed_part(self.crepe_config))
        del stats, ev
        self._prune = self._prune.model_copy(update={"score": CRePEConfig(**res["config"])})
        self._search_result = {k: res[k] for k in ("proxy", "sampler", "trials", "value", "params", "study_name")}
        logger.info(f"{type(self).__name__}: PHO chose {res['params']} ({res['proxy']} {res['value']:.6g})")

    # ---------------------------------------------------------------- local reconstruction (modifiers/teacher.py)
    def on_calibration_start(self, state: State, event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        if self._local is not None:  # what the pipeline feeds each decoder layer: the sparse stream
            for layer in self._local.decoder_layers:
                self.register_hook(layer, self._local.teacher.capture, "forward_pre", with_kwargs=True)

    def before_layers(self, layers: dict[str, torch.nn.Module]) -> None:
        if self._local is not None:
            self._local.before(layers)

    def after_layers(self, layers: dict[str, torch.nn.Module]) -> None:
        if self._local is not None:
            self._local.after(layers, self.write_weight)

    def new_stats(self, module: torch.nn.Module) -> InputNormStats | HessianStats:
        cls = HessianStats if self.reconstruct else InputNormStats
        return cls(weight_out_in(module).shape[1], device=get_execution_device(module))

    def process_layer(self, module: torch.nn.Module, name: str, stats: InputNormStats | HessianStats) -> None:
        if stats.num_samples == 0:  # hooked, but no token reached it (an idle expert): see on_finalize
            return
        if self.reconstruct:
            layer_stats = LayerStats(stats.input_sq_norm(), stats.H)
        else:
            layer_stats = LayerStats(stats.value(name))
        density = self._prune_one(module, name, layer_stats, self._prune)
        logger.info(f"{name}: pruned with {stats.num_samples} samples, density {density:.4f}")

    def _prune_one(self, module: torch.nn.Module, name: str, stats: LayerStats, config: PruneConfig, **record) -> float:
        """``core.prune_layer`` on one module, written back and recorded; returns its density."""
        with torch.no_grad(), align_module_device(module):
            pruned, mask = prune_layer(weight_out_in(module).detach(), stats, config, self._sparsities[module], layer_name=name)
            self.write_weight(module, pruned)
        if self._local is not None:  # fitted in after_layers
            self._local.pruned(module, mask, stats.input_sq_norm)
        density = 1.0 - float(mask.float().mean())
        self._pruned[name] = {
            "structure": self.mask_structure,
            "sparsity": round(1.0 - density, 6),
            **({"layout": "in_out"} if is_conv1d(module) else {}),  # verify checks N:M along the inputs
            **record,
        }
        return density

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
            config=self._record_config(),
            targets=self.targets if isinstance(self.targets, list) else [self.targets],
            ignore=list(self.ignore),
        )
        self.update_record(state.model, lambda old: merge_record(old, record))
        return True

    # ---------------------------------------------------------------- internals
    def _record_config(self) -> dict[str, Any]:
        """``prune_config`` as the record's ``config`` (with the search that chose the score, if any)."""
        p = self._prune
        return {
            **p.score.model_dump(),
            "scope": p.scope,
            "reconstruct": p.reconstruction is not None,
            **(p.reconstruction.model_dump() if p.reconstruction is not None else {}),
            **({"local_reconstruction": self.local_reconstruction.model_dump()} if self.local_reconstruction else {}),
            **({"search": self._search_result} if self._search_result else {}),
        }

    def _prune_idle_experts(self) -> None:
        """Experts the router never sent a calibration token (possible only when llm-compressor's
        ``moe_calibrate_all_experts`` is turned off): their input statistics do not exist, so they
        are pruned with the weight-only relative importance (CRePE's score with every input norm
        1, mask only) and marked in the record. Any other layer without statistics is an error
        (raised by the caller)."""
        idle = {m: n for m, n in self._layers.items() if n not in self._pruned and ".experts." in n}
        if not idle:
            return
        logger.warning(f"{type(self).__name__}: {len(idle)} experts received no calibration token (first: "
                       f"'{next(iter(idle.values()))}'); pruned with the weight-only score")  # fmt: skip
        weight_only = self._prune.model_copy(update={"reconstruction": None})
        for module, name in idle.items():
            ones = torch.ones(weight_out_in(module).shape[1], device=get_execution_device(module))
            self._prune_one(module, name, LayerStats(ones), weight_only, calibration="none: weight-only score")


class RIAPruningModifier(CRePEPruningModifier):
    """RIA (Zhang et al., ICLR 2024): CRePE with row_coef = col_coef = 1, no neighborhood
    term. ``act_exponent`` (RIA's ``a``) stays tunable; default 0.5. Unstructured scope
    defaults to RIA's "matrix".

    ```yaml
    sparsity_stage:
      sparsity_modifiers:
        RIAPruningModifier:
          mask_structure: "2:4"
    ```
    """

    method_name: ClassVar[str] = "ria"

    @classmethod
    def structure_defaults(cls, structure: tuple[int, int]) -> tuple[CRePEConfig, str]:
        return RIA_CONFIG, "matrix"  # RIA's point, whatever CRePE's defaults are

    @model_validator(mode="after")
    def _ria_only(self) -> "RIAPruningModifier":
        c = self.crepe_config
        if c.row_coef != 1.0 or c.col_coef != 1.0 or c.neighbor_coef != 0.0:
            raise ValueError(
                "RIAPruningModifier fixes row_coef = col_coef = 1 and neighbor_coef = 0; "
                "use CRePEPruningModifier to change them"
            )
        return self
