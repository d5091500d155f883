"""verify's notion of the files vLLM reads is vLLM's own (``DefaultModelLoader._prepare_weights``)."""

import os

import pytest


def test_weight_files_resolve_as_vllm_resolves_them(tmp_path):
    pytest.importorskip("vllm")
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    from crepe_plugin.checkpoint.verify import _vllm_files
    from crepe_plugin.testing import save_weight_layouts

    loader = DefaultModelLoader(LoadConfig(load_format="auto"))
    for name, d in save_weight_layouts(tmp_path).items():
        _, files, _, _ = loader._prepare_weights(str(d), None, None, True, None)
        present = sorted(p.name for p in d.glob("*.safetensors"))
        assert _vllm_files(d, present) == sorted(os.path.basename(f) for f in files), name
