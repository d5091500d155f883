"""Calibration and evaluation text: local files, local datasets, or hub dataset names."""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

__all__ = [
    "default_data_dir",
    "second_domain",
    "wikitext_file",
    "read_text",
    "calibration_dataset",
    "split_source",
    "Protocol",
    "protocol",
    "refuse_test_text",
    "TestTextError",
    "TextSourceError",
    "CALIB_FRACTION",
]

CALIB_FRACTION = 0.75
"""The default protocol cuts WikiText-2 valid here: calibration windows come from the text
before this fraction, validation perplexity from the text after it. The test text is only
for reporting."""

_SLICE = re.compile(r"^(?P<src>.+)\[(?P<lo>[^\[\]:]*):(?P<hi>[^\[\]:]*)\]$")


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


def split_source(source: str) -> tuple[str, float, float]:
    """'FILE[lo:hi]' -> (FILE, lo, hi) with fractions of the text; plain sources -> (source, 0, 1)."""
    m = _SLICE.match(str(source))
    if not m:
        return str(source), 0.0, 1.0
    try:
        lo = float(m.group("lo")) if m.group("lo") else 0.0
        hi = float(m.group("hi")) if m.group("hi") else 1.0
    except ValueError:
        raise TextSourceError(f"text source {source!r}: the slice must be [lo:hi] with fractions in [0, 1]") from None
    if not (0.0 <= lo < hi <= 1.0):
        raise TextSourceError(f"text source {source!r}: the slice must be [lo:hi] with 0 <= lo < hi <= 1")
    return m.group("src"), lo, hi


_NEAR, _NEAR_CHARS = 0.01, 256  # a cut moves at most 1% of the text (or 256 characters) to a line start


def _cut(text: str, frac: float, source: str = "") -> int:
    """Character offset of ``frac`` of the text, moved forward to the next line start, or, where
    none lies within 1% of the text (a file of few or very long lines), to the next whitespace.
    TextSourceError when neither is near: the text cannot be cut there (one long word)."""
    if frac <= 0.0:
        return 0
    if frac >= 1.0:
        return len(text)
    i = int(len(text) * frac)
    near = i + max(int(len(text) * _NEAR), _NEAR_CHARS)
    j = text.find("\n", i, near)
    if j >= 0:
        return j + 1
    ws = re.compile(r"\s").search(text, i, near)
    if ws is None:
        raise TextSourceError(
            f"text source {source!r}: no line break or whitespace near {frac:g} of the text; it has too few lines "
            "and words to slice there"
        )
    return ws.end()


def read_text(source: str, split: str = "test", text_column: str = "text") -> str:
    """The text of a file, a local dataset directory, or a hub dataset ('name[:config]').

    A trailing ``[lo:hi]`` keeps that fraction of the text, cut at line starts:
    ``wiki.valid.tokens.txt[:0.75]`` and ``wiki.valid.tokens.txt[0.75:]`` are disjoint and
    together give the whole file. Dataset rows are joined with blank lines, as the WikiText
    perplexity protocol does.
    """
    src, lo, hi = split_source(source)
    p = Path(src)
    if p.is_file():
        text = _read_file(p, text_column)
    else:
        ds = _load_dataset(src, split)
        if text_column not in ds.column_names:
            raise TextSourceError(f"dataset {src!r} has no column {text_column!r} (columns: {ds.column_names})")
        text = "\n\n".join(ds[text_column])
    if (lo, hi) != (0.0, 1.0):
        text = text[_cut(text, lo, source) : _cut(text, hi, source)]
    return text


_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


def _read_file(p: Path, text_column: str = "text") -> str:
    """A UTF-8 text file as it is; JSON Lines (or a JSON list of records) through each record's
    ``text_column``, joined with blank lines as dataset rows are. Anything else (binary, another
    encoding, Parquet, a checkpoint) is refused in one line naming the file."""
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextSourceError(
            f"text source {str(p)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "give a UTF-8 text file (convert one in another encoding, e.g. iconv -f latin1 -t utf-8), a .jsonl "
            "with a 'text' field, or a dataset"
        ) from None
    if "\x00" in text:
        raise TextSourceError(f"text source {str(p)!r} is a binary file (it holds NUL bytes), not text")
    if p.suffix.lower() in _JSON_SUFFIXES:
        return "\n\n".join(_json_records(p, text, text_column))
    return text


def _json_records(p: Path, text: str, column: str) -> list[str]:
    """The ``column`` strings of a JSON Lines file, or of a JSON file holding a list of records."""
    import json

    try:
        if p.suffix.lower() != ".json":
            raise ValueError("JSON Lines")
        whole = json.loads(text)
        records, where = (whole if isinstance(whole, list) else [whole]), lambda i: f"record {i}"
    except ValueError:
        records, lines = [], [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for n, line in lines:
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise TextSourceError(f"text source {str(p)!r}: line {n} is not JSON ({e.msg}); "
                                      "a .jsonl file holds one JSON object per line") from None  # fmt: skip
        where = lambda i: f"line {lines[i][0]}"  # noqa: E731
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or not isinstance(r.get(column), str):
            raise TextSourceError(f"text source {str(p)!r}: {where(i)} has no string field {column!r}; "
                                  f"each JSON record must carry its text in {column!r}")  # fmt: skip
        out.append(r[column])
    return out


@dataclass(frozen=True)
class Protocol:
    """The three texts of an honest measurement, never mixed."""

    calib: str  # calibration windows
    validation: str  # every choice: search validation, kernel/border, defaults, recipe settings
    test: str  # reporting only
    description: str


def protocol(data_dir: str | Path | None = None) -> Protocol | None:
    """WikiText-2 split as the project measures: calibration = valid[:0.75], validation =
    valid[0.75:], test = test. None when the files are not found."""
    d = Path(data_dir) if data_dir else default_data_dir()
    if d is None:
        return None
    valid, test = d / "wikitext2" / "wiki.valid.tokens.txt", d / "wikitext2" / "wiki.test.raw.txt"
    if not (valid.is_file() and test.is_file()):
        return None
    f = CALIB_FRACTION
    return Protocol(
        calib=f"{valid}[:{f}]",
        validation=f"{valid}[{f}:]",
        test=str(test),
        description=(
            f"WikiText-2 from {d / 'wikitext2'}: calibration = first {f:.0%} of valid, "
            f"validation = last {1 - f:.0%} of valid, test = test (reporting only)"
        ),
    )


SECOND_DOMAIN = "jargon-4.4.7.txt"


def second_domain() -> Path | None:
    """The second validation domain: the Jargon File 4.4.7 (public domain, Debian's `jargon-text`),
    built by ``scripts/build_second_domain.py`` into the cache (``$CREPE_CACHE/data``); None until
    it is built. Validation only, like WikiText's valid tail; calibration stays WikiText."""
    from .models import cache_dir

    p = cache_dir() / "data" / SECOND_DOMAIN
    return p if p.is_file() else None


class TextSourceError(ValueError):
    """A text source is unusable: empty, too short, a bad slice, a missing column."""


class TestTextError(ValueError):
    """A tuning command was pointed at the test text."""

    __test__ = False  # not a pytest class


def refuse_test_text(source: str, what: str, allow: bool = False) -> None:
    """Tuning on the test text makes every reported number worthless: refuse it.

    A source counts as test text when its file name (or hub split) says 'test'. ``allow``
    turns the refusal into a loud warning, for a deliberate, labelled report.
    """
    src, _, _ = split_source(source)
    name = Path(src).name.lower()
    if "test" not in re.split(r"[^a-z0-9]+", name) and not name.startswith("test"):
        return
    msg = (
        f"{what} {source!r} looks like the test text; choices must be made on validation text "
        "(e.g. wiki.valid.tokens.txt[0.75:]) and the test text used only for reporting"
    )
    if not allow:
        raise TestTextError(msg + "; pass --allow-test-text to do it anyway")
    logger.warning("TUNING ON TEST TEXT: " + msg)


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".md", ".raw", ".tokens", ".arrow")


_DATA_FILES = (".txt", ".json", ".jsonl", ".csv", ".parquet", ".arrow", ".tsv")


def hub_offline() -> bool:
    """The Hugging Face hub is off for this process (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_dataset(source: str, split: str):
    """A local dataset folder (``save_to_disk``, or data files datasets reads) or a hub dataset;
    TextSourceError in one line for anything else, a hub name not found locally included."""
    import datasets

    p = Path(source)
    if not p.exists() and (not _HUB_NAME.match(source) or source.lower().endswith(_FILE_SUFFIXES)):
        raise FileNotFoundError(
            f"text source {source!r}: no such file or directory (hub datasets are named 'owner/name' or 'name:config')"
        )
    if p.is_dir() and (p / "config.json").is_file():
        raise TextSourceError(f"text source {source!r} is a model folder (it holds config.json), not text or a dataset")
    if p.is_dir() and not (p / "dataset_info.json").is_file() and not (p / "dataset_dict.json").is_file() and not any(
            f.suffix.lower() in _DATA_FILES for f in p.rglob("*") if f.is_file()):  # fmt: skip
        raise TextSourceError(f"text source {source!r} is a folder with no dataset in it (no save_to_disk files, "
                              f"no {'/'.join(_DATA_FILES)} data files)")  # fmt: skip
    try:
        if p.is_dir():
            try:
                ds = datasets.load_from_disk(str(p))
            except FileNotFoundError:
                ds = datasets.load_dataset(str(p), split=split)
        else:
            name, _, config = source.partition(":")
            ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds; the user gets one line
        why = " ".join(str(e).split())[:200] or type(e).__name__
        if not p.exists():
            where = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else "it could not be fetched from the hub"
            raise TextSourceError(f"dataset {source!r} was not found locally and {where}: {why}") from None
        raise TextSourceError(f"text source {source!r}: datasets cannot read it ({why})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[split] if split in ds else ds[next(iter(ds))]
    return ds


def calibration_dataset(source: str, tokenizer, num_samples: int, seqlen: int, seed: int = 0,
                        max_positions: int | None = None):  # fmt: skip
    """A datasets.Dataset of ``num_samples`` token windows of length ``seqlen``.

    Warns (the one place that does) when ``seqlen`` is beyond the model's ``max_positions``
    (its config's ``max_position_embeddings``) or the tokenizer's ``model_max_length``.

    As SparseGPT/Wanda/RIA sample calibration data: tokenize the text once and take
    windows at seeded random offsets. Hub or local datasets are read through their
    'text' column (train split).
    """
    from datasets import Dataset

    text = read_text(source, split="train")
    if not text.strip():
        raise TextSourceError(f"calibration source {source!r} is empty")
    ids = tokenizer(text, return_tensors=None, add_special_tokens=False)["input_ids"]
    if len(ids) <= seqlen:
        raise TextSourceError(
            f"calibration source {source!r} has {len(ids)} tokens, fewer than --seqlen {seqlen}; "
            "give more text or a shorter --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(num_samples)]
    distinct = len(ids) // seqlen
    if distinct < num_samples:
        logger.warning(
            f"calibration source {source!r} holds {len(ids)} tokens: only about {distinct} non-overlapping windows "
            f"of {seqlen} for the {num_samples} requested; windows will overlap"
        )
    limits = {"the model's max_position_embeddings": max_positions,
              "the tokenizer's model_max_length": getattr(tokenizer, "model_max_length", None)}  # fmt: skip
    over = [f"{what} {n}" for what, n in limits.items() if isinstance(n, int) and 0 < n < seqlen]
    if over:
        logger.warning(f"--seqlen {seqlen} is beyond {' and '.join(over)}; calibration windows that long "
                       "may not reflect how the model runs")  # fmt: skip
    rows = [ids[s : s + seqlen] for s in starts]
    logger.info(f"calibration: {num_samples} x {seqlen} tokens from {source} ({len(ids)} tokens)")
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seqlen for _ in rows]})


def image_text_dataset(source: str, processor, num_samples: int, seed: int = 0):
    """Image+text calibration for a vision-language model, or None when ``source`` is not a
    dataset carrying images (then calibrate on text: ``calibration_dataset``).

    ``source``: a local dataset (``save_to_disk`` folder or data files) or a hub dataset with an
    ``image`` column and, optionally, a ``text`` column. Each calibration sample is the
    processor's output for the image token followed by the text, and the image (its
    ``input_ids``, ``attention_mask``, ``pixel_values``...), as llm-compressor's multimodal
    examples feed ``oneshot``; ``collate_one`` batches it."""
    from datasets import Dataset

    p = Path(split_source(source)[0])
    if p.is_file() and p.suffix in (".txt", ".raw", ".tokens", ".md"):
        return None
    try:
        ds = _load_dataset(source, "train")
    except (FileNotFoundError, ValueError):
        return None
    if "image" not in getattr(ds, "column_names", []):
        return None
    image_token = getattr(processor, "image_token", None) or "<image>"
    order = random.Random(seed).sample(range(len(ds)), min(num_samples, len(ds)))
    if len(order) < num_samples:
        logger.warning(f"calibration source {source!r} holds {len(ds)} images, fewer than the {num_samples} requested")
    rows = []
    for i in order:
        row = ds[i]
        out = processor(text=image_token + (row.get("text") or ""), images=row["image"], return_tensors="pt")
        rows.append({k: v[0].tolist() for k, v in out.items()})
    logger.info(f"calibration: {len(rows)} image+text samples from {source}")
    return Dataset.from_list(rows)


def collate_one(batch: list[dict]) -> dict:
    """One image+text sample as model inputs (batch size 1: samples differ in length)."""
    import torch

    return {k: torch.tensor([v], dtype=torch.float32 if k == "pixel_values" else None) for k, v in batch[0].items()}
