"""The crepe_sparse vLLM plugin on the CPU build of vLLM (runs in the serve venv).

On CPU the sparse path cannot run, so these tests pin what must hold everywhere: the entry
point loads (twice), our checkpoints are claimed and plain ones are not, the fallback is taken
and said, and generation is token-for-token the run without the plugin. The cuSPARSELt path
itself is tested on a GPU by tests/gpu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from .conftest import check, prune


def _plugin():
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "crepe_sparse"]
    assert len(eps) == 1, "the serve extra must install the vllm.general_plugins entry point"
    return eps[0]


def test_entry_point_registers_once_and_tolerates_reloading():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    from crepe_plugin.vllm.quant import CRePESparseConfig

    register = _plugin().load()
    register()
    register()
    _plugin().load()()
    assert QUANTIZATION_METHODS.count("crepe_sparse") == 1
    assert get_quantization_config("crepe_sparse") is CRePESparseConfig


@pytest.fixture(scope="module")
def checkpoints(workdir):
    return {r: prune(workdir, f"{r}.yaml") for r in ("crepe_2of4", "crepe_2of4_fp8_dynamic")} | {"plain": workdir / "tiny"}


def test_vllm_claims_only_checkpoints_with_our_record(checkpoints):
    """vLLM's own ModelConfig resolution, with the plugin registered: the quantized 2:4
    checkpoint is claimed through the override hook, the plain model is left alone, a pruned-only
    one is claimed when asked for by name, and a user's explicit choice is respected."""
    from vllm.config import ModelConfig

    _plugin().load()()
    q = lambda path, **kw: ModelConfig(model=str(path), dtype="float32", max_model_len=128, **kw).quantization  # noqa: E731
    assert q(checkpoints["crepe_2of4_fp8_dynamic"]) == "crepe_sparse"
    assert q(checkpoints["crepe_2of4_fp8_dynamic"], quantization="compressed-tensors") == "compressed-tensors"
    assert q(checkpoints["plain"]) is None
    assert q(checkpoints["crepe_2of4"]) is None  # no quantization_config: vLLM asks no hook
    assert q(checkpoints["crepe_2of4"], quantization="crepe_sparse") == "crepe_sparse"


def test_override_hook_reads_the_record(checkpoints):
    from transformers import AutoConfig

    from crepe_plugin.vllm.quant import CRePESparseConfig, sparse_modules

    fp8 = checkpoints["crepe_2of4_fp8_dynamic"]
    hf = AutoConfig.from_pretrained(fp8)
    qcfg = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert len(sparse_modules(hf.crepe_sparsity)) == 2 * 7  # 2 layers x q,k,v,o,gate,up,down
    assert CRePESparseConfig.override_quantization_method(qcfg, None, hf_config=hf) == "crepe_sparse"
    assert CRePESparseConfig.override_quantization_method(qcfg, "fp8", hf_config=hf) is None
    plain = AutoConfig.from_pretrained(checkpoints["plain"])
    assert CRePESparseConfig.override_quantization_method(qcfg, None, hf_config=plain) is None


def test_forcing_the_plugin_on_a_plain_model_is_a_clear_error(checkpoints):
    code = (
        "from vllm import LLM\n"
        "if __name__ == '__main__':\n"
        f"    LLM(model={str(checkpoints['plain'])!r}, dtype='float32', max_model_len=128, enforce_eager=True, "
        "quantization='crepe_sparse')\n"
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0
    assert "has no 'crepe_sparsity' record with 2:4 modules" in r.stdout + r.stderr


def test_pruned_checkpoint_falls_back_on_cpu_and_matches_no_plugin(pruned_check, pruned_checkpoint):
    res, r = pruned_check
    assert res and res["quantization"] == "crepe_sparse", r.stdout[-3000:] + r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "crepe_sparse: 2:4 layers fall back to the dense path: CPU" in log
    off, r2 = check(pruned_checkpoint, "--no-server", "--no-plugin", env={"VLLM_PLUGINS": ""})
    assert off and off["quantization"] is None, r2.stderr[-3000:]
    assert res["vllm_tokens"] == off["vllm_tokens"]


def test_fp8_checkpoint_claimed_and_matches_no_plugin(checkpoints):
    on, r = check(checkpoints["crepe_2of4_fp8_dynamic"], "--no-server")
    assert on and on["quantization"] == "crepe_sparse", r.stdout[-3000:] + r.stderr[-3000:]
    assert "compressed-tensors' dense quantized kernels" in r.stdout + r.stderr
    off, r2 = check(checkpoints["crepe_2of4_fp8_dynamic"], "--no-server", env={"VLLM_PLUGINS": ""})
    assert off and off["quantization"] == "compressed-tensors", r2.stderr[-3000:]
    assert on["vllm_tokens"] == off["vllm_tokens"]


def test_fused_vllm_layers_match_their_checkpoint_modules(checkpoints):
    """vLLM fuses q/k/v and gate/up: a fused layer is 2:4 when every shard is in the record."""
    from transformers import AutoConfig

    from crepe_plugin.vllm.quant import CRePESparseConfig

    rec = AutoConfig.from_pretrained(checkpoints["crepe_2of4"]).crepe_sparsity
    cfg = CRePESparseConfig(record=rec)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for layer in ("qkv_proj", "o_proj"):
        assert cfg._is_sparse(f"model.layers.1.self_attn.{layer}")
    for layer in ("gate_up_proj", "down_proj"):
        assert cfg._is_sparse(f"model.layers.0.mlp.{layer}")
    assert not cfg._is_sparse("lm_head")
    partial = {**rec, "modules": {k: v for k, v in rec["modules"].items() if not k.endswith("k_proj")}}
    cfg = CRePESparseConfig(record=partial)
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert not cfg._is_sparse("model.layers.0.self_attn.qkv_proj")  # one shard dense: the fused layer is not 2:4


def test_row_parallel_split_off_a_multiple_of_4_is_left_dense():
    """The claim under tensor parallelism, on vLLM's own layer classes: a row-parallel layer whose
    per-rank input slice is a multiple of 4 is claimed; one whose slice cuts the groups of 4 (260
    inputs over 2 ranks: 130 each) is left to vLLM's dense method, as a column-parallel one never is."""
    from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear, UnquantizedLinearMethod

    from crepe_plugin.vllm.quant import CRePESparseConfig, CRePESparseLinearMethod

    name = "model.layers.0.mlp.down_proj"
    cfg = CRePESparseConfig(record={"modules": {name: {"structure": "2:4"}}})
    cfg.packed_modules_mapping = {}

    def layer(cls, input_size, per_rank):  # attributes vLLM sets before it asks for the quant method
        m = cls.__new__(cls)
        object.__setattr__(m, "input_size", input_size)
        object.__setattr__(m, "input_size_per_partition", per_rank)
        return m

    assert isinstance(cfg.get_quant_method(layer(RowParallelLinear, 256, 128), name), CRePESparseLinearMethod)
    assert isinstance(cfg.get_quant_method(layer(RowParallelLinear, 260, 260), name), CRePESparseLinearMethod)  # tp 1
    left = cfg.get_quant_method(layer(RowParallelLinear, 260, 130), name)
    assert type(left) is UnquantizedLinearMethod
    assert isinstance(cfg.get_quant_method(layer(ColumnParallelLinear, 260, 260), name), CRePESparseLinearMethod)
