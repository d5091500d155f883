"""Calibration statistics for activation-aware scores. Pure torch."""

from __future__ import annotations

import torch

from .errors import CalibrationError, _where

__all__ = ["InputNormStats", "InputMomentStats"]


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


class InputMomentStats(InputNormStats):
    """``InputNormStats`` plus the per-token mean and variance of every input feature
    (what DSnoT's expected-error criterion needs). float64 accumulation."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        super().__init__(in_features, device)
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def update(self, inp: torch.Tensor) -> None:
        super().update(inp)
        x = inp.detach().reshape(-1, inp.shape[-1]).to(self.sum.device, torch.float32)
        self.sum += x.sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).to(torch.float32)

    def var(self) -> torch.Tensor:
        m = self.sum / max(self.tokens, 1)
        return (self.sum_sq / max(self.tokens, 1) - m * m).clamp_min(0).to(torch.float32)
