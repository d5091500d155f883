"""Which layers PHO scores (those the pruner prunes), and its statistics pass.

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
from ..compat.compressed_tensors import is_match
from ..selection import DEFAULT_IGNORE, PRUNABLE, select_layers

__all__ = ["target_modules", "sample_layer_names", "statistics_pass", "STATS_FILE"]

STATS_FILE = "calib_stats.safetensors"


def target_modules(model: torch.nn.Module, ignore: Iterable[str] = DEFAULT_IGNORE) -> dict[str, torch.nn.Module]:
    """The layers the pruner prunes with its default ``targets`` and this ``ignore`` list
    (``crepe_plugin.selection``, the one layer predicate), in model order. A bad 're:' entry is
    one error; an entry that matches no layer of the model warns."""
    ignore = list(ignore)
    check_name_patterns(ignore, "--ignore")
    layers = select_layers(model, PRUNABLE, ())
    unused = [e for e in ignore if e not in DEFAULT_IGNORE and not any(is_match(n, m, [e]) for n, m in layers.items())]
    if unused:  # named as the user wrote them (crepe search turns a name suffix S into 're:.*S$')
        shown = [re.sub(r"\\(.)", r"\1", m.group(1)) if (m := re.fullmatch(r"re:\.\*(.*)\$", e)) else e for e in unused]
        logger.warning(f"--ignore {' '.join(repr(e) for e in shown)} matches no layer of the model; "
                       "check the spelling (a layer name, a class name, or 're:' and a regex matched from the start)")  # fmt: skip
    return select_layers(model, PRUNABLE, ignore)


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
