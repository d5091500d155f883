"""Layer output error of fixed against adaptive masks, with and without refinement.

Calibration data only (no validation or test text): for the decoder layers whose Gram
matrices a PHO statistics cache holds, prune every linear in several ways and print the
pooled relative output error sum tr(D H D^T) / sum tr(W H W^T), D = W - W_pruned (the
`energy` proxy, after reconstruction). This is what motivated `mask_selection: adaptive`;
the choice itself was made by validation perplexity (docs/method.md).

usage:
  python benchmarks/adaptive_layer_error.py --model smollm2 --stats /work/runs/tune/smollm2/calib_stats.safetensors
"""

from __future__ import annotations

import argparse
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stats", required=True, help="a calib_stats.safetensors written by `crepe search` or tune_defaults.py")
    ap.add_argument("--refine-steps", type=int, default=20)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from crepe_plugin.core import (
        CREPE_DEFAULTS,
        DEFAULT_SCOPE,
        RIA_CONFIG,
        CRePEConfig,
        compensate_adaptive_nm,
        compensate_adaptive_unstructured,
        compensate_fixed_mask,
        crepe_saliency,
        crepe_scores,
        prune_mask,
        refine_fixed_mask,
    )
    from crepe_plugin.pho.calib import CalibStats, target_modules
    from crepe_plugin.pipeline import resolve_model

    st = CalibStats.load(a.stats)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(a.model), dtype=torch.float32)
    mods = target_modules(model)
    names = [n for n in mods if st.H(n) is not None]
    sgpt = CRePEConfig(row_coef=1.0, col_coef=0.0, act_exponent=1.0)
    nm_default = CREPE_DEFAULTS["nm"]
    un_default, un_scope = CREPE_DEFAULTS["unstructured"], DEFAULT_SCOPE["unstructured"]
    k = a.refine_steps

    def sparsegpt_rule(w, cols, inv_d):  # SparseGPT's unnormalised w^2 / U_jj^2 (outside CRePE's space unstructured)
        return w.abs() * inv_d

    variants = [
        ("2:4", "RIA mask, no update", "fixed", RIA_CONFIG, None, 0, False),
        ("2:4", "default mask, no update", "fixed", nm_default, None, 0, False),
        ("2:4", "RIA mask + OBS + CG", "fixed", RIA_CONFIG, None, k, True),
        ("2:4", "default mask + OBS + CG", "fixed", nm_default, None, k, True),
        ("2:4", "SparseGPT (adaptive at its point, OBS only)", "adaptive", sgpt, None, 0, True),
        ("2:4", "adaptive at SparseGPT's point + CG", "adaptive", sgpt, None, k, True),
        ("2:4", "adaptive at the default point + CG", "adaptive", nm_default, None, k, True),
        ("50%", "RIA mask (matrix) + OBS + CG", "fixed", RIA_CONFIG, "matrix", k, True),
        ("50%", f"default mask ({un_scope}) + OBS + CG", "fixed", un_default, un_scope, k, True),
        ("50%", f"adaptive at the default point ({un_scope}) + CG", "adaptive", un_default, un_scope, k, True),
        ("50%", "SparseGPT (OBS only)", "sgpt", None, "matrix", 0, True),
        ("50%", "SparseGPT's rule + CG", "sgpt", None, "matrix", k, True),
    ]
    print(f"{a.model}: {len(names)} linears with Gram matrices; pooled relative output error (lower is better)")
    print("| structure | variant | error | s |")
    print("| --- | --- | --- | --- |")
    for structure, label, kind, cfg, scope, steps, update in variants:
        t0 = time.perf_counter()
        num = den = 0.0
        for n in names:
            W = mods[n].weight.detach().float()
            H = st.H(n)
            if kind == "fixed":
                sc = crepe_scores(W, st.sq_norms[n], cfg)
                mask = prune_mask(sc, 0.5, "2:4" if structure == "2:4" else "0:0", scope or "matrix")
                Wp = compensate_fixed_mask(W, H, mask) if update else W.masked_fill(mask, 0)
            elif structure == "2:4":
                Wp, mask = compensate_adaptive_nm(W, H, 2, 4, crepe_saliency(W, cfg))
            else:
                sal = sparsegpt_rule if kind == "sgpt" else crepe_saliency(W, cfg)
                Wp, mask = compensate_adaptive_unstructured(W, H, 0.5, sal, scope)
            if steps:
                Wp = refine_fixed_mask(W, Wp, H, mask, steps)
            D = W - Wp
            num += float(((D @ H) * D).sum())
            den += float(((W @ H) * W).sum())
        print(f"| {structure} | {label} | {num / den:.5f} | {time.perf_counter() - t0:.1f} |", flush=True)


if __name__ == "__main__":
    main()
