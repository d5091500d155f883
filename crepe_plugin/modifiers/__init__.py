"""llm-compressor glue. Importing ``crepe_plugin`` calls ``register()``."""

from .allocation import OWLAllocationModifier
from .dsnot import DSnoTModifier
from .gptq import MaskedGPTQModifier
from .permutation import ChannelPermutationModifier
from .pruning import CRePEPruningModifier, RIAPruningModifier

__all__ = [
    "CRePEPruningModifier",
    "RIAPruningModifier",
    "MaskedGPTQModifier",
    "OWLAllocationModifier",
    "DSnoTModifier",
    "ChannelPermutationModifier",
    "register",
    "MODIFIERS",
]

MODIFIERS = {
    "CRePEPruningModifier": CRePEPruningModifier,
    "RIAPruningModifier": RIAPruningModifier,
    "MaskedGPTQModifier": MaskedGPTQModifier,
    "OWLAllocationModifier": OWLAllocationModifier,
    "DSnoTModifier": DSnoTModifier,
    "ChannelPermutationModifier": ChannelPermutationModifier,
}


def register() -> None:
    """Register our modifiers with llm-compressor's ModifierFactory (idempotent)."""
    from llmcompressor.modifiers import ModifierFactory

    for name, cls in MODIFIERS.items():
        ModifierFactory.register(name, cls)
