"""DSnoT-style training-free mask refinement (Zhang et al., ICLR 2024). Pure torch.

Our restatement (docs/method.md, "DSnoT"): for each output row i the expected output
lost to pruning is eps_i = sum over pruned j of W_ij * mu_j (mu = mean input). Each
cycle, every row still improving swaps one pair, all rows at once:

- grow the pruned weight whose expected contribution W_ij * mu_j has the sign of eps_i
  and the largest size relative to var_j ** pow_of_var_regrowing (it cancels the most
  error, preferring steady inputs);
- prune, in the same M-group (N:M) or anywhere in the row (unstructured), the kept
  weight of least Wanda importance |W_ik| * ||X_k|| among those whose removal leaves
  |eps_i| smaller than before the swap.

A row stops when no such pair exists or once |eps_i| is at most ``update_threshold``
times its starting value; all stop after ``max_cycles``. The number pruned per row
(and per M-group) never changes, so an N:M mask stays N:M.
"""

from __future__ import annotations

import torch

from .errors import PruningError, _where
from .masks import check_nm_width

__all__ = ["dsnot_refine", "expected_error"]


def expected_error(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Per-row expected output lost: sum over pruned j of W_ij * mu_j."""
    return (weight.float() * mean.float().reshape(1, -1)).masked_fill(~mask, 0).sum(1)


@torch.no_grad()
def dsnot_refine(
    weight: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    input_sq_norm: torch.Tensor,
    n: int = 0,
    m: int = 0,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    pow_of_var_regrowing: float = 1.0,
    layer_name: str | None = None,
) -> torch.Tensor:
    """Refined mask (True = pruned) for the dense ``weight`` (out, in)."""
    if mask.shape != weight.shape:
        raise PruningError(f"{_where(layer_name)}: mask {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    rows, cols = weight.shape
    check_nm_width(cols, m, layer_name, "DSnoT refines N:M masks within M-groups", n=n)
    w = weight.float()
    mask = mask.clone()
    C = w * mean.float().reshape(1, -1)
    imp = w.abs() * input_sq_norm.float().sqrt().reshape(1, -1)
    vpow = var.float().clamp_min(1e-12).pow(pow_of_var_regrowing).reshape(1, -1)
    eps = C.masked_fill(~mask, 0).sum(1)
    eps0 = eps.abs()
    active = eps0 > 0
    r_idx = torch.arange(rows, device=w.device)
    ar = torch.arange(m, device=w.device) if n else None
    inf = torch.tensor(float("inf"), device=w.device)
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        s = torch.sign(eps).reshape(-1, 1)
        gain = C * s
        G = torch.where(mask & (gain > 0), gain / vpow, -inf)
        gmax, j = G.max(dim=1)
        eps_g = eps - C[r_idx, j]
        if n:
            idx = (j // m * m).reshape(-1, 1) + ar
            cC, ckeep, cI = C.gather(1, idx), ~mask.gather(1, idx), imp.gather(1, idx)
        else:
            idx, cC, ckeep, cI = None, C, ~mask, imp
        ok = ckeep & ((eps_g.reshape(-1, 1) + cC).abs() < eps.abs().reshape(-1, 1))
        P = torch.where(ok, cI, inf)
        pmin, k = P.min(dim=1)
        do = active & torch.isfinite(gmax) & torch.isfinite(pmin)
        if not bool(do.any()):
            break
        kk = idx.gather(1, k.reshape(-1, 1)).squeeze(1) if n else k
        r = r_idx[do]
        mask[r, j[do]] = False
        mask[r, kk[do]] = True
        eps = torch.where(do, eps_g + C[r_idx, kk], eps)
        active = do & (eps.abs() > update_threshold * eps0)
    return mask
