"""Perplexity by the literature's protocol (SparseGPT / Wanda / RIA).

Tokenize the whole text once, cut it into non-overlapping segments of ``seqlen`` tokens,
and exponentiate the mean next-token NLL over the segments.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

__all__ = ["perplexity", "perplexity_of_ids", "load_model", "check_device", "EvalError"]


class EvalError(ValueError):
    """The evaluation cannot give a trustworthy number."""


def load_model(path: str, dtype: str | torch.dtype = "auto", device: str = "cpu"):
    """Load a dense, pruned or compressed-tensors checkpoint (decompressed) for eval, with its
    tokenizer. A checkpoint whose weights do not all load is refused (``models.load_checkpoint``):
    transformers would fill the gaps with freshly initialised weights and the perplexity would look
    plausible."""
    from .models import load_checkpoint, load_processor, text_tokenizer

    check_device(device)
    model = load_checkpoint(path, dtype)
    model.to(device).eval()
    return model, text_tokenizer(load_processor(path))


def check_device(device: str) -> None:
    """Refuse a device torch does not know, or one this machine does not have, in one line."""
    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise EvalError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if d.type == "cpu":
        return
    backend = getattr(torch, d.type, None)
    available = bool(backend is not None and getattr(backend, "is_available", lambda: False)())
    count = getattr(backend, "device_count", lambda: 1)() if available else 0
    if not available or (d.index is not None and d.index >= count):
        raise EvalError(f"--device {device}: this machine has no such {d.type} device ({count} available)")


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, max_segments: int | None = None, progress=True) -> float:
    if seqlen < 2:
        raise EvalError(f"seqlen must be at least 2 (one prediction needs two tokens), got {seqlen}")
    if max_segments is not None and max_segments < 1:
        raise EvalError(f"max_segments must be at least 1, got {max_segments}")
    ids = ids.reshape(-1)
    nseg = ids.numel() // seqlen
    if max_segments and 0 < nseg < max_segments:
        from loguru import logger

        logger.warning(f"the text holds {nseg} segments of {seqlen} tokens, fewer than --max-segments {max_segments}: "
                       f"the perplexity is over {nseg}")  # fmt: skip
    if max_segments:
        nseg = min(nseg, max_segments)
    if nseg == 0:
        raise EvalError(f"the text has {ids.numel()} tokens, fewer than one segment of --seqlen {seqlen}; "
                        "give a longer text or a shorter --seqlen")
    device = next(model.parameters()).device
    nll_sum = 0.0
    for i in tqdm(range(nseg), desc="perplexity", disable=not progress):
        batch = ids[i * seqlen : (i + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], batch[0, 1:])
        nll_sum += loss.item() * seqlen
    ppl = math.exp(nll_sum / (nseg * seqlen))
    if not math.isfinite(ppl):
        raise EvalError(f"perplexity is {ppl}: the model produced non-finite logits (NaN or Inf weights?)")
    return ppl


def perplexity(model, tokenizer, text: str, seqlen: int = 1024, max_segments: int | None = None, progress=True) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return perplexity_of_ids(model, ids, seqlen, max_segments, progress)
