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
batch; this module owns only the optimisation. With ``token_fraction`` < 1 each training step
calls ``forward(params, batch_index, tokens)`` instead: the output at the sequence positions
``tokens`` only (dim -2), so that the caller may run the block's token-wise part (its MLP) on
those positions alone; the loss is then taken there.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .errors import NonFiniteError, _where

__all__ = ["LocalReconstruction", "BlockFit", "fit_block", "low_precision_linear_grads", "nm_keep_from_scores", "HELD_OUT"]

HELD_OUT = 8  # fits are compared on 1 calibration window in HELD_OUT: windows not yet trained on at the comparison


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
        "each and keeps the fit with the lowest loss on calibration windows not trained on (1 in 8)",
    )
    trial: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="with several learning rates: the fraction of the fit's steps after which they are compared, on "
        "windows the first epoch has not reached yet; only the best goes on, over every window (1: each runs to the "
        "end, and the windows compared on are held out of training)",
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
    mlp_tokens: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="the fraction of each window's tokens (a new seeded random subset every step) on which a training "
        "step runs the decoder layer's MLP and takes the loss; attention still sees every token. Below 1 a step is "
        "cheaper (SmolLM2 and Gemma 3 270M: 0.5 costs about 0.7 of a full step). Comparisons of learning rates and "
        "the errors of `log_error` use every token; the training loss logged by epoch is on the subsets",
    )
    attention: Literal["all", "output"] = Field(
        "all",
        description="'all': every pruned Linear of the decoder layer's attention is trained; 'output': only its output "
        "projection is: the Linears before it keep their pruned weights, and what the output projection receives is "
        "computed once per calibration window and reused, so a training step skips attention's forward and backward "
        "(about 0.68 of a full step on SmolLM2 and Gemma 3 270M, but 2:4 validation perplexity 3.5-8.3% worse on both "
        "models and both texts; docs/method.md, session 38)",
    )
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="storage of the dense teacher's activations ('auto': the model's activations' dtype)"
    )
    guard: bool = Field(
        False,
        description="the block as pruned competes with the fits, on the same windows and at the same point, and is "
        "kept where every fit raised the loss",
    )
    log_error: bool = Field(
        False,
        description="log each block's output error before and after the fit (two extra passes over the calibration "
        "windows per block); otherwise the log gives the training loss of each epoch",
    )
    compute_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="precision of the training steps' matrix products (torch.autocast); the weights, Adam's state, the "
        "loss and the comparison of learning rates stay float32. 'bfloat16' is about 3x faster per product on CPUs "
        "with AVX512-BF16, but it cost Gemma 3 270M much of the fit's gain (2:4 test perplexity 82.87 against 66.24 in "
        "float32; docs/method.md, session 31): keep float32 unless your own validation says otherwise",
    )
    backward_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="precision of the two gradient products of each Linear in the training steps' backward pass (the "
        "forward pass, the loss, Adam and every comparison stay float32). 'bfloat16' makes those products about 3x "
        "faster on CPUs with AVX512-BF16, but a whole prune only about 7% faster (SmolLM2, session 33: the products are "
        "about half of a step); Gemma 3 270M's validation was 4-5% worse than float32's in another run "
        "(docs/method.md, session 33)",
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
    ``probe_losses``: the loss on the batches compared on, at the start (with ``guard``) and, for
    each learning rate in order, at the point of comparison (empty when one learning rate is
    fitted without the guard); ``probe_final``: that loss at the end of the fit kept (NaN when
    nothing was compared); ``held_out``: how many batches were compared on; ``trained_all``:
    whether the fit kept trained on every batch (False when they were held out)."""

    weights: dict[str, torch.Tensor]
    keep: dict[str, torch.Tensor]
    loss_before: float
    loss_after: float
    steps: int
    mask_changes: int = 0
    history: list[float] = field(default_factory=list)
    lr: float = 0.0
    probe_losses: list[float] = field(default_factory=list)
    probe_final: float = float("nan")
    held_out: int = 0
    trained_all: bool = True


def nm_keep_from_scores(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Kept positions (True) of an N:M mask along the last dim: the top ``m - n`` scores of
    every group of ``m`` (ties to the lower index, as ``core.masks.nm_mask``)."""
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // m, m)
    pruned = torch.topk(g, n, dim=-1, largest=False, sorted=False).indices
    keep = torch.ones_like(g, dtype=torch.bool).scatter_(-1, pruned, False)
    return keep.reshape(rows, cols)


def _mse(forward, params, targets, b, per_token: bool = False, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error of the block's output for batch ``b`` (at the sequence positions
    ``tokens`` only, if given); ``per_token``: each token's squared error divided by its target's
    squared norm (so that a few tokens with massive activations do not decide the fit), averaged
    over tokens."""
    if tokens is None:
        out, t = forward(params, b).float(), targets[b]
    else:
        out, t = forward(params, b, tokens).float(), targets[b].index_select(-2, tokens.to(targets[b].device))
    t = t.to(out.device, torch.float32)
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
    trial: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    backward_dtype: torch.dtype = torch.float32,
    token_fraction: float = 1.0,
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
        the fit with the lowest loss on batches none of the fits has trained on (1 in
        ``HELD_OUT``) is returned.
    trial: with several learning rates, the fraction of the steps after which they are
        compared. If the first epoch has not reached every batch by then, they are compared on
        batches it has not reached (evenly spaced in its order), and only the best runs on, on
        its own full schedule over every batch: it ends exactly as it would have alone. If it has
        (``trial`` 1, or a pause after the first epoch), the batches compared on are held out of
        training (evenly spaced), for every fit.
    compute_dtype: float32, or a lower precision in which the training steps' forward and backward
        passes run (``torch.autocast``); weights, Adam, the loss and every comparison stay float32.
    backward_dtype: float32, or a lower precision for the two gradient products of every
        ``F.linear`` in the training steps' backward pass (``low_precision_linear_grads``); the
        forward pass stays in ``compute_dtype``.
    token_fraction: below 1, every training step takes the loss at ``ceil(token_fraction * seq)``
        positions of its batch (dim -2 of the targets), a new seeded random subset each time, and
        calls ``forward(params, b, tokens)`` (see the module's docstring); every comparison and
        ``measure`` use all positions.
    guard: the start competes too, on the same batches at the same point: where every fit
        raised the loss, the starting weights are returned (``BlockFit.lr`` is then 0). With the
        guard alone every fit runs to the end, on the batches not held out.
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
    if not 0.0 < trial <= 1.0:
        raise ValueError(f"{_where(layer_name)}: trial must be in (0, 1], not {trial}")
    if not 0.0 < token_fraction <= 1.0:
        raise ValueError(f"{_where(layer_name)}: token_fraction must be in (0, 1], not {token_fraction}")
    keep0 = {k: v.to(torch.bool) for k, v in keep.items()}
    start = {k: (w.detach().to(torch.float32) * keep0[k]) for k, w in weights.items()}
    nb = len(targets)
    before = _loss(forward, start, targets, per_token) if measure else float("nan")
    choose = guard or len(lrs) > 1
    n_probe = max(1, nb // HELD_OUT)

    def schedule(n_train: int) -> tuple[int, int]:
        """All steps of a fit on ``n_train`` batches, and the step after which fits are compared."""
        steps = math.ceil(n_train / accumulate) * epochs
        return steps, max(1, math.ceil(trial * steps)) if len(lrs) > 1 else steps

    total, pause = schedule(nb)
    unseen = _epoch_orders(list(range(nb)), 1, seed)[0][pause * accumulate :] if choose else []
    if unseen:  # compared on batches the first epoch has not reached at the pause: nothing is held out
        probe, train = _spread(unseen, n_probe), list(range(nb))
    else:  # held out of every fit (a single batch: compared on the one it trains on)
        probe = _spread(list(range(nb)), n_probe) if choose and nb >= 2 else []
        train = [b for b in range(nb) if b not in set(probe)]
        probe = probe or train
        total, pause = schedule(len(train))

    def probe_loss(params: Mapping[str, torch.Tensor]) -> float:
        if any(not bool(torch.isfinite(v).all()) for v in params.values()):
            return float("inf")
        with torch.no_grad():
            return sum(float(_mse(forward, params, targets, b, per_token)) for b in probe) / len(probe)

    probes = [probe_loss(start)] if guard else []
    best = None  # (probe loss at the pause, lr, the paused fit)
    for x in lrs:
        run = _adam(forward, weights, keep0, targets, train, epochs=epochs, lr=x, lr_scale=lr_scale, accumulate=accumulate,
                    seed=seed, mask_moves=mask_moves, shadow=shadow, col_scale=col_scale, nm=nm, per_token=per_token,
                    pause=pause, compute_dtype=compute_dtype, backward_dtype=backward_dtype,
                    token_fraction=token_fraction)  # fmt: skip
        paused = next(run)
        if not choose:
            best = (0.0, x, run)
            break
        probes.append(probe_loss(paused))
        if best is None or probes[-1] < best[0]:
            best = (probes[-1], x, run)
    try:
        next(best[2])
        raise RuntimeError("_adam yields once")
    except StopIteration as done:
        fitted, kept, history, changes, steps = done.value
    chosen = best[1]
    final = (best[0] if pause == total else probe_loss(fitted)) if choose else float("nan")
    if guard and not best[0] < probes[0]:  # every fit raised the loss where they were compared: keep the block
        fitted, kept, chosen = start, keep0, 0.0
    bad = next((k for k, v in fitted.items() if not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise NonFiniteError(f"{_where(layer_name)}: local reconstruction produced non-finite weights in {bad}")
    after = _loss(forward, fitted, targets, per_token) if measure else float("nan")
    return BlockFit(fitted, kept, before, after, steps, changes, history, chosen, probes, final,
                    len(probe) if choose else 0, len(train) == nb)  # fmt: skip


def _adam(forward, weights, keep, targets, train, *, epochs, lr, lr_scale, accumulate, seed, mask_moves, shadow,
          col_scale, nm, per_token, pause, compute_dtype, backward_dtype, token_fraction=1.0):  # fmt: skip
    """One fit from ``weights`` at ``lr`` on the batches ``train`` (``fit_block``'s loop), as a
    generator: it yields the weights once, after ``pause`` steps (at most all of them), and
    returns the fitted weights, the kept positions, the training loss of each epoch, the mask
    moves and the number of steps."""
    keep = dict(keep)
    params = {}
    for k, w in weights.items():
        start = w.detach().to(torch.float32).clone()
        if mask_moves:  # pruned positions carry their shadow (dense) values
            start = torch.where(keep[k], start, shadow[k].detach().to(start))
        else:  # pruned positions start at exactly zero (and never get a gradient: see `effective`)
            start.mul_(keep[k])
        params[k] = start.requires_grad_(True)

    def effective(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if mask_moves:  # value w * keep, gradient to every position (straight-through)
            return {k: v + (v * keep[k] - v).detach() for k, v in p.items()}
        # masks fixed: pruned positions start at zero, their gradient is zeroed before each step, and
        # Adam (no weight decay) moves a weight whose every gradient was zero by exactly 0 -- so they
        # stay exactly zero without a mask product in the forward pass or after the step
        return p

    nb = len(train)
    steps_per_epoch = math.ceil(nb / accumulate)
    total = steps_per_epoch * epochs
    pause, done = min(pause, total), 0
    def step_scale(k: str, v: torch.Tensor) -> float:
        """1, or with 'weight_rms' the RMS of the kept entries (1 where there is none to measure)."""
        if lr_scale == "absolute" or not bool(keep[k].any()):
            return 1.0
        rms = float(v.detach()[keep[k]].pow(2).mean().sqrt())
        return rms if math.isfinite(rms) and rms > 0 else 1.0

    grad_keep = {} if mask_moves else {k: m.to(torch.float32) for k, m in keep.items()}  # no bool-to-float copy per step
    fused = all(v.device.type in ("cpu", "cuda") for v in params.values())  # one kernel per weight, not ~10
    opt = torch.optim.Adam([{"params": [v], "lr": lr * step_scale(k, v)} for k, v in params.items()], lr=lr,
                           fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
    history, changes = [], 0
    device = targets[train[0]].device.type if train else "cpu"
    autocast = torch.autocast(device, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    token_gen = torch.Generator().manual_seed(seed + 1)  # the same subsets for every learning rate

    def tokens(b: int) -> torch.Tensor | None:
        if token_fraction >= 1.0:
            return None
        seq = targets[b].shape[-2]
        k = min(seq, max(1, math.ceil(round(token_fraction * seq, 9))))  # round: 0.1 * 30 is 3, not 4
        return torch.randperm(seq, generator=token_gen)[:k].sort().values
    for epoch, order in enumerate(_epoch_orders(train, epochs, seed)):
        if mask_moves and epoch > 0:
            n, m = nm
            with torch.no_grad():
                for k, v in params.items():
                    new = nm_keep_from_scores(v.abs() * col_scale[k].to(v).reshape(1, -1), n, m)
                    changes += int((new != keep[k]).sum()) // 2
                    keep[k] = new
        running = 0.0
        for s in range(steps_per_epoch):
            chunk = order[s * accumulate : (s + 1) * accumulate]
            opt.zero_grad(set_to_none=True)
            eff = effective(params)
            for b in chunk:
                with autocast, low_precision_linear_grads(backward_dtype):
                    loss = _mse(forward, eff, targets, b, per_token, tokens(b)) / len(chunk)
                loss.backward(retain_graph=b != chunk[-1])
                running += float(loss.detach())
            if not mask_moves:  # pruned positions get no gradient, so Adam never moves them
                for k, v in params.items():
                    v.grad.mul_(grad_keep[k])
            opt.step()
            sched.step()
            done += 1
            if done == pause < total:  # not under no_grad: a yield there would leave gradients off in the caller
                yield {k: (v * keep[k]).detach() for k, v in params.items()}
        history.append(running / max(steps_per_epoch, 1))
    fitted = {k: (v * keep[k]).detach() for k, v in params.items()}
    if pause == total:
        yield fitted
    return fitted, keep, history, changes, total


class _LinearLowPrecisionGrads(torch.autograd.Function):
    """``F.linear`` whose forward is exact and whose backward's two products run in ``dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        ctx.save_for_backward(x.to(dtype), weight.to(dtype))
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g = grad.to(ctx.dtype)
        grad_x = (g @ w).to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).to(grad.dtype)
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def _linear_args(input, weight, bias=None):
    return input, weight, bias


class _LowPrecisionLinearGrads(torch.overrides.TorchFunctionMode):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight, bias = _linear_args(*args, **kwargs)
            if x.dtype == weight.dtype == torch.float32 and (x.requires_grad or weight.requires_grad):
                return _LinearLowPrecisionGrads.apply(x, weight, bias, self.dtype)
        return func(*args, **kwargs)


def low_precision_linear_grads(dtype: torch.dtype):
    """A context in which every float32 ``F.linear`` that needs a gradient computes its forward
    exactly and the two products of its backward (input and weight gradients) in ``dtype``; a
    no-op for float32."""
    return contextlib.nullcontext() if dtype == torch.float32 else _LowPrecisionLinearGrads(dtype)


def _epoch_orders(train: list[int], epochs: int, seed: int) -> list[list[int]]:
    """The order in which ``_adam`` visits the batches ``train`` in each epoch (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    return [[train[i] for i in torch.randperm(len(train), generator=gen).tolist()] for _ in range(epochs)]


def _spread(items: list[int], k: int) -> list[int]:
    """``min(k, len(items))`` elements of ``items``, evenly spaced (the centres of equal parts), sorted."""
    k = min(k, len(items))
    return sorted(items[(2 * i + 1) * len(items) // (2 * k)] for i in range(k))
