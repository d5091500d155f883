"""Local reconstruction: fit the kept weights of one block to a dense teacher. Pure torch.

A *block* is a piece of a decoder layer (the whole layer, its attention or its MLP). After its
Linears are masked, the kept weights are optimised by Adam so that the block's output on the
pruned model's inputs (the *sparse stream*) matches the dense model's output of the same block
on the dense model's inputs (the *dense teacher stream*). The masks stay fixed, pruned weights
stay exactly zero, and the loss is the mean squared error of the block's output.

With ``mask_moves`` each M-group of every row may re-choose which N of its M weights are pruned
at the start of every epoch after the first: the pruned weights are kept as shadow values that
receive the gradient of the masked weight (straight-through), and the kept set is the top
``M - N`` of ``|w| * col_scale`` in each group. After the last epoch the result is exactly N:M.

The caller supplies ``forward(params, batch_index) -> output``, which runs the block with the
given weights substituted (e.g. ``torch.func.functional_call``) on its stored input of that
batch; this module owns only the optimisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import NonFiniteError, _where

__all__ = ["LocalReconstruction", "BlockFit", "fit_block", "nm_keep_from_scores", "PROBE_BATCHES"]

PROBE_BATCHES = 16  # calibration batches on which fits at several learning rates (and the start) are compared


class LocalReconstruction(BaseModel):
    """Settings of the local reconstruction (a recipe's ``local_reconstruction:`` block).

    After a decoder layer's Linears are masked, their kept weights are fitted by Adam so that
    the block's output on the pruned model's inputs matches the dense model's (docs/method.md,
    "Local reconstruction")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(1, ge=1, le=100, description="passes over the calibration batches per decoder layer")
    lr: float | list[float] = Field(
        1e-4,
        description="Adam's learning rate (cosine decay to 0); or a list of up to 4: each decoder layer is fitted at "
        "each and keeps the fit with the lowest loss on 16 calibration windows",
    )
    lr_scale: Literal["absolute", "weight_rms"] = Field(
        "absolute",
        description="'absolute': every weight steps by `lr`; 'weight_rms': each Linear's step is `lr` times the RMS of "
        "its kept weights, so one setting means the same relative step on models whose weights differ in scale",
    )
    batch_size: int = Field(1, ge=1, description="calibration batches per Adam step")
    granularity: Literal["layer", "blocks"] = Field(
        "layer", description="'layer': the decoder layer's output; 'blocks': its attention, then its MLP, each on its own"
    )
    loss: Literal["mse", "token"] = Field(
        "mse", description="'mse': mean squared error; 'token': each token's error relative to its target's norm"
    )
    mask_moves: bool = Field(False, description="re-choose each N:M group's kept weights between epochs")
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="storage of the dense teacher's activations ('auto': the model's activations' dtype)"
    )
    guard: bool = Field(
        False,
        description="compare the block's loss before and after the fit on 16 calibration windows, and keep the block "
        "as pruned where every fit raised it",
    )
    log_error: bool = Field(
        False,
        description="log each block's output error before and after the fit (two extra passes over the calibration "
        "windows per block); otherwise the log gives the training loss of each epoch",
    )
    seed: int = 0

    @field_validator("lr")
    @classmethod
    def _learning_rates(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not 1 <= len(values) <= 4:
            raise ValueError(f"give one learning rate or a list of 1 to 4, not {len(values)}")
        bad = [x for x in values if not 0.0 < x <= 1.0]
        if bad:
            raise ValueError(f"each learning rate must be in (0, 1], not {bad[0]}")
        return v


@dataclass
class BlockFit:
    """What ``fit_block`` returns: the fitted weights (float32, exactly zero where pruned), the
    kept positions, and the block's mean squared output error before and after (NaN unless
    measured). ``lr``: the learning rate of the fit returned (0: the guard kept the start);
    ``probe_losses``: the loss on the probe batches at the start (with ``guard``) and after each
    fit tried, in order (empty when one learning rate is fitted without the guard)."""

    weights: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float
    steps: int
    mask_changes: int = 0
    history: list[float] = field(default_factory=list)
    lr: float = 0.0
    probe_losses: list[float] = field(default_factory=list)


def nm_keep_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Kept positions (True) of an N:M mask along the last dim: the top ``m - n`` scores of
    every group of ``m`` (ties to the lower index, as ``core.masks.nm_mask``)."""
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // m, m)
    pruned = torch.topk(g, n, dim=-1, largest=False, sorted=False).indices
    keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, pruned, False)
    return keep.reshape(rows, cols)


def _mse(forward, params, targets, b, per_token: bool = False) -> torch.Tensor:
    """Mean squared error of the block's output for batch ``b``; ``per_token``: each token's
    squared error divided by its target's squared norm (so that a few tokens with massive
    activations do not decide the fit), averaged over tokens."""
    out = forward(params, b).float()
    t = targets[b].to(out.device, torch.float32)
    if not per_token:
        return torch.nn.functional.mse_loss(out, t)
    err = (out - t).pow(2).sum(-1)
    return (err / t.pow(2).sum(-1).clamp_min(torch.finfo(torch.float32).tiny)).mean()


@torch.no_grad()
def _loss(forward, params, targets, per_token: bool = False) -> float:
    return sum(float(_mse(forward, params, targets, b, per_token)) for b in range(len(targets))) / max(len(targets), 1)


def fit_block(
    forward: Callable[[Mapping[str, torch.Tensor], int], torch.Tensor],
    weights: Mapping[str, torch.Tensor],
    keep: Mapping[str, torch.Tensor],
    targets: Sequence[torch.Tensor],
    *,
    epochs: int = 1,
    lr: float | Sequence[float] = 1e-4,
    lr_scale: Literal["absolute", "weight_rms"] = "absolute",
    accumulate: int = 1,
    seed: int = 0,
    mask_moves: bool = False,
    shadow: Mapping[str, torch.Tensor] | None = None,
    col_scale: Mapping[str, torch.Tensor] | None = None,
    nm: tuple[int, int] | None = None,
    measure: bool = True,
    per_token: bool = False,
    guard: bool = False,
    layer_name: str | None = None,
) -> BlockFit:
    """Adam on the kept weights of a block, masks fixed (or moving within N:M groups).

    weights: name -> the pruned weight (out, in), zero where pruned; fitted in float32.
    keep: name -> bool, True where the weight is kept.
    targets: the teacher's output for each stored batch; ``forward(params, b)`` returns the
        block's output for batch ``b`` with ``params`` (name -> weight) substituted.
    epochs: passes over the batches, in a seeded random order; ``accumulate`` batches per step;
        the learning rate follows a cosine from ``lr`` to 0 over all steps.
    lr_scale: 'absolute', or 'weight_rms': each weight's learning rate is ``lr`` times the RMS of
        its kept entries at the start (a relative step, the same on any weight scale).
    mask_moves: re-choose each N:M group's kept weights at the start of every epoch after the
        first (needs ``nm``, ``shadow``: name -> the dense weight, the pruned positions' start,
        and ``col_scale``: name -> (in,) input scale of the score ``|w| * col_scale``).
    measure: compute the loss over all batches before and after (two extra forward passes);
        otherwise both are NaN.
    per_token: the loss is each token's squared error relative to its target's squared norm,
        averaged (see ``_mse``); else the plain mean squared error.
    lr: Adam's learning rate, or a list of them: the block is fitted from the start at each, and
        the fit with the lowest loss on ``PROBE_BATCHES`` evenly spaced batches is returned.
    guard: the start competes too: where every fit raised that loss, the starting weights are
        returned (``BlockFit.lr`` is then 0).
    """
    if epochs < 0 or accumulate < 1:
        raise ValueError(f"{_where(layer_name)}: epochs must be >= 0 and accumulate >= 1")
    if lr_scale not in ("absolute", "weight_rms"):
        raise ValueError(f"{_where(layer_name)}: lr_scale must be 'absolute' or 'weight_rms', not {lr_scale!r}")
    if mask_moves and (nm is None or shadow is None or col_scale is None):
        raise ValueError("mask_moves needs nm, shadow and col_scale")
    lrs = [lr] if isinstance(lr, (int, float)) else list(lr)
    if not lrs or any(not x > 0 for x in lrs):
        raise ValueError(f"{_where(layer_name)}: lr must be > 0, or a non-empty list of such")
    keep0 = {k: v.to(torch.bool) for k, v in keep.items()}
    start = {k: (w.detach().to(torch.float32) * keep0[k]) for k, w in weights.items()}
    nb = len(targets)
    before = _loss(forward, start, targets, per_token) if measure else float("nan")
    choose = guard or len(lrs) > 1
    probe = sorted({round(i * (nb - 1) / max(PROBE_BATCHES - 1, 1)) for i in range(min(nb, PROBE_BATCHES))})

    def probe_loss(params: Mapping[str, torch.Tensor]) -> float:
        if any(not bool(torch.isfinite(v).all()) for v in params.values()):
            return float("inf")
        with torch.no_grad():
            return sum(float(_mse(forward, params, targets, b, per_token)) for b in probe) / max(len(probe), 1)

    probes = [probe_loss(start)] if guard else []
    best = None  # (probe loss, lr, the fit)
    for x in lrs:
        fit = _adam(forward, weights, keep0, targets, epochs=epochs, lr=x, lr_scale=lr_scale, accumulate=accumulate,
                    seed=seed, mask_moves=mask_moves, shadow=shadow, col_scale=col_scale, nm=nm, per_token=per_token)  # fmt: skip
        if not choose:
            best = (0.0, x, fit)
            break
        probes.append(probe_loss(fit[0]))
        if best is None or probes[-1] < best[0]:
            best = (probes[-1], x, fit)
    fitted, kept, history, changes, total = best[2]
    chosen = best[1]
    if guard and not best[0] < probes[0]:  # every fit raised the loss: keep the block as it was
        fitted, kept, chosen = start, keep0, 0.0
    bad = next((k for k, v in fitted.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise NonFiniteError(f"{_where(layer_name)}: local reconstruction produced non-finite weights in {bad}")
    after = _loss(forward, fitted, targets, per_token) if measure else float("nan")
    return BlockFit(fitted, kept, before, after, total, changes, history, chosen, probes)


def _adam(forward, weights, keep, targets, *, epochs, lr, lr_scale, accumulate, seed, mask_moves, shadow, col_scale, nm,
          per_token):  # fmt: skip
    """One fit from ``weights`` at ``lr`` (``fit_block``'s loop): the fitted weights, the kept
    positions, the training loss of each epoch, the mask moves and the number of steps."""
    keep = dict(keep)
    params = {}
    for k, w in weights.items():
        start = w.detach().to(torch.float32).clone()
        if mask_moves:  # pruned positions carry their shadow (dense) values
            start = torch.where(keep[k], start, shadow[k].detach().to(start))
        params[k] = start.requires_grad_(True)

    def effective(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if mask_moves:  # value w * keep, gradient to every position (straight-through)
            return {k: v + (v * keep[k] - v).detach() for k, v in p.items()}
        return {k: v * keep[k] for k, v in p.items()}

    nb = len(targets)
    steps_per_epoch = math.ceil(nb / accumulate)
    total = steps_per_epoch * epochs
    def step_scale(k: str, v: torch.Tensor) -> float:
        """1, or with 'weight_rms' the RMS of the kept entries (1 where there is none to measure)."""
        if lr_scale == "absolute" or not bool(keep[k].any()):
            return 1.0
        rms = float(v.detach()[keep[k]].pow(2).mean().sqrt())
        return rms if math.isfinite(rms) and rms > 0 else 1.0

    opt = torch.optim.Adam([{"params": [v], "lr": lr * step_scale(k, v)} for k, v in params.items()], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
    gen = torch.Generator().manual_seed(seed)
    history, changes = [], 0
    for epoch in range(epochs):
        if mask_moves and epoch > 0:
            n, m = nm
            with torch.no_grad():
                for k, v in params.items():
                    new = nm_keep_from_scores(v.abs() * col_scale[k].to(v).reshape(1, -1), n, m)
                    changes += int((new != keep[k]).sum()) // 2
                    keep[k] = new
        order = torch.randperm(nb, generator=gen).tolist()
        running = 0.0
        for s in range(steps_per_epoch):
            chunk = order[s * accumulate : (s + 1) * accumulate]
            opt.zero_grad(set_to_none=True)
            eff = effective(params)
            for b in chunk:
                loss = _mse(forward, eff, targets, b, per_token) / len(chunk)
                loss.backward(retain_graph=b != chunk[-1])
                running += float(loss.detach())
            if not mask_moves:  # Adam would move a zero-gradient weight only through its state
                for k, v in params.items():
                    v.grad.mul_(keep[k])
            opt.step()
            sched.step()
            if not mask_moves:
                with torch.no_grad():
                    for k, v in params.items():
                        v.mul_(keep[k])
        history.append(running / max(steps_per_epoch, 1))
    with torch.no_grad():
        fitted = {k: (v * keep[k]).detach() for k, v in params.items()}
    return fitted, keep, history, changes, total
