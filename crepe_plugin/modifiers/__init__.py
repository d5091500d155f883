"""llm-compressor glue. Importing ``crepe_plugin`` calls ``register()``."""

from .gptq import MaskedGPTQModifier
from .pruning import CRePEPruningModifier, RIAPruningModifier

__all__ = ["CRePEPruningModifier", "RIAPruningModifier", "MaskedGPTQModifier", "register", "MODIFIERS"]

MODIFIERS = {
    "CRePEPruningModifier": CRePEPruningModifier,
    "RIAPruningModifier": RIAPruningModifier,
    "MaskedGPTQModifier": MaskedGPTQModifier,
}


def register() -> None:
    """Register our modifiers with llm-compressor's ModifierFactory (idempotent)."""
    from llmcompressor.modifiers import ModifierFactory

    for name, cls in MODIFIERS.items():
        ModifierFactory.register(name, cls)
