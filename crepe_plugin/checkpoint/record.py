"""The checkpoint record: our N:M structure under a top-level config.json key.

compressed-tensors >= 0.15 writes ``sparsity_config: {}`` and vLLM 0.33 rejects any
sparsity_config with targets, so the structure lives under a key of our own that
transformers keeps through load/save and vLLM ignores. JSON only: no framework imports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from .. import __version__
from pydantic import BaseModel, ConfigDict, Field, field_validator

RECORD_KEY = "crepe_sparsity"
RECORD_FORMAT = 1

__all__ = ["RECORD_KEY", "RECORD_FORMAT", "Record", "ModuleRecord", "new_record", "merge_record", "read_record", "parse_record"]


class ModuleRecord(BaseModel):
    """One pruned module: its structure, measured sparsity and stored weight layout."""

    model_config = ConfigDict(extra="allow")
    structure: str
    sparsity: float | None = Field(None, ge=0.0, le=1.0)
    layout: Literal["out_in", "in_out"] = "out_in"  # in_out: transformers' Conv1D

    @field_validator("structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        from ..core.masks import parse_structure

        parse_structure(v)
        return v


class Record(BaseModel):
    """The ``crepe_sparsity`` record, read as pure data (never executed, never trusted).

    ``config`` holds the pruner's resolved configuration (``CRePEPruningModifier.prune_config``):
    the score's coefficients, read back as the ``CRePEConfig`` they were (``score_config``), the
    scope and the reconstruction settings."""

    model_config = ConfigDict(extra="allow")
    format: int | None = None
    method: str | None = None
    structure: str | None = None
    modules: dict[str, ModuleRecord] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    @field_validator("config")
    @classmethod
    def _config(cls, v: dict[str, Any]) -> dict[str, Any]:
        _score_config(v)  # refuses coefficients no pruner could have used
        return v

    @property
    def score_config(self):
        """The score's coefficients as a ``core.CRePEConfig``, or None for a record without them."""
        return _score_config(self.config)


def _score_config(config: dict[str, Any]):
    from ..core.config import CRePEConfig

    coefs = {k: config[k] for k in CRePEConfig.model_fields if k in config}
    return CRePEConfig(**coefs) if coefs else None


def parse_record(data: Any) -> Record:
    """Validate a record; raises ValueError with a one-line reason."""
    from pydantic import ValidationError

    if not isinstance(data, dict):
        raise ValueError(f"the {RECORD_KEY} record must be a JSON object, got {type(data).__name__}")
    try:
        return Record.model_validate(data)
    except (ValidationError, ValueError, RecursionError) as e:
        if isinstance(e, ValidationError):
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise ValueError(f"the {RECORD_KEY} record is malformed at '{where}': {err['msg']}") from None
        raise ValueError(f"the {RECORD_KEY} record is malformed: {' '.join(str(e).split())[:200]}") from None


def new_record(
    method: str, modules: dict[str, dict[str, Any]], config: dict[str, Any] | None = None, **extra
) -> dict[str, Any]:
    """modules: {module_name: {"structure": "2:4" | "0:0", "sparsity": float}}."""
    structures = sorted({m["structure"] for m in modules.values()})
    return {
        "format": RECORD_FORMAT,
        "plugin_version": __version__,
        "method": method,
        "structure": structures[0] if len(structures) == 1 else "mixed",
        "config": dict(config or {}),
        "modules": dict(sorted(modules.items())),
        **extra,
    }


def merge_record(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """Combine records of several pruning modifiers applied in one run."""
    if not old:
        return new
    if "method" not in old:  # annotations only (e.g. a channel permutation), no pruned modules yet
        return {**old, **new}
    modules = {**old.get("modules", {}), **new.get("modules", {})}
    merged = {**old, **new, "modules": dict(sorted(modules.items()))}
    structures = sorted({m["structure"] for m in modules.values()})
    merged["structure"] = structures[0] if len(structures) == 1 else "mixed"
    if old.get("method") != new.get("method"):
        merged["method"] = f"{old.get('method')}+{new.get('method')}"
    return merged


def read_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The record of a saved checkpoint, or None if it has none."""
    cfg = Path(model_dir) / "config.json"
    with open(cfg) as f:
        data = json.load(f)
    return data.get(RECORD_KEY)
