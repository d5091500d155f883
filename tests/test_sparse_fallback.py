"""The sparse kernel module's CPU behaviour: every layer stays dense, untouched, with a reason.
(The cuSPARSELt path itself: tests/gpu, run on a CUDA machine.)"""

import torch

from crepe_plugin.core.masks import nm_mask
from crepe_plugin.vllm.sparse import fallback_reason, prepare_layer, quantize_per_token


def test_cpu_layer_is_left_dense_with_a_reason():
    lin = torch.nn.Linear(64, 32)
    with torch.no_grad():
        lin.weight.mul_(nm_mask(lin.weight.abs(), 2, 4))
    before = lin.weight.detach().clone()
    reason = prepare_layer(lin)
    assert reason.startswith("CPU") and lin.crepe_sparse is False
    assert torch.equal(lin.weight, before)
    assert fallback_reason(before) == reason


def test_per_token_quantization_round_trips():
    x = torch.randn(5, 64) * torch.arange(1, 6).unsqueeze(1)
    for dtype, tol in ((torch.int8, 1 / 127), (torch.float8_e4m3fn, 1 / 16)):
        q, s = quantize_per_token(x, dtype)
        assert q.dtype == dtype and s.shape == (5, 1)
        back = q.float() * s
        assert ((back - x).abs().amax(1) <= tol * x.abs().amax(1) + 1e-6).all()
        assert torch.allclose(back.abs().amax(1), x.abs().amax(1), rtol=1e-2)


def _rank_shards(w: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """What vLLM's RowParallelLinear loads on each rank: an equal slice of the inputs."""
    width = w.shape[1] // tp
    return [w[:, r * width : (r + 1) * width] for r in range(tp)]


def test_tp_shard_reason_says_exactly_when_row_parallel_shards_stay_2of4():
    """Column-parallel layers keep whole rows; row-parallel ones cut the inputs. The reason is None
    exactly where every rank's slice of a (random) 2:4 weight is itself 2:4."""
    from crepe_plugin.core.masks import is_nm
    from crepe_plugin.vllm.sparse import tp_shard_reason

    g = torch.Generator().manual_seed(0)
    for in_f, tp in [(256, 2), (264, 2), (1536, 4), (576, 3), (4096, 8), (260, 2), (520, 4), (132, 3), (4104, 2)]:
        w = torch.randn(48, in_f, generator=g)
        w = w * ~nm_mask(w.abs(), 2, 4)  # keep the 2 largest of each 4
        assert is_nm(w, 2, 4)
        reason = tp_shard_reason(in_f, in_f // tp)
        shards_2of4 = all(is_nm(s, 2, 4) for s in _rank_shards(w, tp))
        assert (reason is None) == shards_2of4, (in_f, tp, reason)
        if reason is not None:
            assert f"{in_f // tp} of its {in_f} inputs" in reason and "dense kernel" in reason
    assert tp_shard_reason(260, 260) is None  # not split (column-parallel, or tp 1)
