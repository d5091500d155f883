"""crepe-plugin: CRePE / RIA post-training pruning for llm-compressor recipes.

``import crepe_plugin`` is cheap: it imports neither torch nor llm-compressor. The public names
below load on first use, and the modifiers register with llm-compressor's ModifierFactory on its
first use, whether llm-compressor is imported before or after this package (``_registration``). The serving
side (``crepe_plugin.vllm``) never imports llm-compressor.
"""

__version__ = "0.1.0"

_CORE = ("CRePEConfig", "RIA_CONFIG", "CREPE_DEFAULTS", "crepe_defaults", "crepe_scores", "prune_mask", "is_nm",
         "PruningError", "LayerShapeError", "NonFiniteError", "CalibrationError")  # fmt: skip
_MODIFIERS = ("CRePEPruningModifier", "RIAPruningModifier", "MaskedGPTQModifier", "OWLAllocationModifier",
              "DSnoTModifier", "ChannelPermutationModifier")  # fmt: skip

__all__ = ["__version__", *_CORE, *_MODIFIERS]


def __getattr__(name):
    if name in _CORE:
        from . import core

        return getattr(core, name)
    if name in _MODIFIERS:
        from . import modifiers

        return getattr(modifiers, name)
    raise AttributeError(f"module 'crepe_plugin' has no attribute {name!r}")


from ._registration import install as _install  # noqa: E402

_install()
