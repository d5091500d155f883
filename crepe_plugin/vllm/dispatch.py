"""Never slower than dense: choose, per weight shape and token count, the sparse or the dense GEMM.

At load time, for each distinct (out, in, dtype) of the 2:4 layers, both paths are timed over a
grid of token counts (``GRID``). Adjacent grid points with the same winner merge into one bucket,
so the boundaries come from the measurements; token counts between two grid points with different
winners (not measured) run dense. At run time a call with T tokens takes the decision of the first bucket whose bound
is >= T (the last bucket is open-ended). Sparse must beat dense by ``margin`` to be chosen.

Cost at load: for each shape, ``len(GRID)`` points x (warm-up + ``reps``) runs of each path. The
whole search shares ``budget_s`` seconds; points not measured once it is spent run dense (never
slower than dense by construction). ``spent_s`` says what it cost.

Torch only; the timer is injected (``cuda_timer`` on a GPU, a fake one in tests), so the decision
logic is tested without a GPU. The decision table is logged once per shape and kept in
``Dispatcher.decisions``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from loguru import logger

__all__ = ["GRID", "Bucket", "Decision", "Dispatcher", "decide", "cuda_timer"]

GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
Timer = Callable[[Callable[[], object]], float]  # runs fn, returns milliseconds per call


@dataclass(frozen=True)
class Bucket:
    max_tokens: int | None  # None: every larger token count
    sparse: bool
    sparse_ms: float | None  # measured at the bucket's grid points (mean); None if not measured
    dense_ms: float | None


@dataclass
class Decision:
    shape: tuple
    buckets: list[Bucket]

    def use_sparse(self, tokens: int) -> bool:
        for b in self.buckets:
            if b.max_tokens is None or tokens <= b.max_tokens:
                return b.sparse
        return False

    @property
    def any_sparse(self) -> bool:
        return any(b.sparse for b in self.buckets)

    @property
    def all_sparse(self) -> bool:
        return all(b.sparse for b in self.buckets)

    def table(self) -> str:
        rows, lo = [], 1
        for b in self.buckets:
            hi = "inf" if b.max_tokens is None else str(b.max_tokens)
            ratio = f"{b.dense_ms / b.sparse_ms:.2f}x" if b.sparse_ms and b.dense_ms else "not measured"
            rows.append(f"tokens {lo}-{hi}: {'sparse' if b.sparse else 'dense'} (sparse speed-up {ratio})")
            lo = (b.max_tokens or 0) + 1
        return f"{self.shape}: " + "; ".join(rows)


def decide(timings: dict[int, tuple[float | None, float | None]], grid=GRID, margin: float = 1.02) -> list[Bucket]:
    """Buckets from per-grid-point (sparse_ms, dense_ms); an unmeasured point goes dense."""
    wins = []
    for t in grid:
        s, d = timings.get(t, (None, None))
        wins.append((t, s is not None and d is not None and s * margin < d, s, d))
    buckets: list[Bucket] = []
    run: list = []
    for i, w in enumerate(wins):
        run.append(w)
        last = i == len(wins) - 1
        if last or wins[i + 1][1] != w[1]:
            ss = [x[2] for x in run if x[2] is not None]
            ds = [x[3] for x in run if x[3] is not None]
            # unmeasured token counts between two grid points with different winners run dense
            bound = None if last else (wins[i + 1][0] - 1 if not w[1] else w[0])
            buckets.append(Bucket(bound, w[1], sum(ss) / len(ss) if ss else None, sum(ds) / len(ds) if ds else None))
            run = []
    return buckets


@dataclass
class Dispatcher:
    """Measures each shape once and remembers its decision."""

    timer: Timer
    grid: tuple[int, ...] = GRID
    budget_s: float = 60.0
    margin: float = 1.02
    clock: Callable[[], float] = time.perf_counter
    decisions: dict[tuple, Decision] = field(default_factory=dict)
    spent_s: float = 0.0

    def decision(self, shape: tuple, sparse_fn: Callable[[int], Callable[[], object]],
                 dense_fn: Callable[[int], Callable[[], object]]) -> Decision:  # fmt: skip
        """``sparse_fn(T)`` / ``dense_fn(T)`` return a zero-argument call of that path at T tokens."""
        if shape in self.decisions:
            return self.decisions[shape]
        timings: dict[int, tuple[float, float]] = {}
        for t in self.grid:
            if self.spent_s >= self.budget_s:
                logger.warning(f"crepe_sparse: dispatch budget of {self.budget_s:.0f} s spent; {shape} at "
                               f">= {t} tokens runs dense (not measured)")  # fmt: skip
                break
            t0 = self.clock()
            timings[t] = (self.timer(sparse_fn(t)), self.timer(dense_fn(t)))
            self.spent_s += self.clock() - t0
        d = Decision(shape, decide(timings, self.grid, self.margin))
        self.decisions[shape] = d
        logger.info(f"crepe_sparse dispatch {d.table()}")
        return d


def cuda_timer(warmup: int = 3, reps: int = 10) -> Timer:
    """Milliseconds per call with CUDA events (synchronised), after ``warmup`` calls."""
    import torch

    def timer(fn) -> float:
        for _ in range(warmup):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    return timer
