"""Keep our N:M record in config.json through llm-compressor's save.

llm-compressor's ``save_pretrained`` wrapper rewrites config.json from the original
model's config (``resave_config``), dropping attributes set on ``model.config``. We wrap
the wrapper once more and write the record back after it has finished.
"""

from __future__ import annotations

import json
import os
from functools import wraps
from pathlib import Path

import torch

from .record import RECORD_KEY

__all__ = ["keep_record_on_save", "write_record"]


def write_record(save_dir: str | Path, record: dict) -> None:
    """Atomically add the record to ``save_dir/config.json``."""
    path = Path(save_dir) / "config.json"
    with open(path) as f:
        data = json.load(f)
    data[RECORD_KEY] = record
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def keep_record_on_save(model: torch.nn.Module) -> None:
    """Idempotently wrap ``model.save_pretrained`` to append ``model.config.crepe_sparsity``."""
    inner = getattr(model, "save_pretrained", None)
    if inner is None or getattr(inner, "_crepe_record", False):
        return

    @wraps(inner)
    def save_pretrained(save_directory, *args, **kwargs):
        out = inner(save_directory, *args, **kwargs)
        record = getattr(model.config, RECORD_KEY, None)
        if record:
            write_record(save_directory, record)
        return out

    from ..compat.llmcompressor import mark_save_wrapped

    save_pretrained._crepe_record = True
    mark_save_wrapped(save_pretrained)  # llm-compressor: do not wrap again
    model.save_pretrained = save_pretrained
