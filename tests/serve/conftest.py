"""Shared pieces of the serving suite (runs in the serve venv).

Checkpoints are produced by the real pipeline in the compression venv
($CREPE_COMPRESS_PYTHON, default .venv-compress/bin/python): the two sides never share an
environment, as with llmcompressor 0.14 and vLLM in practice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPRESS_PY = os.environ.get("CREPE_COMPRESS_PYTHON", str(ROOT / ".venv-compress" / "bin" / "python"))
SHARED = Path(os.environ.get("CREPE_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    assert Path(COMPRESS_PY).exists(), f"compression env missing at {COMPRESS_PY}; run scripts/setup.sh"
    return tmp_path_factory.mktemp("serve")


def _compress(*args: str) -> None:
    """Run python in the compression environment (building models, `crepe prune`)."""
    subprocess.run([COMPRESS_PY, *args], check=True)


def prune(d: Path, recipe: str) -> Path:
    """Build the tiny model once and run one recipe through `crepe prune` in the compress env
    (once per recipe and session)."""
    calib = SHARED / "wikitext2" / "wiki.valid.tokens.txt"
    if not calib.exists():
        calib = d / "calib.txt"
        calib.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    if not (d / "tiny").exists():
        # head_dim 64: a size every vLLM CPU attention backend takes
        _compress("-c", "from crepe_plugin.testing import save_tiny_llama as s; "
                  f"s({str(d / 'tiny')!r}, hidden=128, heads=2, kv_heads=1, intermediate=256)")  # fmt: skip
    out = d / Path(recipe).stem
    if not (out / "config.json").exists():
        _compress("-m", "crepe_plugin.cli", "prune", str(d / "tiny"), "--recipe", str(ROOT / "recipes" / recipe),
                  "--calib", str(calib), "--out", str(out), "--num-samples", "8", "--seqlen", "64")  # fmt: skip
    return out


def prune_moe(d: Path, arch: str) -> Path:
    """A tiny MoE (head_dim 64) built and pruned 2:4 by `crepe prune` in the compress env."""
    calib = SHARED / "wikitext2" / "wiki.valid.tokens.txt"
    dense, out = d / f"tiny-{arch}", d / f"tiny-{arch}-2of4"
    if not (dense / "config.json").exists():
        _compress("-c", "from crepe_plugin.testing import save_tiny_moe as s; "
                  f"s({str(dense)!r}, arch={arch!r}, hidden=128, heads=2, kv_heads=1, intermediate=128)")  # fmt: skip
    if not (out / "config.json").exists():
        _compress("-m", "crepe_plugin.cli", "prune", str(dense), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"),
                  "--calib", str(calib), "--out", str(out), "--num-samples", "8", "--seqlen", "64")  # fmt: skip
    return out


def check(path: Path, *extra: str, env: dict | None = None) -> tuple[dict | None, subprocess.CompletedProcess]:
    """`python -m crepe_plugin.vllm.check PATH --json ...` in a fresh process: its RESULT and the run."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), **(env or {})}
    r = subprocess.run(
        [sys.executable, "-m", "crepe_plugin.vllm.check", str(path), "--max-tokens", "16", "--json", *extra],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    line = next((l for l in r.stdout.splitlines() if l.startswith("RESULT ")), None)
    return (json.loads(line[7:]) if line else None), r


@pytest.fixture(scope="session")
def pruned_checkpoint(workdir) -> Path:
    return prune(workdir, "crepe_2of4.yaml")


@pytest.fixture(scope="session")
def pruned_check(pruned_checkpoint):
    """serve-check of the CRePE 2:4 checkpoint, server included (shared by two test files)."""
    return check(pruned_checkpoint)
