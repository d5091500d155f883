"""PHO configuration: search space and search settings (pydantic)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Range", "OddRange", "SearchSpace", "SearchConfig", "PROXY_NAMES", "SEARCHED"]

PROXY_NAMES = ("recon", "energy", "diag", "gini", "ppl")
SEARCHED = ("row_coef", "col_coef", "neighbor_coef", "kernel_size", "act_exponent")


class Range(BaseModel):
    """A closed float interval; low == high fixes the parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: float = Field(ge=0.0)
    high: float = Field(ge=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"range low {self.low} is above high {self.high}")
        return self


class OddRange(BaseModel):
    """Odd integers from low to high (kernel sizes)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: int = Field(1, ge=1)
    high: int = Field(7, ge=1)

    @model_validator(mode="after")
    def _odd(self) -> "OddRange":
        if self.low % 2 == 0 or self.high % 2 == 0:
            raise ValueError(f"kernel_size bounds must be odd, got [{self.low}, {self.high}]")
        if self.low > self.high:
            raise ValueError(f"kernel_size low {self.low} is above high {self.high}")
        return self


class SearchSpace(BaseModel):
    """Bounds of the searched CRePE coefficients. RIA (1, 1, 0, *, 0.5) must lie inside."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    row_coef: Range = Range(low=0.0, high=3.0)
    col_coef: Range = Range(low=0.0, high=3.0)
    neighbor_coef: Range = Range(low=0.0, high=1.0)
    kernel_size: OddRange = OddRange()
    act_exponent: Range = Range(low=0.0, high=1.5)


class SearchConfig(BaseModel):
    """PHO settings; also the ``search:`` block of CRePEPruningModifier."""

    model_config = ConfigDict(extra="forbid")
    proxy: Literal[PROXY_NAMES] = Field(
        "energy", description="the proxy minimised; 'energy' tracked held-out perplexity best (docs/method.md)"
    )
    trials: int = Field(60, ge=1, le=100_000)
    sampler: Literal["cmaes", "hillclimb", "random"] | None = Field(
        None, description="default: cmaes for a proxy, hillclimb for 'ppl' (the baseline PHO replaces)"
    )
    storage: str | None = Field(None, description="Optuna storage URL (sqlite:///..., postgresql://...); None = in memory")
    study_name: str | None = None
    seed: int = 0
    layers: int | Literal["all"] = Field(
        6, description="decoder layers (evenly spaced) whose linears the proxy scores; 'all' for every one"
    )
    ppl_samples: int = Field(8, ge=1, description="calibration windows of the 'ppl' baseline's perplexity")
    bounds: SearchSpace = SearchSpace()

    @property
    def sampler_name(self) -> str:
        return self.sampler or ("hillclimb" if self.proxy == "ppl" else "cmaes")
