"""The dense teacher stream and local reconstruction of a decoder layer, inside llm-compressor's
sequential pipeline.

The pipeline feeds decoder layer L the output of layers 0..L-1 *as pruned* (the sparse stream).
``TeacherStream`` keeps, beside it, the dense model's input to layer L (the dense stream): for
layer 0 it is the pipeline's own input; afterwards it is the dense layer's output on the dense
stream, computed before the layer is pruned. Memory: one extra activation set (the dense inputs
of the current layer, replaced batch by batch by its dense outputs), plus, with
``granularity: blocks``, the teacher outputs of the attention block, and with ``attention: output``
what the attention's output projection receives (heads x head_dim per token) while its layer is fitted.

``reconstruct_layer`` then fits the kept weights of the decoder layer, block by block (its
attention, then its MLP, or the whole layer), so that each block's output on the sparse stream
matches the dense block's output on the dense stream (``core.local.fit_block``). The masks
never change (unless mask moves are on, within N:M groups), and pruned weights stay exactly zero.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from loguru import logger

from ..compat.compressed_tensors import match_named_modules, suspend_offloading
from ..compat.llmcompressor import disable_hooks
from ..core.errors import PruningError
from ..core.layers import to_stored_layout, weight_out_in
from ..core.local import BlockFit, LocalReconstruction, fit_block

__all__ = ["TeacherStream", "LocalReconstructor", "reconstruct_layer", "layer_blocks"]

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


def mlp_block(layer: torch.nn.Module, pruned: set[torch.nn.Module]) -> tuple[str, torch.nn.Module] | None:
    """The token-wise block of a decoder layer (its MLP): the last of its children that hold a
    pruned layer (attention comes first); None if none does. ``on_tokens`` refuses it if it is
    called with more than its hidden states (e.g. when only the attention is pruned)."""
    blocks = layer_blocks(layer, pruned, "blocks")
    return blocks[-1] if blocks else None


def _holds_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, (tuple, list)):
        return any(_holds_tensor(t) for t in v)
    if isinstance(v, dict):
        return any(_holds_tensor(t) for t in v.values())
    return False


@contextlib.contextmanager
def on_tokens(block: torch.nn.Module, name: str, tokens: torch.Tensor):
    """Within the context, ``block`` (token-wise: it gets the hidden states alone) runs on the
    sequence positions ``tokens`` (dim -2) only, and its output is zero elsewhere, so that the
    decoder layer's output is exact at ``tokens``."""
    seq = {}

    def pre(_m, args, kwargs):
        x, rest, kw = _split_call(args, kwargs)
        extra = [k for k, v in kw.items() if _holds_tensor(v)] + ["a positional argument"] * len(rest)
        if extra:
            raise PruningError(
                f"local_reconstruction.mlp_tokens runs '{name}' on a subset of tokens, but it is called with more than "
                f"its hidden states ({extra[0]}), so it may not be token-wise; use mlp_tokens: 1"
            )
        seq["n"] = x.shape[-2]
        return (x.index_select(-2, tokens),), kw

    def post(_m, _args, _kwargs, out):
        first = _first(out)
        shape = (*first.shape[:-2], seq["n"], first.shape[-1])
        full = first.new_zeros(shape).index_copy(-2, tokens, first)
        return type(out)((full, *out[1:])) if isinstance(out, (tuple, list)) else full

    hooks = [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _Replay(torch.nn.Module):
    """Stands in for a decoder layer's attention in a fit with ``attention: output``: its output
    projection (the same module, at the same relative path) applied to what that projection
    received on the current window, computed once (``attention_replay``), since every weight
    before it is frozen."""

    def __init__(self, path: str, proj: torch.nn.Module, inputs: list[torch.Tensor], tail: tuple | None):
        super().__init__()
        parent = self
        *heads, last = path.split(".")
        for h in heads:
            parent.add_module(h, torch.nn.Module())
            parent = getattr(parent, h)
        parent.add_module(last, proj)
        self.path, self.inputs, self.tail, self.window = path, inputs, tail, 0

    def forward(self, *_args, **_kwargs):
        out = self.get_submodule(self.path)(self.inputs[self.window].float())
        return out if self.tail is None else (out, *self.tail)

    def frozen(self, names, rel: str) -> set[str]:
        """Of the parameter and buffer ``names`` of a block whose attention sits at ``rel`` ("": the
        block is the attention), those the replay leaves out: every one inside the attention but
        its output projection's."""
        inside = f"{rel}." if rel else ""
        return {k for k in names if k.startswith(inside) and not k.startswith(f"{inside}{self.path}.")}


def _has_matrix(m: torch.nn.Module) -> bool:
    """A Linear-like module: one with a 2-D weight (Linear, Conv1D, ...)."""
    return getattr(m, "weight", None) is not None and m.weight.dim() == 2


@contextlib.contextmanager
def _swapped(root: torch.nn.Module, path: str, module: torch.nn.Module):
    """Within the context, ``root``'s submodule at ``path`` is ``module``."""
    parent_path, _, last = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    old = getattr(parent, last)
    setattr(parent, last, module)
    try:
        yield
    finally:
        setattr(parent, last, old)


@torch.no_grad()
def attention_replay(attn: torch.nn.Module, name: str, run, windows: int, store) -> _Replay | None:
    """For ``attention: output``: call ``run(b)`` (the fitted block's forward on window ``b``, at
    the starting weights) for every window, and keep what ``attn``'s output projection -- the last
    Linear (a 2-D weight) it calls -- receives. None when ``attn`` gets only its hidden states (it
    is token-wise, so not attention: e.g. only the MLPs are pruned). Refuses an attention whose
    output is not exactly its last Linear's output."""
    calls, seen = [], {}
    leaves = [(n, m) for n, m in attn.named_modules() if _has_matrix(m)]

    def pre(_m, args, kwargs):
        _x, rest, kw = _split_call(args, kwargs)
        seen["extra"] = bool(rest) or any(_holds_tensor(v) for v in kw.values())

    def leaf(n):
        return lambda _m, args, out: calls.append((n, args[0], out))

    def post(_m, _args, out):
        seen["out"] = out
        raise _Stop

    hooks = [attn.register_forward_pre_hook(pre, with_kwargs=True), attn.register_forward_hook(post)]
    hooks += [m.register_forward_hook(leaf(n)) for n, m in leaves]
    inputs, path = [], None
    try:
        for b in range(windows):
            calls.clear()
            try:
                run(b)
            except _Stop:
                pass
            if not seen.get("extra"):
                return None
            if not calls or (path is not None and calls[-1][0] != path):
                raise PruningError(
                    f"local_reconstruction.attention: output reuses what the output projection of '{name}' receives, "
                    f"but its last Linear is {'none' if not calls else repr(calls[-1][0]) + ' on one window and ' + repr(path) + ' on another'}; "
                    "use attention: all"
                )
            path, x, out = calls[-1]
            if not torch.equal(_first(seen["out"]), out):
                raise PruningError(
                    f"local_reconstruction.attention: output needs '{name}' to return its last Linear's output "
                    f"('{path}') as it is, and it does not; use attention: all"
                )
            inputs.append(store(x))
    finally:
        for h in hooks:
            h.remove()
    out = seen["out"]
    tail = tuple(None if _holds_tensor(v) else v for v in out[1:]) if isinstance(out, (tuple, list)) else None
    return _Replay(path, attn.get_submodule(path), inputs, tail)


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
    lr: float | list[float] = 1e-4,
    lr_scale: Literal["absolute", "weight_rms"] = "absolute",
    accumulate: int = 4,
    per_token: bool = False,
    mask_moves: bool = False,
    nm: tuple[int, int] | None = None,
    dense_weights: dict[torch.nn.Module, torch.Tensor] | None = None,
    col_scale: dict[torch.nn.Module, torch.Tensor] | None = None,
    seed: int = 0,
    measure: bool = False,
    guard: bool = False,
    trial: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    backward_dtype: torch.dtype = torch.float32,
    mlp_tokens: float = 1.0,
    attention: Literal["all", "output"] = "all",
    layer_name: str = "",
) -> list[tuple[str, BlockFit]]:
    """Fit the kept weights of ``layer``'s pruned Linears to the dense teacher, block by block.

    ``targets``: {block name: the dense block's outputs on the dense stream} (``dense_pass``).
    ``keep``: {Linear: bool (out, in), True = kept}; the layer's weights are pruned when this is
    called. ``write(module, w_out_in)`` stores a weight. ``measure``: also compute each block's
    output error before and after (two extra passes). ``lr`` (one or a list), ``trial``, ``guard``, ``compute_dtype`` and ``backward_dtype``: see
    ``fit_block``. ``mlp_tokens`` < 1: each training step of a block that holds the layer's MLP
    (``mlp_block``) runs the MLP on that fraction of the tokens and takes the loss there
    (``fit_block``'s ``token_fraction``); the attention block alone is fitted on every token.
    ``attention``: 'output' trains, of the attention's Linears (the layer's first child with a
    Linear, if it holds a pruned one and gets more than its hidden states), only its output
    projection; what that projection receives is computed once per window at the start
    (``attention_replay``; stored as the teacher's activations, or in the sparse stream's dtype)
    and reused. A block left with nothing to train is skipped.
    Returns the fit of every block. Run it with every calibration hook disabled
    (``compat.llmcompressor.disable_hooks``).
    """
    fits = []
    mlp = mlp_block(layer, set(keep)) if mlp_tokens < 1 else None
    attn = None  # attention: output -- the layer's first child with a Linear (its attention), if it holds a pruned one
    if attention == "output":
        attn = next(((n, c) for n, c in layer.named_children() if any(_has_matrix(m) for m in c.modules())), None)
        if attn is None or not any(m in keep for m in attn[1].modules()):
            attn = None
            logger.info(f"{layer_name}: attention: output changes nothing, the attention holds no pruned Linear")
    for bname, block in layer_blocks(layer, set(keep), granularity):
        ins = block_inputs(layer, block, teacher.calls, teacher.store)
        lin = {m: f"{n}.weight" for n, m in block.named_modules() if m in keep}
        fixed = {k: v.float() for k, v in (*block.named_parameters(), *block.named_buffers()) if v.is_floating_point()}

        holds_mlp = mlp is not None and any(m is mlp[1] for m in block.modules())

        def forward(params, b, tokens=None, block=block, ins=ins, by_name={k: m for m, k in lin.items()}, fixed=fixed,
                    replay=None, rel=""):  # fmt: skip
            full = dict(fixed)
            for k, w in params.items():  # (out, in) -> the module's stored layout (Conv1D: (in, out))
                full[k] = to_stored_layout(by_name[k], w)
            x, rest, kw = ins[b]
            if tokens is not None:
                tokens = tokens.to(x.device)
            module = block
            if replay is not None:  # attention: output -- what the output projection receives on this window, cached
                replay.window, module = b, (block if rel else replay)
            with (on_tokens(mlp[1], f"{layer_name}.{mlp[0]}", tokens) if tokens is not None else contextlib.nullcontext(),
                  _swapped(block, rel, replay) if replay is not None and rel else contextlib.nullcontext()):  # fmt: skip
                out = _first(torch.func.functional_call(module, full, (x.float(), *rest), _floating(kw, torch.float32)))
            return out if tokens is None else out.index_select(-2, tokens)

        rel = next((n for n, m in block.named_modules() if attn is not None and m is attn[1]), None)
        if rel is not None:  # the block holds the attention: freeze all but its output projection
            start = {k: weight_out_in(m).detach().float() for m, k in lin.items()}
            name = f"{layer_name}.{attn[0]}"
            store = teacher.store if teacher.storage_dtype is not None else (lambda t, d=ins[0][0].dtype: t.detach().to(d))
            replay = attention_replay(attn[1], name, lambda b, f=forward, p=start: f(p, b), len(ins), store)
            if replay is None:
                logger.info(f"{name}: attention: output not applied, it is called with its hidden states only")
            else:
                frozen = replay.frozen(fixed, rel)
                if ".".join(filter(None, (rel, replay.path, "weight"))) not in set(lin.values()):
                    logger.warning(f"{name}: attention: output trains only '{replay.path}', which is not pruned here; "
                                   "the attention's pruned Linears get no repair from the fit")  # fmt: skip
                lin = {m: k for m, k in lin.items() if k not in frozen}
                fixed = {k: v for k, v in fixed.items() if k not in frozen}
                forward = functools.partial(forward, by_name={k: m for m, k in lin.items()}, fixed=fixed, replay=replay,
                                            rel=rel)  # fmt: skip
            del start
        if not lin:  # attention: output on a block whose only pruned Linears are frozen
            logger.info(f"{layer_name}.{bname or '*'}: local reconstruction, nothing to train (attention: output)")
            continue

        fit = fit_block(
            forward, {k: weight_out_in(m).detach() for m, k in lin.items()}, {k: keep[m] for m, k in lin.items()},
            targets[bname], epochs=epochs, lr=lr, lr_scale=lr_scale, accumulate=accumulate, seed=seed, per_token=per_token,
            mask_moves=mask_moves, nm=nm, measure=measure, guard=guard, trial=trial,
            compute_dtype=compute_dtype, backward_dtype=backward_dtype, token_fraction=mlp_tokens if holds_mlp else 1.0,
            shadow={k: dense_weights[m] for m, k in lin.items()} if mask_moves else None,
            col_scale={k: col_scale[m] for m, k in lin.items()} if mask_moves else None,
            layer_name=f"{layer_name}.{bname}" if bname else layer_name,
        )  # fmt: skip
        for m, k in lin.items():
            write(m, fit.weights[k].to(weight_out_in(m).dtype))
            keep[m] = fit.keep[k]
        fits.append((bname or "layer", fit))
        what = (f"block output error {fit.loss_before:.4g} -> {fit.loss_after:.4g}" if measure else
                "training loss by epoch " + " -> ".join(f"{h:.4g}" for h in fit.history))
        if fit.probe_losses:  # several learning rates, or the guard: what each gave and what was kept
            rates = lr if isinstance(lr, list) else [lr]
            tried = ", ".join(f"{x:g}: {p:.4g}" for x, p in zip(rates, fit.probe_losses[int(guard):]))
            at = "after" if trial >= 1 or len(rates) < 2 else f"at {trial:g} of the fit with"
            what += (f", loss on {fit.held_out} window(s) not trained on " + (f"{fit.probe_losses[0]:.4g} before, " if guard else "")
                     + f"{at} lr {tried}; " + (f"kept the fit at lr {fit.lr:g} ({fit.probe_final:.4g} at its end)" if fit.lr else
                                               "kept the block as pruned"))
        logger.info(f"{layer_name}.{bname or '*'}: local reconstruction, {what}"
                    + (f", {fit.mask_changes} mask moves" if mask_moves else ""))  # fmt: skip
        forward = fit = None  # the replay's inputs (attention: output) go with the block
    return fits


class LocalReconstructor:
    """What a pruning modifier with ``local_reconstruction`` holds: the teacher stream, the decoder
    layer of every pruned Linear, and, for the decoder layer being calibrated, the dense pass's
    targets and the masks chosen. The modifier calls ``before`` / ``pruned`` / ``after`` from its
    ``before_layers`` / ``_prune_one`` / ``after_layers``."""

    def __init__(self, cfg: LocalReconstruction, nm: tuple[int, int], owner: str):
        self.cfg, self.nm, self.owner = cfg, nm, owner
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.teacher_dtype]
        self.teacher = TeacherStream(dtype)
        self.decoder_of: dict[torch.nn.Module, torch.nn.Module] = {}
        self.decoder_layers: dict[torch.nn.Module, str] = {}  # decoder layer -> name
        self._epoch: tuple | None = None  # (layer, dense outputs, block targets) while a layer is calibrated
        self._keep: dict[torch.nn.Module, torch.Tensor] = {}
        self._col_scale: dict[torch.nn.Module, torch.Tensor] = {}
        self._dense_weights: dict[torch.nn.Module, torch.Tensor] = {}

    def set_up(self, model: torch.nn.Module, pruned: dict[torch.nn.Module, str], sequential_targets) -> None:
        """Find the decoder layer (llm-compressor's sequential target) of every pruned Linear."""
        for name, layer in match_named_modules(model, sequential_targets):
            inside = [m for m in layer.modules() if m in pruned]
            self.decoder_of.update({m: layer for m in inside})
            if inside:
                self.decoder_layers[layer] = name
        outside = [name for m, name in pruned.items() if m not in self.decoder_of]
        if outside:
            raise PruningError(
                f"{self.owner}: local_reconstruction fits one decoder layer ({sequential_targets}) at a time, and "
                f"layer '{outside[0]}' is in none; leave it out with `ignore`"
            )

    def _layer(self, layers: dict[str, torch.nn.Module]) -> torch.nn.Module:
        decs = {self.decoder_of[m] for m in layers.values()}
        if len(decs) != 1 or self.teacher.layer not in decs:
            raise PruningError(
                f"{self.owner}: local_reconstruction needs llm-compressor's sequential pipeline with one "
                f"decoder layer per subgraph; {len(decs)} decoder layers were calibrated together"
                + ("" if self.teacher.layer in decs else " (the teacher saw none of them)")
            )
        return decs.pop()

    def before(self, layers: dict[str, torch.nn.Module]) -> None:
        """Before the layer is pruned: the dense layer's pass over the dense stream (its outputs
        are the next layer's dense inputs; its blocks' outputs are the targets)."""
        layer = self._layer(layers)
        blocks = layer_blocks(layer, set(layers.values()), self.cfg.granularity)
        with torch.no_grad(), disable_hooks():
            out, targets = dense_pass(layer, self.teacher.calls, self.teacher.dense_inputs(), blocks, self.teacher.store)
        self._epoch = (layer, out, targets)
        if self.cfg.mask_moves:
            self._dense_weights = {m: weight_out_in(m).detach().clone() for m in layers.values()}

    def pruned(self, module: torch.nn.Module, mask: torch.Tensor, input_sq_norm: torch.Tensor | None) -> None:
        """A Linear of the current layer was pruned (``mask``: True = pruned)."""
        if self._epoch is None or module not in self.decoder_of:  # e.g. an idle expert pruned at finalize
            return
        self._keep[module] = ~mask
        if input_sq_norm is not None:
            self._col_scale[module] = input_sq_norm.sqrt()

    def after(self, layers: dict[str, torch.nn.Module], write) -> None:
        """Fit the layer just pruned to the teacher; then the teacher stream moves on."""
        layer, out, targets = self._epoch
        keep = {m: self._keep.pop(m) for m in layers.values() if m in self._keep}
        cfg = self.cfg
        if keep:
            if cfg.mask_moves:  # a data-free score has no input norms: moves rank by |w|
                for m in keep:
                    self._col_scale.setdefault(m, torch.ones(weight_out_in(m).shape[1]))
            # no calibration hook may see the fit's passes; the layer's parameters are plain tensors meanwhile
            with torch.enable_grad(), disable_hooks(), suspend_offloading(layer):
                reconstruct_layer(
                    layer, self.teacher, targets, keep, write, granularity=cfg.granularity, epochs=cfg.epochs,
                    lr=cfg.lr, lr_scale=cfg.lr_scale, accumulate=cfg.batch_size, per_token=cfg.loss == "token", mask_moves=cfg.mask_moves,
                    nm=self.nm, dense_weights=self._dense_weights, col_scale=self._col_scale, seed=cfg.seed,
                    measure=cfg.log_error, guard=cfg.guard, trial=cfg.trial,
                    compute_dtype=getattr(torch, cfg.compute_dtype), backward_dtype=getattr(torch, cfg.backward_dtype),
                    mlp_tokens=cfg.mlp_tokens, attention=cfg.attention, layer_name=self.decoder_layers[layer],
                )  # fmt: skip
        self.teacher.advance(out)
        self._epoch, self._dense_weights, self._col_scale = None, {}, {}
