"""The upstream seam: every wrapped name resolves against the pinned versions, a missing one
fails loudly with the installed version, and ``import crepe_plugin`` stays cheap."""

import subprocess
import sys

import pytest

from crepe_plugin.compat import UpstreamError, installed_version, resolve


def test_every_llmcompressor_and_compressed_tensors_name_resolves():
    import crepe_plugin.compat.compressed_tensors as ct
    import crepe_plugin.compat.llmcompressor as lc
    import crepe_plugin.compat.torch as tc

    for mod, names in [
        (ct, ["match_named_modules", "match_targets", "getattr_chain", "align_module_device", "get_execution_device",
              "update_offload_parameter", "disable_offloading", "QuantizationStrategy", "fake_quantize"]),
        (lc, ["Modifier", "ModifierFactory", "Event", "State", "GPTQModifier", "QuantizationMixin", "SparseGPTModifier",
              "SparsityModifierBase", "column_scale_window", "prepare_batch", "update_batch_qparams"]),
        (tc, ["cslt_compress", "cslt_sparse_mm", "cslt_sparse_mm_search"]),
    ]:  # fmt: skip
        for name in names:
            assert callable(getattr(mod, name)), (mod.__name__, name)
    assert lc.recipe_modifiers() == [] or isinstance(lc.recipe_modifiers(), list)


def test_the_wrapped_internals_behave_as_the_plugin_expects(tiny_model_dir):
    """GPTQ's per-module state and the sequential targets, on a real model and modifier."""
    import crepe_plugin.compat.llmcompressor as lc
    from crepe_plugin.testing import tiny_llama

    model = tiny_llama(layers=1)
    assert set(lc.sequential_layer_targets(model, None)) == {"LlamaDecoderLayer"}
    gptq = lc.GPTQModifier(scheme="W4A16", targets=["Linear"])
    lin = model.model.layers[0].mlp.up_proj
    gptq._module_names[lin] = "up"
    name, hessians, counts = lc.gptq_module_state(gptq, lin)
    assert name == "up" and hessians is gptq._hessians and counts is gptq._num_samples

    def f():
        pass

    lc.mark_save_wrapped(f)
    assert f._overridden is True


def test_a_missing_name_names_the_installed_version():
    with pytest.raises(UpstreamError, match=r"llmcompressor\.nope_module.*installed llmcompressor 0\.14"):
        resolve("llmcompressor", "llmcompressor.nope_module", None, "0.14.0.1")
    with pytest.raises(UpstreamError, match=r"compressed_tensors\.utils\.no_such_helper.*compressed-tensors 0\.19"):
        resolve("compressed-tensors", "compressed_tensors.utils", "no_such_helper")
    assert installed_version("surely-not-a-package") == "not installed"


def test_recipe_lookup_fails_loudly_when_llmcompressor_moves_it(monkeypatch):
    """The recipe-order guards must not switch off silently (the old `except AttributeError: return`)."""
    import crepe_plugin.compat.llmcompressor as lc

    class Session:
        lifecycle = object()  # no .recipe

    monkeypatch.setattr(lc, "_active_session", lambda: Session())
    with pytest.raises(UpstreamError, match="active_session"):
        lc.recipe_modifiers()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_crepe_plugin_is_cheap_and_registers_on_llmcompressor_import():
    r = _run(
        "import sys, crepe_plugin\n"
        "assert 'torch' not in sys.modules and 'llmcompressor' not in sys.modules, sorted(sys.modules)[:5]\n"
        "from llmcompressor.recipe import Recipe\n"
        "r = Recipe.create_instance(\"s_stage:\\n  s_modifiers:\\n    CRePEPruningModifier:\\n      mask_structure: '2:4'\\n\")\n"
        "assert type(r.modifiers[0]).__name__ == 'CRePEPruningModifier'\n"
        "print('ok')"
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_vllm_entry_point_never_imports_llmcompressor():
    """With llm-compressor made unimportable, the plugin's modules (all but vLLM itself) import."""
    r = _run(
        "import sys\n"
        "sys.modules['llmcompressor'] = None  # any import of it raises ImportError\n"
        "import crepe_plugin, crepe_plugin.vllm.plugin, crepe_plugin.vllm.sparse, crepe_plugin.vllm.check\n"
        "import crepe_plugin.checkpoint.verify, crepe_plugin.checkpoint.record\n"
        "print('ok')"
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_the_architecture_map_names_every_module():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "docs" / "architecture.md").read_text()
    pkg = root / "crepe_plugin"
    missing = []
    for f in sorted(pkg.rglob("*.py")):
        if f.name == "__init__.py":
            continue
        rel = f.relative_to(pkg).as_posix()
        if not any(f"`{x}`" in text for x in (rel, f.name, f.stem)):
            missing.append(rel)
    assert not missing, missing
