"""What every crepe-plugin modifier shares with llm-compressor's lifecycle, written once.

``LayerwiseModifier`` owns:

- the calibration hooks and the sequential-epoch lifecycle: a forward hook per layer feeds a
  statistics accumulator (``new_stats``); at the end of each sequential epoch (one decoder
  layer, in llm-compressor's sequential pipeline) and at the end of calibration, every layer
  that has statistics is handed to ``process_layer`` once, and its statistics are freed, so
  memory stays at one decoder layer; ``before_layers`` and ``after_layers`` see the layers of
  that epoch together, before and after (hooks for work on a whole decoder layer, such as the
  dense teacher's pass and local reconstruction; nothing by default);
- the recipe around it (``pruners_before`` / ``pruners_after``, as ``Pruner`` contracts: our
  pruners and llm-compressor's);
- the checkpoint record (``update_record``) and offload-aware weight write-back
  (``write_weight``, Conv1D-aware through ``core.set_weight``).

``PruningModifier`` (a ``LayerwiseModifier``) declares the pruner contract once: the fields every
pruner reads as llm-compressor's do (``mask_structure``, parsed once, ``sparsity``, ``targets``,
``ignore``), which layers it prunes (``crepe_plugin.selection``, the one layer predicate) and at
what sparsity (``layer_sparsities``), and the recipe-order guards. OWL, DSnoT and channel
permutation read a neighbouring pruner only through ``Pruner``.

Each modifier keeps only its method. Upstream names come from ``crepe_plugin.compat``.

Why not llm-compressor's ``SparsityModifierBase``: it fixes what a pruner accumulates (a
Hessian or Wanda's row norms, in its ``calibrate_module``) and how it prunes
(``compress_modules`` over its own per-module state), and carries an OWL path
(``sparsity_profile``) that fails in 0.14. CRePE needs its own statistics (norms, or a Hessian
only with reconstruction) and writes a record, and DSnoT and channel permutation are not
pruners at all. The lifecycle events we hook are the same ones that base hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from pydantic import Field, PrivateAttr, field_validator, model_validator

from ..checkpoint.record import RECORD_KEY
from ..checkpoint.save import keep_record_on_save
from ..compat.compressed_tensors import match_named_modules, update_offload_parameter
from ..compat.llmcompressor import (
    Event,
    GPTQModifier,
    Modifier,
    QuantizationMixin,
    SparseGPTModifier,
    SparsityModifierBase,
    State,
    recipe_modifiers,
    sequential_layer_targets,
)
from ..core import CRePEConfig, PruningError, decoder_layer, parse_structure, set_weight
from ..core.layers import check_name_patterns
from ..selection import DEFAULT_IGNORE, PRUNABLE, layer_filter, select_layers
from .gptq import MaskedGPTQModifier

__all__ = ["LayerwiseModifier", "PruningModifier", "Pruner", "layer_sparsities", "SparsityArg", "WANDA_POINT"]

SparsityArg = float | list[float] | dict[str, float] | None
# Wanda (and SparseGPT's mask) rank by |W| * ||X||: CRePE's row term with a = 1
WANDA_POINT = CRePEConfig(row_coef=1.0, col_coef=0.0, act_exponent=1.0)


def _offload_assign(module: torch.nn.Module, stored: torch.Tensor) -> None:
    update_offload_parameter(module, "weight", stored)


def _refuse_tied(model: torch.nn.Module, layers: dict[str, torch.nn.Module]) -> None:
    """A layer whose weight is another module's too (an lm_head tied to the embeddings) cannot be
    changed alone: pruning it would prune the other, and the saved checkpoint holds only one."""
    from ..core.errors import PruningError

    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if w is not None:
            owners.setdefault(id(w), []).append(name)
    for name, module in layers.items():
        others = [o for o in owners.get(id(module._parameters.get("weight")), []) if o != name and o not in layers]
        if others:
            raise PruningError(
                f"layer '{name}' shares its weight with '{others[0]}' (tied, e.g. tie_word_embeddings: true): it "
                f"cannot be pruned alone, and pruning it would prune '{others[0]}'; keep it in `ignore` "
                "(e.g. 're:.*lm_head')"
            )


class LayerwiseModifier(Modifier):
    """A modifier that calibrates chosen layers and processes each once its statistics are in."""

    requires_calibration_data: bool = True
    ignore: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE))

    _layers: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)  # module -> name

    @field_validator("ignore", "targets", mode="after", check_fields=False)
    @classmethod
    def _valid_patterns(cls, v, info):
        check_name_patterns(v, info.field_name)  # a bad 're:' entry fails here, not as a traceback mid-run
        return v
    _stats: dict[torch.nn.Module, Any] = PrivateAttr(default_factory=dict)

    # ------------------------------------------------------------- what a modifier provides
    def new_stats(self, module: torch.nn.Module) -> Any:
        """A fresh statistics accumulator (with ``update(input)``) for ``module``."""
        raise NotImplementedError

    def process_layer(self, module: torch.nn.Module, name: str, stats: Any) -> None:
        """Apply the method to one calibrated layer."""
        raise NotImplementedError

    def before_layers(self, layers: dict[str, torch.nn.Module]) -> None:
        """Called with the layers calibrated together (one decoder layer's, in the sequential
        pipeline) before any of them goes through ``process_layer``; ``layers``: {name: module}."""

    def after_layers(self, layers: dict[str, torch.nn.Module]) -> None:
        """Called once the layers calibrated together (one decoder layer's, in the sequential
        pipeline) have all been through ``process_layer``; ``layers``: {name: module}."""

    # ------------------------------------------------------------- lifecycle
    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for module in self._layers:
            self.register_hook(module, self._calibrate, "forward")

    def _calibrate(self, module: torch.nn.Module, args: tuple, _output: torch.Tensor):
        stats = self._stats.get(module)
        if stats is None:
            stats = self._stats[module] = self.new_stats(module)
        stats.update(args[0])

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._process_calibrated()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._process_calibrated()

    def _process_calibrated(self) -> None:
        layers = {self._layers[module]: module for module in self._stats}
        if not layers:
            return
        self.before_layers(layers)
        for module in list(self._stats):
            self.process_layer(module, self._layers[module], self._stats.pop(module))
        self.after_layers(layers)

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.remove_hooks()
        self._stats.clear()
        return True

    # ------------------------------------------------------------- the model
    @staticmethod
    def write_weight(module: torch.nn.Module, w_out_in: torch.Tensor) -> None:
        """Store an (out, in) weight in the module's own layout, offload-aware."""
        set_weight(module, w_out_in, assign=_offload_assign)

    @staticmethod
    def update_record(model: torch.nn.Module, update: Callable[[dict | None], dict]) -> None:
        """Replace the model's ``crepe_sparsity`` record by ``update(old)`` and make sure the
        save keeps it (llm-compressor rewrites config.json)."""
        cfg = getattr(model, "config", None)
        if cfg is None:
            return
        setattr(cfg, RECORD_KEY, update(getattr(cfg, RECORD_KEY, None)))
        keep_record_on_save(model)

    # ------------------------------------------------------------- the recipe around it
    def _split_recipe(self) -> tuple[list, list]:
        """(modifiers before this one, modifiers after it) in the running recipe; both empty
        when this modifier is not part of one (applied by hand)."""
        mods = recipe_modifiers()
        idx = next((i for i, m in enumerate(mods) if m is self), None)
        return ([], []) if idx is None else (mods[:idx], mods[idx + 1 :])

    def pruners_before(self) -> list["Pruner"]:
        return [p for p in map(Pruner.of, self._split_recipe()[0]) if p is not None]

    def pruners_after(self) -> list["Pruner"]:
        return [p for p in map(Pruner.of, self._split_recipe()[1]) if p is not None]


@dataclass(frozen=True)
class Pruner:
    """The pruner contract: what OWL, DSnoT and channel permutation read of a pruning modifier in
    the recipe, ours (``PruningModifier``) or llm-compressor's (Wanda, SparseGPT)."""

    modifier: Any
    label: str  # the modifier, as an error message names it
    structure: tuple[int, int]  # (N, M); (0, 0) unstructured
    sparsity: SparsityArg
    score: CRePEConfig | None  # what it ranks weights by; None when a search chooses it at initialize
    keeps_dense_values: bool  # kept weights keep their dense values (no reconstruction, not SparseGPT)

    @classmethod
    def of(cls, m: Any) -> "Pruner | None":
        if isinstance(m, PruningModifier):
            return m.contract()
        if isinstance(m, SparsityModifierBase):
            dense = not isinstance(m, SparseGPTModifier)
            return cls(m, type(m).__name__, parse_structure(m.mask_structure), m.sparsity, WANDA_POINT, dense)
        return None

    def assign_layer_sparsities(self, model: torch.nn.Module, per_layer: dict[str, float], default: float) -> None:
        """Hand per-decoder-layer sparsities ({layer prefix: value}; ``default`` elsewhere) to the pruner."""
        if isinstance(self.modifier, PruningModifier):
            self.modifier.sparsity = {**per_layer, "default": default}
            return
        # llm-compressor's SparseGPT / Wanda: one value per module its own targets match (its own matching)
        targets = self.modifier.targets
        names = [n for n, _ in match_named_modules(model, targets if isinstance(targets, list) else [targets])]
        vals = []
        for n in names:
            layer = decoder_layer(n + ".")
            vals.append(per_layer.get(layer[0], default) if layer else default)
        self.modifier.sparsity = vals
        self.modifier.sparsity_profile = None


def _check_fraction(v: float, where: str) -> float:
    v = float(v)
    if not (0.0 <= v < 1.0):
        raise ValueError(f"{where}: sparsity must be in [0, 1), got {v}")
    return v


class PruningModifier(LayerwiseModifier):
    """A crepe-plugin pruner: the fields every pruner shares, validated once, and the contract
    (``contract()``) the modifiers around it read."""

    sparsity: SparsityArg = None
    mask_structure: str = "0:0"
    targets: str | list[str] = Field(default_factory=lambda: list(PRUNABLE))

    _nm: tuple[int, int] = PrivateAttr((0, 0))
    _sparsities: dict[torch.nn.Module, float] = PrivateAttr(default_factory=dict)

    # ---------------------------------------------------------------- what a pruner declares
    def contract(self) -> Pruner:
        raise NotImplementedError

    @property
    def structure(self) -> tuple[int, int]:
        """(N, M) of ``mask_structure``, parsed once; (0, 0) for unstructured."""
        return self._nm

    # ---------------------------------------------------------------- validation
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

    @model_validator(mode="after")
    def _valid_combination(self) -> "PruningModifier":
        self._nm = n, m = parse_structure(self.mask_structure)
        if n == 0:
            if self.sparsity is None:
                raise ValueError("sparsity is required for unstructured pruning (mask_structure '0:0')")
            return self
        implied = n / m
        values = (
            [self.sparsity]
            if isinstance(self.sparsity, float)
            else list(self.sparsity.values())
            if isinstance(self.sparsity, dict)
            else list(self.sparsity or [])
        )
        for x in values:
            if x not in (0.0, implied) and abs(x - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {x} conflicts with mask_structure '{self.mask_structure}', which "
                    f"prunes exactly {implied:g}; use {implied:g} (or 0 to keep a layer dense), "
                    "or mask_structure '0:0' for unstructured"
                )
        return self

    # ---------------------------------------------------------------- initialize
    def check_recipe_order(self) -> None:
        """Quantizing before pruning, or plain GPTQ after it, gives a model that is not
        N:M; refuse such a recipe instead of saving it."""
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

    def prunable_layers(self, model: torch.nn.Module) -> dict[str, torch.nn.Module]:
        """The layers ``targets`` minus ``ignore`` select (``crepe_plugin.selection``); refuses none."""
        modules = select_layers(model, self.targets, self.ignore)
        if not modules:
            raise PruningError(
                f"{type(self).__name__}: targets {self.targets} (ignore {self.ignore}) match no "
                "Linear layer in the model (GPT-2-style models use transformers' Conv1D: target 'Conv1D')"
            )
        _refuse_tied(model, modules)
        return modules

    def refuse_pruning_twice(self, model: torch.nn.Module, names: list[str]) -> None:
        """A layer that an earlier pruner of the recipe prunes, or that the model's record already
        lists, would be pruned twice, and the record would describe the second pass only (2:4 then
        1:4 leaves a 1:4 record over weights at 50%): refuse it before calibration."""
        mine = set(names)
        for p in self.pruners_before():
            m = p.modifier
            theirs = getattr(m, "_layers", None) or {}  # ours: the layers it prunes, set at its initialize
            theirs = set(theirs.values()) if theirs else set(select_layers(model, m.targets, list(m.ignore or [])))
            if mine & theirs:
                what = lambda x: f"{type(x).__name__} ({getattr(x, 'mask_structure', None) or 'unstructured'})"  # noqa: E731
                raise PruningError(
                    f"layer '{min(mine & theirs)}' would be pruned twice, by {what(m)} and then by {what(self)}; "
                    "give each layer one pruning modifier (add it to `ignore` in one of them)"
                )
        record = getattr(getattr(model, "config", None), RECORD_KEY, None)
        done = mine & set(record.get("modules", {})) if isinstance(record, dict) else set()
        if done:
            raise PruningError(
                f"layer '{min(done)}' is already pruned (the model's {RECORD_KEY} record lists it as "
                f"{record['modules'][min(done)].get('structure')}); prune the dense model, or `ignore` the layer"
            )

    def layer_sparsities(self, model: torch.nn.Module, modules: dict[str, torch.nn.Module], seq_targets=None) -> dict[str, float]:
        """The sparsity of every layer in ``modules`` ({name: value}), from ``sparsity``."""
        n, m = self.structure
        return layer_sparsities(self.sparsity if self.sparsity is not None else n / m, model, modules, seq_targets)


def layer_sparsities(sp: float | list[float] | dict[str, float], model: torch.nn.Module,
                     modules: dict[str, torch.nn.Module], seq_targets=None) -> dict[str, float]:  # fmt: skip
    """{name: sparsity} for ``modules`` from a pruner's ``sparsity``: one float; a list with one value
    per decoder layer (llm-compressor's sequential targets); or a map whose keys select layers as
    ``targets`` do (a name, a container such as a decoder layer, a class, or 're:'; the first key
    that selects a layer wins, 'default' covers the rest)."""
    if isinstance(sp, float):
        return {name: sp for name in modules}
    if isinstance(sp, dict):
        keys = {k: layer_filter(model, [k], None) for k in sp if k != "default"}
        unused = set(keys)
        out = {}
        for name, module in modules.items():
            key = next((k for k, keep in keys.items() if keep(module, name)), None)
            if key is None:
                if "default" not in sp:
                    raise PruningError(f"sparsity map has no entry for layer '{name}'; add one or a 'default' key")
                out[name] = sp["default"]
            else:
                unused.discard(key)
                out[name] = sp[key]
        if unused:
            raise PruningError(f"sparsity map keys match no targeted layer: {sorted(unused)}")
        return out
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
