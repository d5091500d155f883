"""Input statistics of linear layers: the only place they are computed. Pure torch (+ safetensors
for the PHO cache).

- ``InputNormStats``: mean over samples of ||X_j||^2 (Wanda's and RIA's ``scaler_row``), what
  every score reads;
- ``InputMomentStats``: plus the per-token mean and variance (DSnoT);
- ``HessianStats``: H = (2 / samples) X X^T (SparseGPT's scaling), for reconstruction, adaptive
  mask selection and the PHO proxies; ``diag(H) / 2`` is ``InputNormStats``' value;
- ``gather_stats``: one hooked forward pass over a model, norms for every given layer and Gram
  matrices for some (shared by layers that read the same tensor), as ``CalibStats``.

Every accumulator takes a layer's input as (batch, seq, in) or (seq, in); a sample is one
sequence, and ``_tokens`` is the one flattening prelude they share.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import CalibrationError, _where
from .files import atomic_write
from .layers import weight_out_in

__all__ = ["InputNormStats", "InputMomentStats", "HessianStats", "CalibStats", "gather_stats"]


def _tokens(inp: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """(tokens x features float32 on ``device``, number of samples) of a layer input. An input
    with no token (an expert the router sent nothing) counts as no sample."""
    if inp.dim() == 2:
        inp = inp.unsqueeze(0)
    x = inp.detach().reshape(-1, inp.shape[-1]).to(device, torch.float32)
    return x, (inp.shape[0] if x.shape[0] else 0)


class InputNormStats:
    """Running ``input_sq_norm``: the mean over calibration samples of ||X_j||^2.

    A sample is one sequence; its squared norm for feature j sums x_j^2 over its tokens
    (Wanda's and RIA's ``scaler_row``). Accumulated in float64 whatever the input dtype,
    so fp16/bf16 models get fp32-accurate statistics.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.sum_sq = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.num_samples = 0

    def update(self, inp: torch.Tensor) -> None:
        """inp: (batch, seq, in) or (seq, in) activations entering the layer."""
        x, batch = _tokens(inp, self.sum_sq.device)
        self._add(x)
        self.num_samples += batch

    def _add(self, x: torch.Tensor) -> None:
        self.sum_sq += x.pow(2).sum(dim=0, dtype=torch.float64)

    def value(self, layer_name: str | None = None) -> torch.Tensor:
        """float32 vector of mean squared input norms."""
        if self.num_samples == 0:
            raise CalibrationError(
                f"{_where(layer_name)}: received no calibration samples; check the calibration "
                "dataset (empty?) and that the layer is reached in the forward pass"
            )
        return (self.sum_sq / self.num_samples).to(torch.float32)


class InputMomentStats(InputNormStats):
    """``InputNormStats`` plus the per-token mean and variance of every input feature
    (what DSnoT's expected-error criterion needs). float64 accumulation."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        super().__init__(in_features, device)
        self.sum = torch.zeros(in_features, dtype=torch.float64, device=device)
        self.tokens = 0

    def _add(self, x: torch.Tensor) -> None:
        super()._add(x)
        self.sum += x.sum(dim=0, dtype=torch.float64)
        self.tokens += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).to(torch.float32)

    def var(self) -> torch.Tensor:
        m = self.sum / max(self.tokens, 1)
        return (self.sum_sq / max(self.tokens, 1) - m * m).clamp_min(0).to(torch.float32)


class HessianStats:
    """Running H = (2 / n_samples) * sum over tokens of x x^T, in float32 (SparseGPT's scaling).

    ``diag(H) / 2`` equals the input statistic of the scores (mean over samples of ||X_j||^2).
    """

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_samples = 0

    def update(self, inp: torch.Tensor) -> None:
        x, batch = _tokens(inp, self.H.device)
        if not batch:
            return
        self.H.mul_(self.num_samples / (self.num_samples + batch))
        self.num_samples += batch
        x = x * (2.0 / self.num_samples) ** 0.5
        self.H.addmm_(x.t(), x)

    def input_sq_norm(self) -> torch.Tensor:
        return torch.diagonal(self.H) / 2


class CalibStats:
    """Input statistics per layer name; Gram matrices for the sampled layers."""

    def __init__(self, sq_norms: dict[str, torch.Tensor], grams: dict[str, torch.Tensor], gram_of: dict[str, str], num_samples: int, meta: dict | None = None):
        self.sq_norms = sq_norms
        self.grams = grams
        self.gram_of = gram_of
        self.num_samples = num_samples
        self.meta = meta or {}

    def H(self, name: str) -> torch.Tensor | None:
        key = self.gram_of.get(name)
        return None if key is None else self.grams[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.sq_norms.values(), *self.grams.values()))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"norm/{k}": v.contiguous() for k, v in self.sq_norms.items()}
        tensors.update({f"gram/{k}": v.contiguous() for k, v in self.grams.items()})
        meta = {"gram_of": json.dumps(self.gram_of), "num_samples": str(self.num_samples), "meta": json.dumps(self.meta)}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # never a half-written cache

    @classmethod
    def load(cls, path: str | Path) -> "CalibStats":
        from safetensors import safe_open

        norms, grams = {}, {}
        try:
            with safe_open(str(path), "pt") as f:
                md = f.metadata() or {}
                for k in f.keys():
                    kind, _, name = k.partition("/")
                    (norms if kind == "norm" else grams)[name] = f.get_tensor(k)
            return cls(norms, grams, json.loads(md["gram_of"]), int(md["num_samples"]), json.loads(md.get("meta", "{}")))
        except Exception as e:  # corrupt or foreign file: say which
            raise CalibrationError(f"cannot read the PHO statistics cache {path}: {e}; delete it to recompute") from e


@torch.no_grad()
def gather_stats(
    model: torch.nn.Module,
    batches: Iterable[dict | torch.Tensor],
    modules: dict[str, torch.nn.Module],
    gram_names: Iterable[str] = (),
    device: torch.device | str | None = None,
    meta: dict | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> CalibStats:
    """Run the dense model over ``batches`` once and collect the statistics (``progress``
    wraps the batches, e.g. in a tqdm bar)."""
    want_gram = set(gram_names)
    norms: dict[str, InputNormStats] = {}
    grams: dict[str, HessianStats] = {}
    gram_of: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # first batch: (input tensor, first layer that read it)
    hooks = []

    def hook(name):
        def fn(module, args, _out):
            x = args[0]
            if name not in norms:
                norms[name] = InputNormStats(weight_out_in(module).shape[1], device=x.device)
            norms[name].update(x)
            if name in want_gram:
                if name not in gram_of:  # first batch: layers reading the very same tensor share H
                    # (held in `seen`, so its memory cannot be reused by another tensor meanwhile)
                    gram_of[name] = next((o for t, o in seen if t is x), name)
                    if gram_of[name] == name:
                        seen.append((x, name))
                owner = gram_of[name]
                if owner == name:
                    if owner not in grams:
                        grams[owner] = HessianStats(weight_out_in(module).shape[1], device=x.device)
                    grams[owner].update(x)

        return fn

    for name, mod in modules.items():
        hooks.append(mod.register_forward_hook(hook(name)))
    n = 0
    try:
        model.eval()
        for batch in progress(list(batches)):
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            if device is not None:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model(**batch)
            n += int(batch["input_ids"].shape[0]) if batch["input_ids"].dim() > 1 else 1
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    missing = [k for k in modules if k not in norms]
    if n == 0:
        raise CalibrationError("the calibration data is empty")
    if missing:
        raise CalibrationError(f"layer '{missing[0]}' (and {len(missing) - 1} more) received no calibration data")
    stats = CalibStats(
        {k: v.value(k) for k, v in norms.items()},
        {k: v.H for k, v in grams.items()},
        gram_of,
        n,
        meta,
    )
    return stats
