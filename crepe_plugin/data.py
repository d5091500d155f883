"""Calibration and evaluation text: local files, local datasets, or hub dataset names."""

from __future__ import annotations

import os
import random
from pathlib import Path

from loguru import logger

__all__ = ["default_data_dir", "wikitext_file", "read_text", "calibration_dataset"]


def default_data_dir() -> Path | None:
    """$CREPE_DATA_DIR, else ../shared/data beside the checkout or the working directory."""
    env = os.environ.get("CREPE_DATA_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[1]
    for cand in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        if (cand / "wikitext2").is_dir():
            return cand
    return None


def wikitext_file(name: str) -> Path | None:
    d = default_data_dir()
    if d is None:
        return None
    p = d / "wikitext2" / name
    return p if p.is_file() else None


def read_text(source: str, split: str = "test", text_column: str = "text") -> str:
    """The text of a file, a local dataset directory, or a hub dataset ('name[:config]').

    Dataset rows are joined with blank lines, as the WikiText perplexity protocol does.
    """
    p = Path(source)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    ds = _load_dataset(source, split)
    if text_column not in ds.column_names:
        raise ValueError(f"dataset {source!r} has no column {text_column!r} (columns: {ds.column_names})")
    return "\n\n".join(ds[text_column])


def _load_dataset(source: str, split: str):
    import datasets

    p = Path(source)
    if p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception:
            ds = datasets.load_dataset(str(p), split=split)
    else:
        name, _, config = source.partition(":")
        ds = datasets.load_dataset(name, config or None, split=split)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split] if split in ds else ds[next(iter(ds))]
    return ds


def calibration_dataset(source: str, tokenizer, num_samples: int, seqlen: int, seed: int = 0):
    """A datasets.Dataset of ``num_samples`` token windows of length ``seqlen``.

    As SparseGPT/Wanda/RIA sample calibration data: tokenize the text once and take
    windows at seeded random offsets. Hub or local datasets are read through their
    'text' column (train split).
    """
    from datasets import Dataset

    if not Path(source).is_file():
        text = read_text(source, split="train")
    else:
        text = Path(source).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"calibration source {source!r} is empty")
    ids = tokenizer(text, return_tensors=None, add_special_tokens=False)["input_ids"]
    if len(ids) <= seqlen:
        raise ValueError(
            f"calibration source {source!r} has {len(ids)} tokens, fewer than --seqlen {seqlen}; "
            "give more text or a shorter --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(num_samples)]
    rows = [ids[s : s + seqlen] for s in starts]
    logger.info(f"calibration: {num_samples} x {seqlen} tokens from {source} ({len(ids)} tokens)")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seqlen for _ in rows]})
