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
from loguru import logger
from pydantic import Field, PrivateAttr

from ..compat.compressed_tensors import align_module_device, get_execution_device
from ..compat.llmcompressor import State
from ..core import (
    CalibrationError,
    InputMomentStats,
    PruningError,
    dsnot_refine,
    expected_error,
    from_stored_layout,
    is_nm,
    weight_out_in,
)
from ..selection import PRUNABLE, select_layers
from .base import LayerwiseModifier

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


class DSnoTModifier(LayerwiseModifier):
    """DSnoT (Zhang et al., ICLR 2024) after a mask-only pruner. Defaults are the paper's
    (50 cycles, threshold 0.1, variance power 1). The pruner before it must leave kept
    weights at their dense values: CRePE/RIA without ``reconstruct``, or Wanda (not
    SparseGPT, which updates weights).
    """

    targets: str | list[str] = Field(default_factory=lambda: list(PRUNABLE))
    max_cycles: int = Field(50, ge=1, le=10_000)
    update_threshold: float = Field(0.1, ge=0, lt=1)
    pow_of_var_regrowing: float = Field(1.0, ge=0)

    _n: int = PrivateAttr(0)
    _m: int = PrivateAttr(0)
    _source: DenseSource | None = PrivateAttr(None)
    _done: dict[str, float] = PrivateAttr(default_factory=dict)

    def on_initialize(self, state: State, **kwargs) -> bool:
        before = self.pruners_before()
        if not before:
            raise PruningError("DSnoTModifier refines a pruning mask: put it after CRePE, RIA or Wanda in the recipe")
        pruner = before[-1]
        if not pruner.keeps_dense_values:
            raise PruningError(
                f"DSnoTModifier cannot follow {pruner.label}: it updates the kept weights, and DSnoT's swaps assume "
                "kept weights hold their dense values"
            )
        self._n, self._m = pruner.structure
        self._layers = {m: n for n, m in select_layers(state.model, self.targets, self.ignore).items()}
        if not self._layers:
            raise PruningError(f"DSnoTModifier: targets {self.targets} match no Linear layer")
        self._source = DenseSource(getattr(state.model.config, "_name_or_path", None))
        return True

    def new_stats(self, module: torch.nn.Module) -> InputMomentStats:
        return InputMomentStats(weight_out_in(module).shape[1], device=get_execution_device(module))

    def process_layer(self, module: torch.nn.Module, name: str, stats: InputMomentStats) -> None:
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
                return
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
            self.write_weight(module, w)
        changed = float((new != mask).float().mean())
        self._done[name] = changed
        logger.info(f"DSnoT {name}: mean |expected error| {before:.4g} -> {after:.4g}, {changed:.2%} of positions swapped")

    def on_finalize(self, state: State, **kwargs) -> bool:
        super().on_finalize(state, **kwargs)
        missing = [n for n in self._layers.values() if n not in self._done]
        if missing and not self._done:
            raise PruningError(f"DSnoTModifier: no layer was refined (first: '{missing[0]}'); check the calibration data")
        return True
