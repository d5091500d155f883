"""llm-compressor glue: one module per modifier on the shared ``base.LayerwiseModifier``
(``MaskedGPTQModifier`` extends llm-compressor's GPTQ). ``register()`` runs when llm-compressor
is imported (see ``crepe_plugin._registration``)."""

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
    from ..compat.llmcompressor import ModifierFactory

    for name, cls in MODIFIERS.items():
        ModifierFactory.register(name, cls)


register()  # idempotent; covers ``import crepe_plugin.modifiers`` before llm-compressor was imported
