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
        (ct, ["is_match", "match_named_modules", "getattr_chain", "align_module_device", "get_execution_device",
              "update_offload_parameter", "disable_offloading", "QuantizationStrategy", "fake_quantize"]),
        (lc, ["Recipe", "Modifier", "ModifierFactory", "Event", "State", "GPTQModifier", "QuantizationMixin",
              "SparseGPTModifier", "SparsityModifierBase", "column_scale_window", "prepare_batch", "update_batch_qparams"]),
        (tc, ["cslt_compress", "cslt_sparse_mm", "cslt_sparse_mm_search"]),
    ]:  # fmt: skip
        for name in names:
            assert callable(getattr(mod, name)), (mod.__name__, name)


def test_recipe_modifiers_are_the_running_recipe_in_order():
    """What the recipe-order guards read: inside a running recipe, its modifiers in order."""
    import crepe_plugin.compat.llmcompressor as lc
    from llmcompressor.core import active_session

    from crepe_plugin.testing import tiny_llama

    seen = []

    class Probe(lc.Modifier):
        def on_initialize(self, state, **kwargs):
            seen.append(lc.recipe_modifiers())
            return True

    a, b = Probe(), Probe()
    session = active_session()
    session.reset()
    try:
        assert lc.recipe_modifiers() == []  # no recipe running
        session.initialize(recipe=[a, b], model=tiny_llama(layers=1))
    finally:
        session.reset()
    assert len(seen) == 2 and all(len(mods) == 2 and mods[0] is a and mods[1] is b for mods in seen)


def test_the_wrapped_internals_behave_as_the_plugin_expects(tiny_model_dir):
    """GPTQ's per-module state (what mask-preserving GPTQ reads) during a real oneshot, and the
    sequential targets, on a real model."""
    import crepe_plugin.compat.llmcompressor as lc
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from crepe_plugin.testing import tiny_llama, tiny_tokenizer

    from .conftest import calib_dataset

    assert set(lc.sequential_layer_targets(tiny_llama(layers=1), None)) == {"LlamaDecoderLayer"}
    seen = {}

    class Spy(lc.GPTQModifier):
        def compress_module_list(self, module_list):
            for module in module_list:
                name, hessians, counts = lc.gptq_module_state(self, module)
                seen[name] = (tuple(hessians[module].shape), int(counts[module]), module.weight.shape[1])
            return super().compress_module_list(module_list)

    oneshot(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer=tiny_tokenizer(), dataset=calib_dataset(2),
            recipe=[Spy(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])], num_calibration_samples=2,
            max_seq_length=64)  # fmt: skip
    linears = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.k_proj",
               "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    assert sorted(seen) == sorted(linears)
    assert all(shape == (cols, cols) and count == 2 for shape, count, cols in seen.values())


def test_a_save_marked_as_wrapped_is_not_wrapped_again():
    """``mark_save_wrapped``: llm-compressor's save wrapper leaves our record-keeping save in place."""
    from llmcompressor.transformers.compression.compressed_tensors_utils import modify_save_pretrained

    from crepe_plugin.checkpoint.save import keep_record_on_save
    from crepe_plugin.testing import tiny_llama

    model = tiny_llama(layers=1)
    plain = model.save_pretrained
    modify_save_pretrained(model)
    assert model.save_pretrained != plain  # an unmarked save is wrapped
    keep_record_on_save(model)  # ours, around llm-compressor's, marked
    ours = model.save_pretrained
    modify_save_pretrained(model)
    assert model.save_pretrained is ours


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
