"""Register our modifiers with llm-compressor without importing it from ``import crepe_plugin``.

``import crepe_plugin`` must stay cheap (the CLI's start-up, vLLM's entry point), yet a user who
writes ``import crepe_plugin`` and then runs a recipe naming ``CRePEPruningModifier`` expects it to
be found. So registration happens on first use: once llm-compressor is imported (before or after
this package), its ``ModifierFactory.create`` is wrapped to register our modifiers the first time
it is called, when every import has finished (registering any earlier could import
``crepe_plugin.modifiers`` while one of our modules is still initialising). Importing
``crepe_plugin.modifiers`` registers too. Without llm-compressor (the serving environment),
nothing happens.

This is the one place outside ``crepe_plugin.compat`` that touches an llm-compressor name
(``llmcompressor.modifiers.factory.ModifierFactory.create``): it runs before ``compat`` may be
imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_PACKAGE = "llmcompressor"


def _register() -> None:
    from .modifiers import register

    register()


def _register_on_first_use() -> None:
    factory = importlib.import_module("llmcompressor.modifiers.factory").ModifierFactory
    original = factory.create
    if getattr(original, "_crepe_registers", False):
        return

    def create(*args, **kwargs):
        _register()
        return original(*args, **kwargs)

    create._crepe_registers = True
    factory.create = staticmethod(create)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``llmcompressor`` to act after it ran."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PACKAGE:
            return None
        sys.meta_path.remove(self)  # one shot; also lets find_spec below see the real finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_hook(module):
            exec_module(module)
            sys.modules[fullname] = module  # the import system sets it after exec; our import needs it now
            _register_on_first_use()

        spec.loader.exec_module = exec_then_hook
        return spec


def install() -> None:
    if sys.modules.get(_PACKAGE) is not None:
        _register_on_first_use()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path) and importlib.util.find_spec(_PACKAGE) is not None:
        sys.meta_path.insert(0, _AfterImport())
