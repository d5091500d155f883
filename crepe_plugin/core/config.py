"""CRePE scoring configuration (pydantic, framework-free)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = ["CRePEConfig", "RIA_CONFIG", "CREPE_DEFAULTS", "crepe_defaults", "Coef", "KernelSize", "KernelName", "Border", "NeighborMap"]


def _finite(v: float) -> float:
    if not math.isfinite(v):
        raise ValueError(f"coefficient must be finite, got {v}")
    return v


def _odd(v: int) -> int:
    if v % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the window is centred on the weight), got {v}")
    return v


# Field types shared by CRePEConfig and the modifiers, so both validate alike.
Coef = Annotated[float, Field(ge=0.0), AfterValidator(_finite)]
KernelSize = Annotated[int, Field(ge=1), AfterValidator(_odd)]
KernelName = Literal["box", "gaussian"]
Border = Literal["mean", "zero", "reflect", "replicate"]
NeighborMap = Literal["ri", "score"]


class CRePEConfig(BaseModel):
    """Coefficients of the CRePE importance score.

    score = (row_coef * |W|/rowsum + col_coef * |W|/colsum + neighbor_coef * N_k(map))
            * ||X_j|| ** act_exponent

    With row_coef = col_coef = 1, neighbor_coef = 0 and act_exponent = 0.5 this is
    exactly RIA (Zhang et al., ICLR 2024). See docs/method.md for every choice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    row_coef: Coef = Field(1.0, description="weight of |W| / row sum (sum over inputs)")
    col_coef: Coef = Field(1.0, description="weight of |W| / column sum (sum over outputs)")
    neighbor_coef: Coef = Field(0.0, description="weight of the k x k neighborhood term")
    kernel_size: KernelSize = Field(3, description="odd side length k of the neighborhood window")
    kernel: KernelName = Field("box", description="window weights")
    act_exponent: Coef = Field(0.5, description="exponent a on the input norm ||X_j||")
    border: Border = Field(
        "mean",
        description=(
            "what the window sees past the matrix edge: 'mean' renormalises the kernel over "
            "in-bounds cells, 'zero' pads with zeros, 'reflect'/'replicate' mirror or repeat the edge"
        ),
    )
    neighbor_map: NeighborMap = Field(
        "ri",
        description=(
            "map the window runs over: 'ri' = the weighted relative-importance map before the "
            "activation factor, 'score' = after it"
        ),
    )

    @model_validator(mode="after")
    def _not_degenerate(self) -> "CRePEConfig":
        if self.row_coef == 0.0 and self.col_coef == 0.0:
            raise ValueError(
                "row_coef and col_coef are both 0: every score would be 0 and the mask would ignore the "
                "weights; give at least one of them a positive value"
            )
        return self

    @property
    def is_ria(self) -> bool:
        return (
            self.row_coef == 1.0
            and self.col_coef == 1.0
            and self.neighbor_coef == 0.0
            and self.act_exponent == 0.5
        )


RIA_CONFIG = CRePEConfig(
    row_coef=1.0, col_coef=1.0, neighbor_coef=0.0, kernel_size=3, kernel="box", act_exponent=0.5, border="mean", neighbor_map="ri"
)
"""RIA's point: with these values the score is RIA's bit for bit (RIAPruningModifier)."""


# CRePEPruningModifier's defaults, one set per kind of structure. Chosen by
# benchmarks/tune_defaults.py on SmolLM2-135M and Gemma 3 270M together, by validation
# perplexity (never the test text): docs/method.md, "Defaults".
CREPE_DEFAULTS: dict[str, dict] = {
    # 2:4 validation perplexity, every layer pruned from dense statistics: SmolLM2 113.34 and
    # Gemma 237.94, against RIA's 123.93 and 292.74 (benchmarks/results/tune_defaults_2of4.jsonl)
    "nm": dict(
        row_coef=2.513921, col_coef=2.002273, neighbor_coef=0.203327, kernel_size=3, kernel="gaussian",
        act_exponent=0.855673, border="zero", neighbor_map="ri",
    ),  # fmt: skip
    # 50% validation perplexity, every layer pruned from dense statistics: SmolLM2 37.11 and
    # Gemma 97.35, against Wanda's 37.83 and 113.17 and RIA's (matrix scope) 40.59 and 127.91
    # (benchmarks/results/tune_defaults_unstructured50.jsonl)
    "unstructured": dict(
        row_coef=2.364833, col_coef=1.205908, neighbor_coef=0.012435, kernel_size=3, kernel="gaussian",
        act_exponent=1.168583, border="zero", neighbor_map="ri", scope="row",
    ),  # fmt: skip
}


def crepe_defaults(structure: str) -> dict:
    """The default coefficients (and, unstructured, the scope) for 'N:M' or '0:0'."""
    from .masks import parse_structure

    n, _ = parse_structure(structure)
    return dict(CREPE_DEFAULTS["nm" if n else "unstructured"])
