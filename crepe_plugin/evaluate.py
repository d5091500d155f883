"""Perplexity by the literature's protocol (SparseGPT / Wanda / RIA).

Tokenize the whole text once, cut it into non-overlapping segments of ``seqlen`` tokens,
and exponentiate the mean next-token NLL over the segments.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

__all__ = ["perplexity", "perplexity_of_ids", "load_model"]


def load_model(path: str, dtype: str | torch.dtype = "auto", device: str = "cpu"):
    """Load a dense, pruned or compressed-tensors checkpoint (decompressed) for eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(path)
    return model, tok


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, max_segments: int | None = None, progress=True) -> float:
    ids = ids.reshape(-1)
    nseg = ids.numel() // seqlen
    if max_segments:
        nseg = min(nseg, max_segments)
    if nseg == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one segment of {seqlen}")
    device = next(model.parameters()).device
    nll_sum = 0.0
    for i in tqdm(range(nseg), desc="perplexity", disable=not progress):
        batch = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
        nll_sum += loss.item() * seqlen
    return math.exp(nll_sum / (nseg * seqlen))


def perplexity(model, tokenizer, text: str, seqlen: int = 1024, max_segments: int | None = None, progress=True) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return perplexity_of_ids(model, ids, seqlen, max_segments, progress)
