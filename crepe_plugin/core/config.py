"""CRePE scoring configuration (pydantic, framework-free)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

__all__ = ["CRePEConfig", "RIA_CONFIG", "CREPE_DEFAULTS", "DEFAULT_SCOPE", "crepe_defaults", "default_scope", "Coef", "KernelSize", "KernelName", "Border", "NeighborMap"]


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

    The field defaults are RIA's point (``RIA_CONFIG``): with row_coef = col_coef = 1,
    neighbor_coef = 0 and act_exponent = 0.5 this is exactly RIA (Zhang et al., ICLR 2024).
    The shipped defaults per structure are ``CREPE_DEFAULTS``. See docs/method.md.
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

    def override(self, **given) -> "CRePEConfig":
        """This config with the ``given`` fields replaced (a ``None`` value keeps the field), validated."""
        return CRePEConfig(**{**self.model_dump(), **{k: v for k, v in given.items() if v is not None}})


RIA_CONFIG = CRePEConfig()
"""RIA's point, the field defaults above: with these values the score is RIA's bit for bit."""


# The shipped defaults, one set per kind of structure: what CRePEPruningModifier and `crepe search`
# use for every field a recipe (or the command line) leaves out. Chosen by
# benchmarks/tune_defaults.py on SmolLM2-135M and Gemma 3 270M together, by validation
# perplexity (never the test text): docs/method.md, "Defaults".
CREPE_DEFAULTS: dict[str, CRePEConfig] = {
    # 2:4 validation perplexity, every layer pruned from dense statistics: SmolLM2 113.34 and
    # Gemma 237.94, against RIA's 123.93 and 292.74 (benchmarks/results/tune_defaults_2of4.jsonl)
    "nm": CRePEConfig(
        row_coef=2.513921, col_coef=2.002273, neighbor_coef=0.203327, kernel_size=3, kernel="gaussian",
        act_exponent=0.855673, border="zero", neighbor_map="ri",
    ),  # fmt: skip
    # 50% validation perplexity, every layer pruned from dense statistics: SmolLM2 37.11 and
    # Gemma 97.35, against Wanda's 37.83 and 113.17 and RIA's (matrix scope) 40.59 and 127.91
    # (benchmarks/results/tune_defaults_unstructured50.jsonl)
    "unstructured": CRePEConfig(
        row_coef=2.364833, col_coef=1.205908, neighbor_coef=0.012435, kernel_size=3, kernel="gaussian",
        act_exponent=1.168583, border="zero", neighbor_map="ri",
    ),  # fmt: skip
}
# unstructured masks: one threshold per matrix (RIA's) or per row (Wanda's); N:M ignores it
DEFAULT_SCOPE: dict[str, str] = {"nm": "matrix", "unstructured": "row"}


def _kind(structure: str | tuple[int, int]) -> str:
    from .masks import parse_structure

    n = structure[0] if isinstance(structure, tuple) else parse_structure(structure)[0]
    return "nm" if n else "unstructured"


def crepe_defaults(structure: str | tuple[int, int]) -> CRePEConfig:
    """The shipped default coefficients for 'N:M' or '0:0' (or a parsed (N, M))."""
    return CREPE_DEFAULTS[_kind(structure)]


def default_scope(structure: str | tuple[int, int]) -> str:
    """The shipped default scope for 'N:M' or '0:0' (or a parsed (N, M))."""
    return DEFAULT_SCOPE[_kind(structure)]
