"""The 2:4 dispatcher (crepe_plugin.vllm.dispatch) with a fake timer: buckets come from the
measurements, dense is chosen wherever it is faster, the load-time cost is bounded, and each
shape is measured and logged once. The GPU side (cuda_timer, cuSPARSELt) runs in tests/gpu."""

import pytest
import torch

from crepe_plugin.vllm.dispatch import GRID, Dispatcher, decide


def _fake(costs):
    """A timer that reads the cost a probe carries, and probes that carry costs(t)."""
    calls = []

    def timer(fn):
        calls.append(fn)
        return fn()

    def probes(which):
        return lambda t: (lambda: costs(which, t))

    return timer, probes, calls


def crossover(which, t):  # dense wins small token counts, sparse from 16 on (1.67x at large t)
    return (0.6 * t + 10) if which == "sparse" else (t + 5.0)


def test_buckets_follow_the_measured_crossover():
    timer, probes, _ = _fake(crossover)
    d = Dispatcher(timer).decision((4096, 4096, "bf16"), probes("sparse"), probes("dense"))
    assert [b.sparse for b in d.buckets] == [False, True]
    assert d.buckets[0].max_tokens == 15 and d.buckets[1].max_tokens is None  # 8 lost, 16 won: 9-15 stay dense
    assert not d.use_sparse(1) and not d.use_sparse(15) and d.use_sparse(16) and d.use_sparse(100_000)
    assert "tokens 1-15: dense" in d.table() and "tokens 16-inf: sparse" in d.table()


def test_dense_everywhere_and_a_margin():
    timer, probes, _ = _fake(lambda which, t: 1.0 if which == "sparse" else 1.01)  # 1% faster: under the margin
    d = Dispatcher(timer, margin=1.02).decision((64, 64, "bf16"), probes("sparse"), probes("dense"))
    assert not d.any_sparse and not d.use_sparse(4096)
    assert [(b.max_tokens, b.sparse) for b in decide({t: (1.0, 2.0) for t in GRID})] == [(None, True)]
    timer, probes, _ = _fake(lambda which, t: 1.0 if which == "sparse" else 2.0)  # sparse twice as fast everywhere
    d = Dispatcher(timer).decision((64, 64, "bf16"), probes("sparse"), probes("dense"))
    assert d.all_sparse and d.use_sparse(1) and d.use_sparse(100_000)


def test_sparse_then_dense_then_sparse():
    costs = {t: ((1.0, 2.0) if t <= 4 or t >= 256 else (2.0, 1.0)) for t in GRID}
    b = decide(costs)
    assert [(x.max_tokens, x.sparse) for x in b] == [(4, True), (255, False), (None, True)]


def test_load_cost_is_bounded_and_unmeasured_points_run_dense():
    timer, probes, calls = _fake(crossover)
    now = [0.0]

    def clock():
        now[0] += 10.0  # each grid point costs 10 s of (fake) wall time
        return now[0]

    disp = Dispatcher(timer, budget_s=35.0, clock=clock)
    d = disp.decision((8, 8, "bf16"), probes("sparse"), probes("dense"))
    assert len(calls) == 2 * 4 and disp.spent_s == pytest.approx(40.0)  # 4 points, then the budget is spent
    assert not d.any_sparse  # 1, 2, 4, 8 measured (dense wins); the rest not measured: dense
    disp.decision((8, 8, "bf16"), probes("sparse"), probes("dense"))
    assert len(calls) == 8  # one measurement per shape


def test_decision_logged_once_per_shape():
    from loguru import logger

    lines = []
    sink = logger.add(lines.append, format="{message}", level="INFO")
    try:
        timer, probes, _ = _fake(crossover)
        disp = Dispatcher(timer)
        for shape in [(1, 1, "a"), (1, 1, "a"), (2, 2, "a")]:
            disp.decision(shape, probes("sparse"), probes("dense"))
    finally:
        logger.remove(sink)
    assert sum("crepe_sparse dispatch" in x for x in lines) == 2


def test_apply_layer_takes_dense_where_dense_was_faster(monkeypatch):
    """A prepared layer runs F.linear on its dense weight for dense buckets, the sparse kernel else."""
    from crepe_plugin.vllm import sparse

    timer, probes, _ = _fake(crossover)
    layer = torch.nn.Linear(16, 8, bias=False)
    dense = layer.weight.detach().clone()
    layer.crepe_decision = Dispatcher(timer).decision((8, 16, "f32"), probes("sparse"), probes("dense"))
    layer.crepe_dense_weight, layer.crepe_out_features, layer.crepe_algs = dense, 8, [0]
    layer.weight = torch.nn.Parameter(torch.zeros(8, 4), requires_grad=False)  # stands for the packed weight
    called = []
    monkeypatch.setattr(sparse, "sparse_linear", lambda x, *a: called.append(x.shape) or torch.zeros(*x.shape[:-1], 8))
    x = torch.randn(1, 3, 16)  # 3 tokens: dense bucket
    assert torch.allclose(sparse.apply_layer(layer, x), x @ dense.t()) and not called
    sparse.apply_layer(layer, torch.randn(2, 64, 16))  # 128 tokens: sparse bucket
    assert called == [torch.Size([2, 64, 16])]
