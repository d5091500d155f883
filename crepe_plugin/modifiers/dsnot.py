"""DSnoTModifier: training-free mask refinement after CRePE, RIA or Wanda.

Place it after the pruning modifier. llm-compressor 0.14 runs each modifier of a stage
in its own calibration pass (the independent pipeline), so when DSnoT's pass reaches a
decoder layer the pruner has already zeroed it. DSnoT therefore records the layer's
input mean and variance, reads that layer's dense weights back from the model's source
safetensors (one tensor at a time, so memory stays at one layer), checks that the kept
weights still equal them, swaps pruned and kept weights row by row
(``crepe_plugin.core.dsnot``), within the M-group for N:M, and writes the dense values
back at the revived positions.

```yaml
sparsity_stage:
  sparsity_modifiers:
    CRePEPruningModifier:
      mask_structure: "2:4"
    DSnoTModifier:
      max_cycles: 50
      update_threshold: 0.1
```
"""

from __future__ import annotations

import torch
from compressed_tensors.utils import align_module_device, get_execution_device, match_named_modules, update_offload_parameter
from loguru import logger
from pydantic import Field, PrivateAttr

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier

from ..core import (
    CalibrationError,
    InputMomentStats,
    PruningError,
    dsnot_refine,
    expected_error,
    from_stored_layout,
    is_nm,
    parse_structure,
    to_stored_layout,
    weight_out_in,
)

__all__ = ["DSnoTModifier", "DenseSource"]


class DenseSource:
    """The dense weights of the model as loaded: its safetensors, read one tensor at a time."""

    def __init__(self, name_or_path: str | None):
        import json
        from pathlib import Path

        if not name_or_path:
            raise CalibrationError(
                "DSnoTModifier needs the dense weights from the model's source checkpoint, but the model "
                "has no name_or_path; load it with from_pretrained or pass a path to oneshot"
            )
        root = Path(name_or_path)
        if not root.is_dir():
            try:
                from huggingface_hub import snapshot_download

                root = Path(snapshot_download(str(name_or_path), allow_patterns=["*.safetensors", "*.json"]))
            except Exception as e:
                raise CalibrationError(f"DSnoTModifier: cannot find the dense checkpoint '{name_or_path}': {e}") from e
        self.files: dict[str, Path] = {}
        index = root / "model.safetensors.index.json"
        if index.is_file():
            for k, f in json.loads(index.read_text())["weight_map"].items():
                self.files[k] = root / f
        else:
            from safetensors import safe_open

            for f in sorted(root.glob("*.safetensors")):
                with safe_open(str(f), "pt") as fh:
                    self.files.update({k: f for k in fh.keys()})
        if not self.files:
            raise CalibrationError(f"DSnoTModifier: no safetensors in '{root}'")

    def weight(self, module_name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = f"{module_name}.weight"
        if key not in self.files:
            raise CalibrationError(f"DSnoTModifier: layer '{module_name}' has no weight in the source checkpoint")
        with safe_open(str(self.files[key]), "pt") as fh:
            return fh.get_tensor(key)


class DSnoTModifier(Modifier):
    """DSnoT (Zhang et al., ICLR 2024) after a mask-only pruner. Defaults are the paper's
    (50 cycles, threshold 0.1, variance power 1). The pruner before it must leave kept
    weights at their dense values: CRePE/RIA without ``reconstruct``, or Wanda (not
    SparseGPT, which updates weights).
    """

    requires_calibration_data: bool = True
    targets: str | list[str] = Field(default_factory=lambda: ["Linear"])
    ignore: list[str] = Field(default_factory=lambda: ["re:.*lm_head"])
    max_cycles: int = Field(50, ge=1, le=10_000)
    update_threshold: float = Field(0.1, ge=0, lt=1)
    pow_of_var_regrowing: float = Field(1.0, ge=0)

    _n: int = PrivateAttr(0)
    _m: int = PrivateAttr(0)
    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _stats: dict[torch.nn.Module, InputMomentStats] = PrivateAttr(default_factory=dict)
    _source: DenseSource | None = PrivateAttr(None)
    _done: dict[str, float] = PrivateAttr(default_factory=dict)

    def on_initialize(self, state: State, **kwargs) -> bool:
        from llmcompressor.core import active_session
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
        from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

        from .pruning import CRePEPruningModifier

        mods = list(active_session().lifecycle.recipe.modifiers)
        idx = next(i for i, m in enumerate(mods) if m is self)
        before = [m for m in mods[:idx] if isinstance(m, (CRePEPruningModifier, SparsityModifierBase))]
        if not before:
            raise PruningError("DSnoTModifier refines a pruning mask: put it after CRePE, RIA or Wanda in the recipe")
        pruner = before[-1]
        if isinstance(pruner, SparseGPTModifier) or getattr(pruner, "reconstruct", False):
            raise PruningError(
                f"DSnoTModifier cannot follow {type(pruner).__name__}"
                f"{' with reconstruct' if getattr(pruner, 'reconstruct', False) else ''}: it updates the kept "
                "weights, and DSnoT's swaps assume kept weights hold their dense values"
            )
        self._n, self._m = parse_structure(pruner.mask_structure)
        targets = [self.targets] if isinstance(self.targets, str) else list(self.targets)
        self._names = {
            m: n for n, m in match_named_modules(state.model, targets, self.ignore) if isinstance(m, torch.nn.Linear)
        }
        if not self._names:
            raise PruningError(f"DSnoTModifier: targets {targets} match no Linear layer")
        self._source = DenseSource(getattr(state.model.config, "_name_or_path", None))
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        for module in self._names:
            self.register_hook(module, self._calibrate, "forward")

    def _calibrate(self, module, args, _out):
        if module not in self._stats:
            w = weight_out_in(module)
            self._stats[module] = InputMomentStats(w.shape[1], device=get_execution_device(module))
        self._stats[module].update(args[0])

    def on_sequential_epoch_end(self, state: State, event: Event, **kwargs):
        self._refine()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        self.remove_hooks()
        self._refine()

    def _refine(self) -> None:
        for module in list(self._stats):
            name = self._names[module]
            stats = self._stats.pop(module)
            with torch.no_grad(), align_module_device(module):
                cur = weight_out_in(module).detach()
                dense = from_stored_layout(module, self._source.weight(name)).to(cur.device, cur.dtype)
                mask = cur == 0
                if not torch.equal(cur[~mask], dense[~mask]):
                    raise PruningError(
                        f"DSnoT: layer '{name}': kept weights differ from the source checkpoint (a modifier "
                        "before DSnoT changed them: reconstruction, SparseGPT or smoothing); DSnoT needs "
                        "kept weights at their dense values"
                    )
                if not bool(mask.any()):
                    logger.warning(f"DSnoT: layer '{name}' is not pruned; skipped")
                    continue
                if self._n and not is_nm(cur, self._n, self._m):
                    raise PruningError(f"DSnoT: layer '{name}' is not {self._n}:{self._m} before refinement")
                mean = stats.mean().to(cur.device)
                before = expected_error(dense, mask, mean).abs().mean()
                new = dsnot_refine(
                    dense, mask, mean, stats.var().to(cur.device), stats.value(name).to(cur.device),
                    self._n, self._m, self.max_cycles, self.update_threshold, self.pow_of_var_regrowing, name,
                )  # fmt: skip
                after = expected_error(dense, new, mean).abs().mean()
                w = dense.masked_fill(new, 0).to(cur.dtype)
                update_offload_parameter(module, "weight", to_stored_layout(module, w).contiguous())
            changed = float((new != mask).float().mean())
            self._done[name] = changed
            logger.info(f"DSnoT {name}: mean |expected error| {before:.4g} -> {after:.4g}, {changed:.2%} of positions swapped")

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.remove_hooks()
        missing = [n for n in self._names.values() if n not in self._done]
        if missing and not self._done:
            raise PruningError(f"DSnoTModifier: no layer was refined (first: '{missing[0]}'); check the calibration data")
        return True
