"""Errors raised by the pruning core. Each names the layer it concerns."""

from __future__ import annotations

__all__ = ["PruningError", "LayerShapeError", "NonFiniteError", "CalibrationError"]


def _where(layer: str | None) -> str:
    return f"layer '{layer}'" if layer else "weight"


class PruningError(ValueError):
    """Base class: a pruning input is unusable."""


class LayerShapeError(PruningError):
    """A layer's shape does not fit the requested structure."""


class NonFiniteError(PruningError):
    """NaN or Inf in a weight or statistic."""


class CalibrationError(PruningError):
    """Calibration statistics are missing or unusable."""
