"""The dense teacher stream and local reconstruction of a decoder layer, inside llm-compressor's
sequential pipeline.

The pipeline feeds decoder layer L the output of layers 0..L-1 *as pruned* (the sparse stream).
``TeacherStream`` keeps, beside it, the dense model's input to layer L (the dense stream): for
layer 0 it is the pipeline's own input; afterwards it is the dense layer's output on the dense
stream, computed before the layer is pruned. Memory: one extra activation set (the dense inputs
of the current layer, replaced batch by batch by its dense outputs), plus, with
``granularity: blocks``, the teacher outputs of the attention block.

``reconstruct_layer`` then fits the kept weights of the decoder layer, block by block (its
attention, then its MLP, or the whole layer), so that each block's output on the sparse stream
matches the dense block's output on the dense stream (``core.local.fit_block``). The masks
never change (unless mask moves are on, within N:M groups), and pruned weights stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from loguru import logger

from ..core.layers import weight_out_in
from ..core.local import BlockFit, fit_block

__all__ = ["TeacherStream", "reconstruct_layer", "layer_blocks"]

Granularity = Literal["blocks", "layer"]


class _Stop(Exception):
    """Stops a forward pass once the block of interest has run."""


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _floating(kwargs: dict, dtype: torch.dtype) -> dict:
    def cast(v):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.to(dtype)
        if isinstance(v, tuple):
            return tuple(cast(t) for t in v)
        return v

    return {k: cast(v) for k, v in kwargs.items()}


@dataclass
class _Call:
    """What the pipeline passed a decoder layer for one batch."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


@dataclass
class TeacherStream:
    """Dense activations at the input of the decoder layer being calibrated, one per batch."""

    storage_dtype: torch.dtype | None = None  # None: the activations' own dtype
    dense: list[torch.Tensor] | None = None
    calls: list[_Call] = field(default_factory=list)
    layer: torch.nn.Module | None = None

    def capture(self, layer: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward-pre hook (with kwargs) on a decoder layer: record the pipeline's input."""
        if layer is not self.layer:
            self.layer, self.calls = layer, []
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs["hidden_states"], ()
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        self.calls.append(_Call(hidden.detach(), rest, dict(kwargs)))

    def dense_inputs(self) -> list[torch.Tensor]:
        """The dense stream's input to the current layer (the first layer: the pipeline's own, in a
        new list, so that ``dense_pass`` may replace its entries)."""
        if self.dense is None:
            return [c.hidden for c in self.calls]
        if len(self.dense) != len(self.calls):
            raise RuntimeError(f"teacher stream holds {len(self.dense)} batches, the layer saw {len(self.calls)}")
        return self.dense

    def store(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t if self.storage_dtype is None else t.to(self.storage_dtype)

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """The dense outputs of the current layer become the next layer's dense inputs."""
        self.dense = outputs
        self.calls = []
        self.layer = None


def layer_blocks(layer: torch.nn.Module, pruned: set[torch.nn.Module], granularity: Granularity) -> list[tuple[str, torch.nn.Module]]:
    """The blocks of a decoder layer fitted one after another: its direct children that hold a
    pruned layer (attention, then MLP, in call order), or the whole layer."""
    if granularity == "layer":
        return [("", layer)]
    return [(n, c) for n, c in layer.named_children() if any(m in pruned for m in c.modules())]


def _run(layer: torch.nn.Module, call: _Call, hidden: torch.Tensor) -> torch.Tensor:
    return _first(layer(hidden.to(call.hidden.dtype), *call.args, **call.kwargs))


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], dict(kwargs)
    return kwargs["hidden_states"], (), {k: v for k, v in kwargs.items() if k != "hidden_states"}


@torch.no_grad()
def dense_pass(layer, calls: list[_Call], inputs: list[torch.Tensor], blocks, store) -> tuple[list, dict]:
    """Run ``layer`` (dense weights) on the dense stream: (its outputs, {block name: the block's
    outputs}), one entry per batch. Each output replaces its input in ``inputs`` as soon as it is
    computed (the list returned is ``inputs``), so the stream holds one activation set, not two."""
    outs: dict[str, list] = {name: [] for name, _ in blocks}
    hooks = [
        block.register_forward_hook(lambda _m, _a, out, name=name: outs[name].append(store(_first(out))))
        for name, block in blocks
        if block is not layer
    ]
    try:
        for i, (c, x) in enumerate(zip(calls, inputs)):
            inputs[i] = store(_run(layer, c, x))
    finally:
        for h in hooks:
            h.remove()
    for name, block in blocks:
        if block is layer:
            outs[name] = inputs
    return inputs, outs


@torch.no_grad()
def block_inputs(layer, block, calls: list[_Call], store) -> list[tuple[torch.Tensor, tuple, dict]]:
    """What ``block`` receives, per batch, when ``layer`` (current weights) runs on the sparse
    stream; the layer's forward stops right after the block."""
    if block is layer:
        return [(c.hidden, c.args, c.kwargs) for c in calls]
    got = []

    def hook(_m, args, kwargs, _out):
        x, rest, kw = _split_call(args, kwargs)
        got.append((store(x), rest, kw))
        raise _Stop

    h = block.register_forward_hook(hook, with_kwargs=True)
    try:
        for c in calls:
            try:
                _run(layer, c, c.hidden)
            except _Stop:
                pass
    finally:
        h.remove()
    return got


def reconstruct_layer(
    layer: torch.nn.Module,
    teacher: TeacherStream,
    targets: dict[str, list[torch.Tensor]],
    keep: dict[torch.nn.Module, torch.Tensor],
    write,
    *,
    granularity: Granularity = "blocks",
    epochs: int = 1,
    lr: float = 1e-4,
    accumulate: int = 4,
    per_token: bool = False,
    mask_moves: bool = False,
    nm: tuple[int, int] | None = None,
    dense_weights: dict[torch.nn.Module, torch.Tensor] | None = None,
    col_scale: dict[torch.nn.Module, torch.Tensor] | None = None,
    seed: int = 0,
    layer_name: str = "",
) -> list[tuple[str, BlockFit]]:
    """Fit the kept weights of ``layer``'s pruned Linears to the dense teacher, block by block.

    ``targets``: {block name: the dense block's outputs on the dense stream} (``dense_pass``).
    ``keep``: {Linear: bool (out, in), True = kept}; the layer's weights are pruned when this is
    called. ``write(module, w_out_in)`` stores a weight. Returns the fit of every block. Run it
    with every calibration hook disabled (``compat.llmcompressor.disable_hooks``).
    """
    fits = []
    for bname, block in layer_blocks(layer, set(keep), granularity):
        ins = block_inputs(layer, block, teacher.calls, teacher.store)
        lin = {m: f"{n}.weight" for n, m in block.named_modules() if m in keep}
        by_name = {k: m for m, k in lin.items()}
        fixed = {k: v.float() for k, v in (*block.named_parameters(), *block.named_buffers()) if v.is_floating_point()}

        def forward(params, b, block=block, ins=ins, by_name=by_name, fixed=fixed):
            full = dict(fixed)
            for k, w in params.items():  # (out, in) -> the module's stored layout (Conv1D: (in, out))
                full[k] = w if isinstance(by_name[k], torch.nn.Linear) else w.t()
            x, rest, kw = ins[b]
            return _first(torch.func.functional_call(block, full, (x.float(), *rest), _floating(kw, torch.float32)))

        fit = fit_block(
            forward, {k: weight_out_in(m).detach() for m, k in lin.items()}, {k: keep[m] for m, k in lin.items()},
            targets[bname], epochs=epochs, lr=lr, accumulate=accumulate, seed=seed, per_token=per_token,
            mask_moves=mask_moves, nm=nm,
            shadow={k: dense_weights[m] for m, k in lin.items()} if mask_moves else None,
            col_scale={k: col_scale[m] for m, k in lin.items()} if mask_moves else None,
            layer_name=f"{layer_name}.{bname}" if bname else layer_name,
        )  # fmt: skip
        for m, k in lin.items():
            write(m, fit.weights[k].to(weight_out_in(m).dtype))
            keep[m] = fit.keep[k]
        fits.append((bname or "layer", fit))
        logger.info(f"{layer_name}.{bname or '*'}: local reconstruction, block output error {fit.loss_before:.4g} -> "
                    f"{fit.loss_after:.4g}" + (f", {fit.mask_changes} mask moves" if mask_moves else ""))  # fmt: skip
    return fits
