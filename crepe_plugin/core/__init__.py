"""Framework-free pruning math: scores, masks, statistics. Imports torch, pydantic and safetensors only."""

from .compensation import (
    compensate_adaptive_nm,
    compensate_adaptive_unstructured,
    compensate_fixed_mask,
    inverse_hessian_factor,
    refine_fixed_mask,
)
from .config import CREPE_DEFAULTS, DEFAULT_SCOPE, RIA_CONFIG, CRePEConfig, crepe_defaults, default_scope
from .errors import CalibrationError, LayerShapeError, NonFiniteError, PruningError
from .layers import decoder_layer, from_stored_layout, is_conv1d, set_weight, to_stored_layout, weight_out_in
from .masks import check_nm_width, is_nm, nm_mask, nm_violations, parse_structure, prune_mask, unstructured_mask
from .prune import LayerStats, PruneConfig, Reconstruction, layer_mask, prune_layer
from .scores import crepe_saliency, crepe_scores, linear_scores, neighborhood, relative_importance
from .stats import CalibStats, HessianStats, InputMomentStats, InputNormStats, gather_stats
from .allocation import outlier_ratio, owl_sparsities, wanda_importance
from .dsnot import dsnot_refine, expected_error

__all__ = [
    "CRePEConfig",
    "RIA_CONFIG",
    "CREPE_DEFAULTS",
    "crepe_defaults",
    "DEFAULT_SCOPE",
    "default_scope",
    "PruneConfig",
    "Reconstruction",
    "LayerStats",
    "layer_mask",
    "prune_layer",
    "check_nm_width",
    "PruningError",
    "LayerShapeError",
    "NonFiniteError",
    "CalibrationError",
    "crepe_scores",
    "linear_scores",
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
    "CalibStats",
    "gather_stats",
    "decoder_layer",
    "set_weight",
    "compensate_fixed_mask",
    "compensate_adaptive_nm",
    "compensate_adaptive_unstructured",
    "crepe_saliency",
    "inverse_hessian_factor",
    "refine_fixed_mask",
    "is_conv1d",
    "weight_out_in",
    "to_stored_layout",
    "from_stored_layout",
]
