"""crepe-plugin: CRePE / RIA post-training pruning for llm-compressor recipes.

Importing this package registers the modifiers with llm-compressor's ModifierFactory
when llm-compressor is installed (the ``compress`` extra). The serving side
(``crepe_plugin.vllm``) never imports llm-compressor.
"""

__version__ = "0.1.0"

from .core import (  # noqa: E402
    RIA_CONFIG,
    CalibrationError,
    CRePEConfig,
    LayerShapeError,
    NonFiniteError,
    PruningError,
    crepe_scores,
    is_nm,
    prune_mask,
)

__all__ = [
    "__version__",
    "CRePEConfig",
    "RIA_CONFIG",
    "crepe_scores",
    "prune_mask",
    "is_nm",
    "PruningError",
    "LayerShapeError",
    "NonFiniteError",
    "CalibrationError",
]


def _register_modifiers() -> None:
    import importlib.util

    if importlib.util.find_spec("llmcompressor") is None:
        return
    from .modifiers import register

    register()


_register_modifiers()


def __getattr__(name):  # lazy access to the modifier classes
    if name in ("CRePEPruningModifier", "RIAPruningModifier", "MaskedGPTQModifier", "OWLAllocationModifier", "DSnoTModifier", "ChannelPermutationModifier"):
        from . import modifiers

        return getattr(modifiers, name)
    raise AttributeError(name)
