"""Calibration statistics for PHO, gathered once per search and cached.

One forward pass of the dense model over the calibration batches records, for every
targeted linear layer, the input statistic of the scores (mean over samples of
||X_j||^2) and, for the layers the proxy samples, the input Gram matrix H (shared by
layers that read the same input: q/k/v, gate/up). Trials reuse them; none reruns the
model except the 'ppl' baseline, which must.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import torch
from loguru import logger
from tqdm.auto import tqdm

from ..core import HessianStats, InputNormStats, weight_out_in
from ..core.errors import CalibrationError

__all__ = ["CalibStats", "target_modules", "sample_layer_names", "gather_stats", "STATS_FILE"]

STATS_FILE = "calib_stats.safetensors"
_LAYER_IDX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def target_modules(model: torch.nn.Module, ignore: Iterable[str] = ("lm_head",)) -> dict[str, torch.nn.Module]:
    """Every Linear / Conv1D except those matched by an ``ignore`` entry: a name suffix, or
    're:' and a regular expression (as llm-compressor's ignore lists)."""
    suffixes = tuple(i for i in ignore if not i.startswith("re:"))
    patterns = [re.compile(i[3:]) for i in ignore if i.startswith("re:")]

    def ignored(n: str) -> bool:
        return (bool(suffixes) and n.endswith(suffixes)) or any(p.match(n) for p in patterns)

    return {
        n: m
        for n, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and not ignored(n)
    }


def sample_layer_names(names: Iterable[str], layers: int | str) -> list[str]:
    """Names inside ``layers`` evenly spaced decoder layers (all names for 'all')."""
    names = list(names)
    if layers == "all":
        return names
    idx = {n: int(m.group(1)) for n in names if (m := _LAYER_IDX.search(n))}
    found = sorted(set(idx.values()))
    if not found:
        return names
    k = min(int(layers), len(found))
    pick = {found[round(i * (len(found) - 1) / max(k - 1, 1))] for i in range(k)}
    return [n for n in names if idx.get(n) in pick]


class CalibStats:
    """Input statistics per layer name; Gram matrices for the sampled layers."""

    def __init__(self, sq_norms: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], gram_of: dict[str, str], num_samples: int, meta: dict | None = None):
        self.sq_norms = sq_norms
        self.grams = grams
        self.gram_of = gram_of
        self.num_samples = num_samples
        self.meta = meta or {}

    def H(self, name: str) -> torch.Tensor | None:
        key = self.gram_of.get(name)
        return None if key is None else self.grams[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.sq_norms.values(), *self.grams.values()))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"norm/{k}": v.contiguous() for k, v in self.sq_norms.items()}
        tensors.update({f"gram/{k}": v.contiguous() for k, v in self.grams.items()})
        meta = {"gram_of": json.dumps(self.gram_of), "num_samples": str(self.num_samples), "meta": json.dumps(self.meta)}
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(path)  # never a half-written cache

    @classmethod
    def load(cls, path: str | Path) -> "CalibStats":
        from safetensors import safe_open

        norms, grams = {}, {}
        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
                for k in f.keys():
                    kind, _, name = k.partition("/")
                    (norms if kind == "norm" else grams)[name] = f.get_tensor(k)
            return cls(norms, grams, json.loads(md["gram_of"]), int(md["num_samples"]), json.loads(md.get("meta", "{}")))
        except Exception as e:  # corrupt or foreign file: say which
            raise CalibrationError(f"cannot read the PHO statistics cache {path}: {e}; delete it to recompute") from e


@torch.no_grad()
def gather_stats(
    model: torch.nn.Module,
    batches: Iterable[dict | torch.Tensor],
    modules: dict[str, torch.nn.Module],
    gram_names: Iterable[str] = (),
    device: torch.device | str | None = None,
    meta: dict | None = None,
) -> CalibStats:
    """Run the dense model over ``batches`` once and collect the statistics."""
    want_gram = set(gram_names)
    norms: dict[str, InputNormStats] = {}
    grams: dict[str, HessianStats] = {}
    gram_of: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # first batch: (input tensor, first layer that read it)
    hooks = []

    def hook(name):
        def fn(module, args, _out):
            x = args[0]
            if name not in norms:
                norms[name] = InputNormStats(weight_out_in(module).shape[1], device=x.device)
            norms[name].update(x)
            if name in want_gram:
                if name not in gram_of:  # first batch: layers reading the very same tensor share H
                    # (held in `seen`, so its memory cannot be reused by another tensor meanwhile)
                    gram_of[name] = next((o for t, o in seen if t is x), name)
                    if gram_of[name] == name:
                        seen.append((x, name))
                owner = gram_of[name]
                if owner == name:
                    if owner not in grams:
                        grams[owner] = HessianStats(weight_out_in(module).shape[1], device=x.device)
                    grams[owner].update(x)

        return fn

    for name, mod in modules.items():
        hooks.append(mod.register_forward_hook(hook(name)))
    n = 0
    try:
        model.eval()
        for batch in tqdm(list(batches), desc="PHO calibration statistics"):
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            if device is not None:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model(**batch)
            n += int(batch["input_ids"].shape[0]) if batch["input_ids"].dim() > 1 else 1
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    missing = [k for k in modules if k not in norms]
    if n == 0:
        raise CalibrationError("PHO: the calibration data is empty")
    if missing:
        raise CalibrationError(f"PHO: layer '{missing[0]}' (and {len(missing) - 1} more) received no calibration data")
    stats = CalibStats(
        {k: v.value(k) for k, v in norms.items()},
        {k: v.H for k, v in grams.items()},
        gram_of,
        n,
        meta,
    )
    logger.info(
        f"PHO statistics: {n} samples, {len(norms)} layers, {len(grams)} Gram matrices "
        f"({stats.nbytes() / 2**20:.1f} MiB)"
    )
    return stats
