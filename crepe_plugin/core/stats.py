"""Calibration statistics for activation-aware scores. Pure torch."""

from __future__ import annotations

import torch

from .errors import CalibrationError, _where

__all__ = ["InputNormStats"]


class InputNormStats:
    """Running ``input_sq_norm``: the mean over calibration samples of ||X_j||^2.

    A sample is one sequence; its squared norm for feature j sums x_j^2 over its tokens
    (Wanda's and RIA's ``scaler_row``). Accumulated in float64 whatever the input dtype,
    so fp16/bf16 models get fp32-accurate statistics.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.num_samples = 0

    def update(self, inp: torch.Tensor) -> None:
        """inp: (batch, seq, in) or (seq, in) activations entering the layer."""
        if inp.dim() == 2:
            inp = inp.unsqueeze(0)
        batch = inp.shape[0]
        x = inp.detach().reshape(-1, inp.shape[-1]).to(self.sum_sq.device, torch.float32)
        self.sum_sq += x.pow(2).sum(dim=0, dtype=torch.float64)
        self.num_samples += batch

    def value(self, layer_name: str | None = None) -> torch.Tensor:
        """float32 vector of mean squared input norms."""
        if self.num_samples == 0:
            raise CalibrationError(
                f"{_where(layer_name)}: received no calibration samples; check the calibration "
                "dataset (empty?) and that the layer is reached in the forward pass"
            )
        return (self.sum_sq / self.num_samples).to(torch.float32)
