"""Input-channel permutations that keep more importance under an N:M mask. Pure torch
(scipy's linear_sum_assignment for the Hungarian step, imported when used).

A permutation ``perm`` lists, for each new column position, the old column it takes:
``W[:, perm]``. N:M groups are consecutive in the new order. Two steps, as RIA:

1. ``reallocate``: sort channels by total importance and deal them to the groups in a
   snake order, so each group gets a balanced share of strong and weak channels;
2. ``hungarian_refine``: for each position p inside the M-group, re-assign the channels
   at position p to the groups (the other M-1 members fixed) by a linear assignment that
   maximises the kept importance; blockwise (``block_groups`` groups per assignment) so
   large layers stay cheap.
"""

from __future__ import annotations

import torch

from .errors import LayerShapeError, _where
from .masks import check_nm_width

__all__ = ["kept_importance", "reallocate", "hungarian_refine", "find_permutation", "stacked_head_scores"]


def _check(scores: torch.Tensor, m: int, layer_name: str | None) -> None:
    if scores.dim() != 2:
        raise LayerShapeError(f"{_where(layer_name)}: expected 2-D scores, got {tuple(scores.shape)}")
    check_nm_width(scores.shape[1], m, layer_name, "it cannot be permuted for N:M")


def kept_importance(scores: torch.Tensor, n: int, m: int) -> float:
    """Total score kept by the N:M mask in the stored column order."""
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // m, m)
    return float(g.topk(m - n, dim=-1).values.sum(dtype=torch.float64))


def reallocate(scores: torch.Tensor, m: int, layer_name: str | None = None) -> torch.Tensor:
    """Snake-order dealing of channels sorted by their total score."""
    _check(scores, m, layer_name)
    cols = scores.shape[1]
    G = cols // m
    order = torch.argsort(scores.sum(dim=0, dtype=torch.float64), descending=True)
    r = torch.arange(cols, device=scores.device)
    rnd, pos = r // G, r % G
    group = torch.where(rnd % 2 == 0, pos, G - 1 - pos)
    perm = torch.empty(cols, dtype=torch.long, device=scores.device)
    perm[group * m + rnd] = order
    return perm


def hungarian_refine(
    scores: torch.Tensor,
    perm: torch.Tensor,
    n: int,
    m: int,
    block_groups: int = 128,
    rounds: int = 1,
    chunk: int = 32,
    layer_name: str | None = None,
) -> torch.Tensor:
    """Improve ``perm`` one in-group position at a time by linear assignment."""
    from scipy.optimize import linear_sum_assignment

    _check(scores, m, layer_name)
    rows, cols = scores.shape
    G = cols // m
    perm = perm.clone()
    k = m - n
    for _ in range(rounds):
        for p in range(m):
            lay = perm.view(G, m)
            for g0 in range(0, G, block_groups):
                g1 = min(g0 + block_groups, G)
                B = g1 - g0
                blk = lay[g0:g1]  # (B, m) old column ids
                others = torch.cat([blk[:, :p], blk[:, p + 1 :]], dim=1)  # (B, m-1)
                O = scores[:, others.reshape(-1)].reshape(rows, B, m - 1)
                cand = scores[:, blk[:, p]]  # (rows, B): candidate c is column c
                gain = torch.empty(B, B, dtype=torch.float64)
                for c0 in range(0, B, chunk):
                    c1 = min(c0 + chunk, B)
                    x = cand[:, c0:c1].t().reshape(c1 - c0, rows, 1, 1).expand(c1 - c0, rows, B, 1)
                    vals = torch.cat([O.unsqueeze(0).expand(c1 - c0, rows, B, m - 1), x], dim=-1)
                    gain[c0:c1] = vals.topk(k, dim=-1).values.sum(dim=(1, 3), dtype=torch.float64).cpu()
                ci, gi = linear_sum_assignment(gain.numpy(), maximize=True)
                new = blk[:, p].clone()
                new[torch.as_tensor(gi)] = blk[torch.as_tensor(ci), p]
                lay[g0:g1, p] = new
    return perm


def find_permutation(
    scores: torch.Tensor, n: int, m: int, hungarian: bool = True, block_groups: int = 128, rounds: int = 1,
    layer_name: str | None = None,
) -> torch.Tensor:  # fmt: skip
    """Reallocation, then Hungarian refinement; falls back to the identity if neither
    keeps more importance than the stored order."""
    ident = torch.arange(scores.shape[1], device=scores.device)
    best, best_val = ident, kept_importance(scores, n, m)
    perm = reallocate(scores, m, layer_name)
    if hungarian:
        perm = hungarian_refine(scores, perm, n, m, block_groups, rounds, layer_name=layer_name)
    val = kept_importance(scores[:, perm], n, m)
    if val > best_val:
        best = perm
    return best


def stacked_head_scores(scores: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """For o_proj under grouped-query attention: one (rows * heads_per_group, head_dim)
    matrix per KV head, stacking the column blocks of the query heads that share it, so
    that one within-head permutation per KV head is searched for all of them."""
    rep = n_heads // n_kv_heads
    out = []
    for kv in range(n_kv_heads):
        blocks = [scores[:, h * head_dim : (h + 1) * head_dim] for h in range(kv * rep, (kv + 1) * rep)]
        out.append(torch.cat(blocks, dim=0))
    return out
