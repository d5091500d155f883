"""Framework-free pruning math: scores, masks, statistics. Imports torch and pydantic only."""

from .compensation import HessianStats, compensate_fixed_mask, inverse_hessian_factor, refine_fixed_mask
from .config import RIA_CONFIG, CRePEConfig
from .errors import CalibrationError, LayerShapeError, NonFiniteError, PruningError
from .layers import is_conv1d, weight_out_in
from .masks import is_nm, nm_mask, nm_violations, parse_structure, prune_mask, unstructured_mask
from .scores import crepe_scores, neighborhood, relative_importance
from .stats import InputMomentStats, InputNormStats
from .allocation import outlier_ratio, owl_sparsities, wanda_importance
from .dsnot import dsnot_refine, expected_error

__all__ = [
    "CRePEConfig",
    "RIA_CONFIG",
    "PruningError",
    "LayerShapeError",
    "NonFiniteError",
    "CalibrationError",
    "crepe_scores",
    "relative_importance",
    "neighborhood",
    "prune_mask",
    "nm_mask",
    "unstructured_mask",
    "parse_structure",
    "nm_violations",
    "is_nm",
    "InputNormStats",
    "InputMomentStats",
    "outlier_ratio",
    "owl_sparsities",
    "wanda_importance",
    "dsnot_refine",
    "expected_error",
    "HessianStats",
    "compensate_fixed_mask",
    "inverse_hessian_factor",
    "refine_fixed_mask",
    "is_conv1d",
    "weight_out_in",
]
