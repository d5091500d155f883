"""Saving a pruned model: the record survives llm-compressor's save, and names what was saved.

- ``keep_record_on_save``: llm-compressor's ``save_pretrained`` wrapper rewrites config.json from
  the original model's config (``resave_config``), dropping attributes set on ``model.config``;
  we wrap the wrapper once more and write the record back after it has finished.
- ``save_pruned``: the save ``crepe prune`` uses. Mixture-of-experts models are calibrated with
  llm-compressor's linearized experts (one Linear per expert and projection); saved as they are,
  some architectures (Mixtral) write keys transformers cannot load back, and reloading silently
  re-initialises every expert. So the experts are repacked into the architecture's fused module
  first (llm-compressor's ``repack_moe``) and transformers writes its own checkpoint layout. Where
  transformers renames on save (fused experts, LLaVA's ``language_model.model.*`` keys), the
  record's module names are mapped to the saved tensors by content (``rename_by_content``).
"""

from __future__ import annotations

import json
from functools import wraps
from pathlib import Path

import torch

from ..core.files import atomic_write
from .record import RECORD_KEY

__all__ = ["keep_record_on_save", "write_record", "save_pruned", "weight_fingerprint", "rename_by_content"]


def write_record(save_dir: str | Path, record: dict) -> None:
    """Atomically add the record to ``save_dir/config.json``."""
    path = Path(save_dir) / "config.json"
    with open(path) as f:
        data = json.load(f)
    data[RECORD_KEY] = record
    atomic_write(path, json.dumps(data, indent=2) + "\n")


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


def weight_fingerprint(w: torch.Tensor) -> tuple:
    """(shape, sum, ramp-weighted sum) in float64: tells apart the tensors of one checkpoint."""
    x = w.detach().reshape(-1).to(torch.float64)
    ramp = torch.arange(x.numel(), dtype=torch.float64) % 1009 + 1
    return tuple(w.shape), float(x.sum()), float((x * ramp).sum())


def _same(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and all(abs(x - y) <= 1e-9 * max(1.0, abs(x)) for x, y in zip(a[1:], b[1:]))


def rename_by_content(save_dir: str | Path, fingerprints: dict[str, tuple]) -> dict[str, str]:
    """Map each recorded module whose ``NAME.weight`` the saved checkpoint lacks to the saved
    tensor with the same content, rewrite the record with the saved names, and return the map.
    Modules left unmatched stay as they are (``crepe verify`` then names them)."""
    from safetensors import safe_open

    from .record import read_record

    save_dir = Path(save_dir)
    files = sorted(save_dir.glob("*.safetensors"))
    keys = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            keys.update({k: f for k in fh.keys() if k.endswith(".weight")})
    saved = {k[: -len(".weight")] for k in keys}
    missing = {n: fp for n, fp in fingerprints.items() if n not in saved}
    if not missing:
        return {}
    shapes = {fp[0] for fp in missing.values()}
    free = sorted(k for k in keys if k[: -len(".weight")] not in fingerprints)
    found: dict[str, str] = {}
    for k in free:
        with safe_open(str(keys[k]), "pt") as fh:
            if tuple(fh.get_slice(k).get_shape()) not in shapes:
                continue
            fp = weight_fingerprint(fh.get_tensor(k))
        name = next((n for n, want in missing.items() if n not in found and _same(fp, want)), None)
        if name is not None:
            found[name] = k[: -len(".weight")]
    record = read_record(save_dir)
    record["modules"] = dict(sorted((found.get(n, n), m) for n, m in record["modules"].items()))
    write_record(save_dir, record)
    return found


def save_pruned(model: torch.nn.Module, processor, out: str | Path, save_compressed: bool = True) -> dict[str, str]:
    """Save a model after oneshot (see the module docstring); returns the renamed modules."""
    from ..compat.compressed_tensors import align_module_device
    from ..compat.llmcompressor import repack_experts

    record = getattr(getattr(model, "config", None), RECORD_KEY, None) or {}
    # taken before anything changes the model: repacking replaces the experts' modules, and a
    # compressed save may rewrite weights in place; one pass over the recorded weights, float64
    fingerprints = {}
    for name in record.get("modules", {}):
        module = model.get_submodule(name)
        with align_module_device(module):
            fingerprints[name] = weight_fingerprint(module.weight)
    repack_experts(model)
    model.save_pretrained(str(out), save_compressed=save_compressed)
    if processor is not None:
        processor.save_pretrained(str(out))
    # transformers 5 may also rename on save (LLaVA's legacy ``language_model.model.*`` keys)
    return rename_by_content(out, fingerprints) if fingerprints else {}
