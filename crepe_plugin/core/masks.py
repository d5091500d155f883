"""Pruning masks from scores, and N:M checks. Pure torch.

Masks are boolean tensors, True where a weight is pruned (RIA's convention).
"""

from __future__ import annotations

import re

import torch

from .errors import LayerShapeError, PruningError, _where

__all__ = ["parse_structure", "check_nm_width", "prune_mask", "nm_mask", "unstructured_mask", "nm_violations", "zero_mask_nm_violations", "is_nm"]

_STRUCT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_structure(structure: str) -> tuple[int, int]:
    """'N:M' -> (N, M) with 0 < N < M, or '0:0' / 'unstructured' -> (0, 0)."""
    if structure is None or str(structure).strip().lower() in ("unstructured", "0:0"):
        return 0, 0
    m = _STRUCT.match(str(structure))
    if not m:
        raise PruningError(f"mask structure {structure!r} is not 'N:M' (e.g. '2:4') or '0:0'")
    n, mm = int(m.group(1)), int(m.group(2))
    if not (0 < n < mm):
        raise PruningError(
            f"mask structure {structure!r}: need 0 < N < M (N pruned of every M), or '0:0' for unstructured"
        )
    return n, mm


def check_nm_width(cols: int, m: int, layer_name: str | None = None, remedy: str = "add this layer to `ignore`",
                   n: int | None = None) -> None:  # fmt: skip
    """The one N:M width check: N:M groups need the input dimension to be a multiple of M.
    Raises LayerShapeError naming the layer and what to do (``remedy``). No-op for ``m`` 0
    (unstructured); ``n`` only names the structure in the message."""
    if m and cols % m:
        what = f" for {n}:{m} sparsity" if n else ""
        raise LayerShapeError(f"{_where(layer_name)}: input dimension {cols} is not divisible by M={m}{what}; {remedy}")


def nm_mask(scores: torch.Tensor, n: int, m: int, *, layer_name: str | None = None) -> torch.Tensor:
    """In every row, prune the n lowest scores of each group of m consecutive inputs.

    Ranks are computed with m(m-1)/2 vectorised comparisons into a uint8 buffer (no
    index tensors); on exact ties the lower input index is pruned first.
    """
    rows, cols = scores.shape
    check_nm_width(cols, m, layer_name, n=n)
    if m > 255:
        raise PruningError(f"M={m} is too large (at most 255)")
    planes = scores.reshape(rows, cols // m, m).permute(2, 0, 1)
    rank = torch.zeros((m, rows, cols // m), dtype=torch.uint8, device=scores.device)
    for i in range(m):
        for j in range(i + 1, m):
            j_lower = planes[j] < planes[i]  # on a tie i (lower index) ranks lower
            rank[i].add_(j_lower)
            rank[j].add_(~j_lower)
    return (rank < n).permute(1, 2, 0).reshape(rows, cols)


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Exact k-th smallest (0-based). Large inputs: bracket the answer from a strided
    sample, then select within the bracket (a few linear passes instead of a full select);
    falls back to kthvalue if the bracket misses."""
    n = flat.numel()
    if n <= (1 << 22):
        return torch.kthvalue(flat, k + 1).values
    step = n // (1 << 16)
    sample = torch.sort(flat[::step]).values
    s = sample.numel()
    pos = (k + 0.5) / n * s
    margin = int(8 * s**0.5) + 2
    lo = sample[max(int(pos) - margin, 0)]
    hi = sample[min(int(pos) + margin, s - 1)]
    under = flat < lo
    below = int(torch.count_nonzero(under))
    inside = flat[((flat <= hi) ^ under).nonzero().squeeze(1)]  # lo <= x <= hi
    if below <= k < below + inside.numel():
        return torch.kthvalue(inside, k - below + 1).values
    return torch.kthvalue(flat, k + 1).values


def unstructured_mask(
    scores: torch.Tensor, sparsity: float, scope: str = "matrix", *, layer_name: str | None = None
) -> torch.Tensor:
    """Unstructured mask.

    scope='matrix' (RIA's default): threshold t = the k-th smallest score, k = int(numel *
    sparsity) (0-based), and prune every score <= t. Like RIA's code this prunes k + 1
    weights (plus ties). sparsity == 0 prunes nothing.
    scope='row' (Wanda's): in every row prune the int(in * sparsity) lowest scores
    (stable sort, lowest index first on ties).
    """
    if not 0.0 <= sparsity < 1.0:
        raise PruningError(f"{_where(layer_name)}: sparsity must be in [0, 1), got {sparsity}")
    if sparsity == 0.0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scope == "matrix":
        flat = scores.reshape(-1)
        k = int(flat.numel() * sparsity)
        thresh = _kth_smallest(flat, k)
        return scores <= thresh
    if scope == "row":
        k = int(scores.shape[1] * sparsity)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if k:
            idx = torch.sort(scores, dim=-1, stable=True).indices[:, :k]
            mask.scatter_(1, idx, True)
        return mask
    raise PruningError(f"scope must be 'matrix' or 'row', got {scope!r}")


def prune_mask(
    scores: torch.Tensor,
    sparsity: float = 0.5,
    structure: str = "2:4",
    scope: str = "matrix",
    *,
    layer_name: str | None = None,
) -> torch.Tensor:
    """Boolean mask (True = prune) of the scores' shape.

    structure: 'N:M' for any 0 < N < M (then ``sparsity`` is implied as N/M and ignored),
    or '0:0' for unstructured, where ``scope`` is 'matrix' or 'row'.
    """
    if scores.dim() != 2:
        raise LayerShapeError(f"{_where(layer_name)}: expected 2-D scores, got {tuple(scores.shape)}")
    n, m = parse_structure(structure)
    if n:
        return nm_mask(scores, n, m, layer_name=layer_name)
    return unstructured_mask(scores, sparsity, scope, layer_name=layer_name)


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Number of M-groups (along the last dim) with fewer than n zeros. -1 if not divisible."""
    return zero_mask_nm_violations(weight == 0, n, m)


def zero_mask_nm_violations(zero: torch.Tensor, n: int, m: int) -> int:
    """``nm_violations`` of a boolean mask of the zero weights (True = zero)."""
    z = zero.reshape(-1, zero.shape[-1])
    if z.shape[-1] % m:
        return -1
    return int((z.reshape(z.shape[0], -1, m).sum(-1) < n).sum())


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive inputs of every row has at least n zeros."""
    return nm_violations(weight, n, m) == 0
