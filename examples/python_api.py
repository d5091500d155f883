"""The framework-free core: CRePE scores and N:M masks on one weight matrix."""

import torch

from crepe_plugin import CRePEConfig, crepe_scores, is_nm, prune_mask

if __name__ == "__main__":
    torch.manual_seed(0)
    weight = torch.randn(256, 512)  # (out, in), as torch.nn.Linear stores it
    input_sq_norm = torch.rand(512) * 10  # mean over samples of ||X_j||^2 (Wanda's scaler_row)

    ria = prune_mask(crepe_scores(weight, input_sq_norm, CRePEConfig()), structure="2:4")
    cfg = CRePEConfig(row_coef=0.9, col_coef=1.1, neighbor_coef=0.1, kernel_size=3, kernel="gaussian")
    crepe = prune_mask(crepe_scores(weight, input_sq_norm, cfg), structure="2:4")

    pruned = weight.masked_fill(crepe, 0)
    print("exact 2:4:", is_nm(pruned, 2, 4), "| masks differing from RIA:", int((ria != crepe).sum()))
