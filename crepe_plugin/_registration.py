"""Register our modifiers with llm-compressor without importing it from ``import crepe_plugin``.

``import crepe_plugin`` must stay cheap (the CLI's start-up, vLLM's entry point), yet a user who
writes ``import crepe_plugin`` and then ``from llmcompressor import oneshot`` expects recipes to
find ``CRePEPruningModifier``. So: if llm-compressor is already imported, register now; if it is
installed but not imported, register the moment its top-level package finishes importing (a
one-shot meta-path finder that wraps that one module's ``exec_module``); if it is not installed
(the serving environment), do nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_PACKAGE = "llmcompressor"


def _register() -> None:
    mod = sys.modules.get(f"{__package__}.modifiers")
    if mod is not None and not hasattr(mod, "register"):
        return  # crepe_plugin.modifiers is importing llm-compressor itself: it registers at its end
    from .modifiers import register

    register()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``llmcompressor`` to register afterwards."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PACKAGE:
            return None
        sys.meta_path.remove(self)  # one shot; also lets find_spec below see the real finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            sys.modules[fullname] = module  # the import system sets it after exec; our import needs it now
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if sys.modules.get(_PACKAGE) is not None:
        _register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path) and importlib.util.find_spec(_PACKAGE) is not None:
        sys.meta_path.insert(0, _AfterImport())
