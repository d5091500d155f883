"""Time CRePE scores + mask on one CPU core (issue target: 8192 x 8192 fp32 under 2 s).

Prints a table; compares with llm-compressor's Wanda N:M mask loop when it is installed.
usage: python benchmarks/core_speed.py [--size 8192] [--threads 1]
"""

import argparse
import time

import torch

from crepe_plugin.core import CRePEConfig, crepe_scores, prune_mask


def best_of(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    w = torch.randn(a.size, a.size)
    s = torch.rand(a.size) * 10
    rows = []
    for label, cfg, structure in [
        ("RIA 2:4", CRePEConfig(), "2:4"),
        ("RIA 50% unstructured", CRePEConfig(), "0:0"),
        ("CRePE 2:4, 3x3 box", CRePEConfig(row_coef=0.8, col_coef=1.2, neighbor_coef=0.1), "2:4"),
        ("CRePE 2:4, 5x5 gaussian", CRePEConfig(neighbor_coef=0.1, kernel_size=5, kernel="gaussian"), "2:4"),
    ]:
        t = best_of(lambda: prune_mask(crepe_scores(w, s, cfg), 0.5, structure), a.repeat)
        rows.append((label, t))
    try:
        from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import sparsify_weight

        lin = torch.nn.Linear(a.size, a.size, bias=False)
        lin.weight.data.copy_(w)
        t = best_of(lambda: sparsify_weight(lin, {lin: s.clone()}, 0.5, 2, 4), 1)
        rows.append(("llm-compressor Wanda 2:4 (reference)", t))
    except ImportError:
        pass
    print(f"| {a.size}x{a.size} fp32, {a.threads} thread(s) | seconds |")
    print("| --- | --- |")
    for label, t in rows:
        print(f"| {label} | {t:.3f} |")


if __name__ == "__main__":
    main()
