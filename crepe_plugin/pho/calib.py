"""Which layers PHO scores, and its statistics pass.

The statistics themselves (``CalibStats``, ``gather_stats``) live in ``crepe_plugin.core.stats``:
one forward pass of the dense model records, for every targeted linear layer, the input
statistic of the scores and, for the layers the proxy samples, the Gram matrix H (shared by
layers that read the same input: q/k/v, gate/up). Trials reuse them (cached in ``STATS_FILE``);
none reruns the model except the 'ppl' baseline, which must.
"""

from __future__ import annotations

import re
from typing import Iterable

import torch
from loguru import logger
from tqdm.auto import tqdm

from ..core.layers import check_name_patterns, decoder_layer
from ..core.stats import CalibStats, gather_stats

__all__ = ["target_modules", "sample_layer_names", "statistics_pass", "STATS_FILE"]

STATS_FILE = "calib_stats.safetensors"


def target_modules(model: torch.nn.Module, ignore: Iterable[str] = ("lm_head",)) -> dict[str, torch.nn.Module]:
    """Every Linear / Conv1D except those matched by an ``ignore`` entry: a name suffix, or
    're:' and a regular expression (as llm-compressor's ignore lists)."""
    ignore = list(ignore)
    check_name_patterns(ignore, "--ignore")

    def matches(entry: str, n: str) -> bool:
        return re.match(entry[3:], n) is not None if entry.startswith("re:") else n.endswith(entry)

    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    unused = [e for e in ignore if not any(matches(e, n) for n in layers)]
    if unused:
        logger.warning(f"--ignore {' '.join(repr(e) for e in unused)} matches no layer of the model; "
                       "check the spelling (a name suffix, or 're:' and a regex matched from the start)")  # fmt: skip
    return {n: m for n, m in layers.items() if not any(matches(e, n) for e in ignore)}


def sample_layer_names(names: Iterable[str], layers: int | str) -> list[str]:
    """Names inside ``layers`` evenly spaced decoder layers (all names for 'all')."""
    names = list(names)
    if layers == "all":
        return names
    idx = {n: layer[1] for n in names if (layer := decoder_layer(n))}
    found = sorted(set(idx.values()))
    if not found:
        return names
    k = min(int(layers), len(found))
    pick = {found[round(i * (len(found) - 1) / max(k - 1, 1))] for i in range(k)}
    return [n for n in names if idx.get(n) in pick]


def statistics_pass(model: torch.nn.Module, batches: Iterable, modules: dict[str, torch.nn.Module],
                    gram_names: Iterable[str] = (), device=None, meta: dict | None = None) -> CalibStats:  # fmt: skip
    """``core.stats.gather_stats`` with a progress bar and a summary line."""
    stats = gather_stats(model, batches, modules, gram_names, device, meta,
                         progress=lambda it: tqdm(it, desc="calibration statistics"))  # fmt: skip
    logger.info(f"statistics: {stats.num_samples} samples, {len(stats.sq_norms)} layers, {len(stats.grams)} Gram "
                f"matrices ({stats.nbytes() / 2**20:.1f} MiB)")  # fmt: skip
    return stats
