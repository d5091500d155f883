"""Verify a saved checkpoint: per-layer N:M structure and density, read from safetensors.

Handles dense weights, FP8 (``float-quantized``), INT8 (``int-quantized``) and packed INT4
(``pack-quantized``) compressed-tensors weights. Needs torch and safetensors only.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..core.config import CRePEConfig
from ..core.masks import parse_structure, zero_mask_nm_violations
from .record import RECORD_KEY, ModuleRecord, Record, parse_record

__all__ = ["LayerReport", "VerifyReport", "CheckpointError", "verify_checkpoint", "read_config", "loaded_files", "open_weights",
           "unpack_int4"]

_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


_OTHER_DTYPES = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"}  # safetensors knows them


class CheckpointError(RuntimeError):
    """The checkpoint is incomplete or corrupt."""


@dataclass
class LayerReport:
    name: str
    fmt: str  # dense | fp8 | int8 | int4-packed
    shape: tuple[int, ...]
    density: float
    nm_ok: bool | None  # None when no N:M is expected or checkable
    recorded: str | None  # structure recorded for this layer, if any
    violations: int = 0


@dataclass
class VerifyReport:
    path: Path
    record: dict | None
    check_structure: tuple[int, int] | None
    config: CRePEConfig | None = None  # the coefficients the record says the layers were pruned with
    layers: list[LayerReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(l.nm_ok is not False for l in self.layers if l.recorded)

    def table(self) -> str:
        n, m = self.check_structure or (0, 0)
        head = f"| layer | format | shape | density | {f'{n}:{m}' if n else 'N:M'} | recorded |"
        lines = [head, "| --- | --- | --- | --- | --- | --- |"]
        for l in self.layers:
            nm = "-" if l.nm_ok is None else ("exact" if l.nm_ok else f"NO ({l.violations} groups)")
            lines.append(
                f"| {l.name} | {l.fmt} | {'x'.join(map(str, l.shape))} | {l.density:.4f} | {nm} | {l.recorded or '-'} |"
            )
        return "\n".join(lines)


def _check_file(path: Path) -> dict:
    """Parse a safetensors header and check the file holds every byte it promises."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path.name}: {size} bytes, too small to be a safetensors file")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path.name}: header length {n} exceeds the file ({size} bytes); truncated?")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path.name}: unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: the header is not a JSON object")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in v["data_offsets"])
            shape = [int(d) for d in v["shape"]]
            dtype = str(v["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {k!r} has a malformed header entry (dtype, shape, data_offsets)") from None
        if dtype not in _DTYPE_BYTES and dtype not in _OTHER_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {k!r} has an unknown dtype {dtype!r} in its header")
        if not (0 <= start <= stop) or any(d < 0 for d in shape):
            raise CheckpointError(f"{path.name}: tensor {k!r} has invalid offsets or shape in its header")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in _DTYPE_BYTES and stop - start != numel * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path.name}: tensor {k} has inconsistent size in its header")
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(
            f"{path.name}: expected {8 + n + end} bytes from its header, found {size}; the file is truncated or corrupt"
        )
    return header


def unpack_int4(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """compressed-tensors pack-quantized: 8 signed 4-bit values per int32 along the input
    dim, stored offset by 8. Returns int8 values of ``shape``."""
    p = packed.to(torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nib = (p.unsqueeze(-1) >> shifts) & 0xF  # (rows, cols/8, 8)
    vals = nib.reshape(p.shape[0], -1)[:, : shape[1]].to(torch.int8) - 8
    return vals.reshape(shape)


def _zero_point(get, name: str, q: torch.Tensor) -> torch.Tensor | None:
    zp = get(f"{name}.weight_zero_point")
    if zp is None:
        return None
    zp = zp.to(torch.int32)
    if zp.numel() == 1:
        return zp.reshape(1, 1)
    if zp.dim() == 2 and zp.shape[1] not in (1, q.shape[1]):  # grouped
        return zp.repeat_interleave(q.shape[1] // zp.shape[1], dim=1)
    return zp.reshape(q.shape[0], -1)


def verify_checkpoint(path: str | Path, structure: str | None = None, require_record: bool = False) -> VerifyReport:
    """Inspect every 2-D weight of a saved checkpoint, in the files a loader reads.

    Layers recorded in config.json's ``crepe_sparsity`` record are checked against their
    recorded structure (N:M; unstructured: the recorded sparsity), must hold finite weights,
    at least the recorded share of zeros and not only zeros, or the report fails. Other layers
    are reported against ``structure`` (default 2:4) for information. ``require_record``: a
    checkpoint without recorded layers fails. Raises CheckpointError when the checkpoint is
    unreadable, incomplete, its record malformed, or its weight files ambiguous (``crepe
    verify`` exits 2).
    """
    path = Path(path)
    config, parsed = read_config(path)
    keys, get = open_weights(path, config)
    modules = parsed.modules if parsed else {}
    report = VerifyReport(path=path, record=config.get(RECORD_KEY), check_structure=parse_structure(structure or "2:4"),
                          config=parsed.score_config if parsed else None)  # fmt: skip
    for name in _weight_names(keys, modules):
        checked = _check_layer(path, get, name, keys, modules.get(name), report.check_structure)
        if checked is not None:
            report.layers.append(checked[0])
            report.errors += checked[1]
    seen = {layer.name for layer in report.layers}
    absent = [name for name in modules if name not in seen]
    if absent:
        raise CheckpointError(
            f"{path}: {len(absent)} layers in the record have no weight in the checkpoint (first: '{absent[0]}')"
        )
    if require_record and not modules:
        report.errors.append(
            f"no {RECORD_KEY} record" + (" modules" if parsed else "") + " in config.json: nothing says which layers are N:M"
        )
    return report


def _json_without_duplicates(path: Path):
    """A JSON file, refusing an object that names a key twice (json keeps the last silently)."""

    def pairs(items):
        seen = set()
        for k, _ in items:
            if k in seen:
                raise CheckpointError(f"{path}: key '{k}' appears twice in one object; a reader keeps only the last")
            seen.add(k)
        return dict(items)

    try:
        return json.loads(path.read_text(), object_pairs_hook=pairs)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({' '.join(str(e).split())[:200]})") from None


def read_config(path: Path) -> tuple[dict, "Record | None"]:
    """(config.json, its parsed record or None); CheckpointError for a directory that is not a
    complete checkpoint, an unreadable config or a malformed record."""
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if (path / ".crepe-incomplete").exists():
        raise CheckpointError(f"{path}: marked incomplete (an interrupted save)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json; not a model directory (or an interrupted save)")
    config = _json_without_duplicates(cfg_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: not a JSON object")
    record = config.get(RECORD_KEY)
    if record is None:
        return config, None
    try:
        return config, parse_record(record)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def _index_map(path: Path, name: str) -> dict[str, str] | None:
    """The weight_map of an index file, or None when there is none."""
    index = path / name
    if not index.is_file():
        return None
    data = _json_without_duplicates(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: malformed shard index (weight_map is not a mapping of tensor names to file names)")
    if any("/" in f or "\\" in f or f.startswith("..") for f in weight_map.values()):
        raise CheckpointError(f"{index}: shard names must be plain file names in the checkpoint directory")
    return weight_map


INDEX = "model.safetensors.index.json"


def _transformers_files(path: Path, config: dict) -> list[str] | None:
    """The safetensors files transformers 5 reads from a local directory: the file named by
    config's ``transformers_weights``, else model.safetensors, else the shards of its index."""
    explicit = config.get("transformers_weights")
    if isinstance(explicit, str):
        if explicit.endswith(".safetensors.index.json"):
            return sorted(set((_index_map(path, explicit) or {}).values()))
        return [explicit]
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    weight_map = _index_map(path, INDEX)
    return None if weight_map is None else sorted(set(weight_map.values()))


def _vllm_files(path: Path, present: list[str]) -> list[str]:
    """The safetensors files vLLM 0.32 reads (``DefaultModelLoader._prepare_weights``, load format
    auto): every consolidated*.safetensors if there is one (Mistral's format), else every
    *.safetensors; kept only if listed in the format's index when there is an index."""
    consolidated = [f for f in present if f.startswith("consolidated")]
    files, index = (consolidated, "consolidated.safetensors.index.json") if consolidated else (present, INDEX)
    weight_map = _index_map(path, index)
    return files if weight_map is None else [f for f in files if f in set(weight_map.values())]


def loaded_files(path: Path, config: dict) -> list[str]:
    """The safetensors files a loader reads, resolved as transformers and vLLM resolve them.

    CheckpointError where they would read different files, where an index lists a missing
    shard, or where a *.safetensors file is read by neither (a stale or foreign file that a
    loader globbing the folder would take for weights)."""
    present = sorted(os.path.basename(f) for f in glob.glob(os.path.join(glob.escape(str(path)), "*.safetensors"))
                     if os.path.isfile(f))  # fmt: skip
    if not present:
        raise CheckpointError(f"{path}: no *.safetensors files")
    hf, vl = _transformers_files(path, config), _vllm_files(path, present)
    missing = [f for f in (hf or []) if f not in present]
    if missing:
        raise CheckpointError(f"{path}: weight files the index (or config's transformers_weights) names are missing: {missing}")
    if hf is None:
        raise CheckpointError(
            f"{path}: no model.safetensors and no {INDEX}: transformers loads nothing, vLLM would read {vl}"
        )
    if set(hf) != set(vl):
        raise CheckpointError(
            f"{path}: transformers reads {hf} but vLLM reads {vl}: the loaders would load different weights; "
            "remove the stale file(s)"
        )
    unread = [f for f in present if f not in hf]
    if unread:
        raise CheckpointError(
            f"{path}: {unread[0]} is read by no loader (they read {hf}); a stale or foreign weight file, remove it"
        )
    return hf


def open_weights(path: Path, config: dict):
    """({tensor name: file} of the files a loader reads, a getter returning a tensor or None).

    CheckpointError for a truncated or corrupt file, a tensor stored in two files (which one a
    loader keeps depends on file order), or an index entry its file does not hold."""
    files = loaded_files(path, config)
    keys: dict[str, str] = {}
    for fname in files:
        for k in _check_file(path / fname):
            if k == "__metadata__":
                continue
            if k in keys:
                raise CheckpointError(
                    f"{path}: tensor '{k}' is stored in both {keys[k]} and {fname}; which one a loader keeps depends "
                    "on file order"
                )
            keys[k] = fname
    for k, f in (_index_map(path, INDEX) or {}).items():
        if keys.get(k) != f:
            raise CheckpointError(f"{path}: {INDEX} places tensor '{k}' in {f}, which does not hold it")
    try:
        handles = {f: safe_open(str(path / f), framework="pt") for f in files}
    except Exception as e:  # noqa: BLE001 - safetensors' own reader refused a file
        raise CheckpointError(f"{path}: cannot open the weights ({' '.join(str(e).split())[:200]})") from None

    def get(k):
        f = keys.get(k)
        return handles[f].get_tensor(k) if f else None

    return keys, get


def _weight_names(keys: dict[str, str], modules: dict) -> list[str]:
    """Every layer with a weight: NAME.weight, packed NAME.weight_packed, or a fused experts
    tensor recorded by its own name."""
    return sorted(
        {k[: -len(".weight")] for k in keys if k.endswith(".weight")}
        | {k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")}
        | {n for n in modules if n in keys}
    )


def _check_layer(path: Path, get, name: str, keys, rec: "ModuleRecord | None", default: tuple[int, int]):
    """(LayerReport, errors against the record) for one layer, or None when it is not a weight."""
    try:
        fmt, zero, w = _zero_mask(get, name, keys)
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable tensor is a broken checkpoint
        raise CheckpointError(f"{path}: layer '{name}': cannot read its weight ({' '.join(str(e).split())[:200]})") from None
    if zero is None:
        return None
    if rec is not None and rec.layout == "in_out":  # transformers' Conv1D stores (in, out): N:M along its first dim
        zero = zero.t()
    want = parse_structure(rec.structure) if rec else default
    viol = zero_mask_nm_violations(zero, *want) if want[0] else None
    nm_ok = None if viol is None else viol == 0
    sparsity = float(zero.float().mean())
    layer = LayerReport(name, fmt, tuple(zero.shape), 1.0 - sparsity, nm_ok, rec.structure if rec else None, max(viol or 0, 0))
    return layer, ([] if rec is None else _record_errors(name, rec, fmt, w, want, viol, sparsity))


def _record_errors(name: str, rec, fmt: str, w: torch.Tensor, want: tuple[int, int], viol, sparsity: float) -> list[str]:
    """What makes a recorded layer differ from its record."""
    errors = []
    if want[0] and viol != 0:
        why = "its input dimension is not divisible by M" if viol == -1 else f"{viol} groups violate it"
        errors.append(f"layer '{name}' is recorded as {rec.structure} but {why}")
    if fmt == "dense" and not bool(torch.isfinite(w).all()):
        errors.append(f"layer '{name}' holds {int((~torch.isfinite(w)).sum())} NaN/Inf weights")
    if sparsity == 1.0:
        errors.append(f"layer '{name}' is recorded as {rec.structure} but every weight is zero")
    elif rec.sparsity is not None:
        # unstructured: the recorded share exactly; N:M: at least it (quantization may round more weights to 0)
        off = abs(sparsity - rec.sparsity) if not want[0] else rec.sparsity - sparsity
        if off > 1e-3:
            errors.append(f"layer '{name}' is recorded with sparsity {rec.sparsity:.4f} but has {sparsity:.4f}")
    return errors


def _zero_mask(get, name: str, keys) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """(format, bool tensor of pruned positions, the stored weight) for a 2-D weight, or a 3-D
    fused experts tensor (experts, out, in) stored under its own name (N:M along ``in``, per
    expert), or (fmt, None, None) to skip."""
    if f"{name}.weight_packed" in keys:
        if f"{name}.weight_shape" not in keys:
            raise CheckpointError(f"layer '{name}': packed INT4 weight without its weight_shape tensor")
        shape = tuple(int(x) for x in get(f"{name}.weight_shape").tolist())
        q = unpack_int4(get(f"{name}.weight_packed"), shape)
        zp = _zero_point(get, name, q)
        return "int4-packed", (q.to(torch.int32) == (zp if zp is not None else 0)), q
    fused = f"{name}.weight" not in keys and name in keys
    w = get(name) if fused else get(f"{name}.weight")
    if w is None or w.dim() != (3 if fused else 2) or "embed" in name:
        return "skip", None, None
    if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return "fp8", w.to(torch.float32) == 0, w
    if w.dtype == torch.int8:
        zp = _zero_point(get, name, w)
        return "int8", w.to(torch.int32) == (zp if zp is not None else 0), w
    if not w.is_floating_point():
        return "skip", None, None
    return "dense", w == 0, w
