"""vLLM (CPU) serves the model shapes of tests/test_model_shapes.py: tiny Mixtral and Qwen3-MoE
pruned 2:4 (experts on vLLM's own fused-MoE kernels), and the MLP-only 2:4 checkpoint (only the
MLP layers claimed by the plugin)."""

import pytest

from .conftest import check, prune, prune_moe


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_pruned_moe_serves_with_the_tokens_of_transformers(arch, workdir):
    res, r = check(prune_moe(workdir, arch), "--no-server")
    log = r.stdout + r.stderr
    assert res and res["structure_ok"] and res["quantization"] == "crepe_sparse", log[-4000:]
    assert res["vllm_tokens"] == res["transformers_tokens"]
    assert "crepe_sparse: fused-MoE expert layers stay on vLLM's own MoE kernels" in log
    assert r.returncode == 0


def test_mlp_only_checkpoint_claims_only_the_mlp_layers(workdir):
    res, r = check(prune(workdir, "crepe_2of4_mlp_only.yaml"), "--no-server")
    log = r.stdout + r.stderr
    assert res and res["structure_ok"] and res["quantization"] == "crepe_sparse", log[-4000:]
    assert res["vllm_tokens"] == res["transformers_tokens"]
    claimed = [line.split("2:4 layer ")[1].split(" on the dense path")[0] for line in log.splitlines()
               if "2:4 layer " in line and " on the dense path" in line]  # fmt: skip
    # vLLM fuses gate/up into gate_up_proj; attention (qkv_proj, o_proj) is not claimed
    assert sorted({c.rsplit(".", 1)[1] for c in claimed}) == ["down_proj", "gate_up_proj"], claimed
    assert len(claimed) == 2 * 2


def test_vision_language_checkpoint_is_refused_in_one_line_here(workdir):
    """vLLM's vision-language models need torchvision, which this CPU environment cannot carry
    (it fails to import beside torch 2.13.0): serve-check says so in one line, exit 1."""
    import subprocess

    from .conftest import COMPRESS_PY, ROOT, SHARED

    dense, out = workdir / "tiny-llava", workdir / "tiny-llava-2of4"
    subprocess.run([COMPRESS_PY, "-c", f"from crepe_plugin.testing import save_tiny_llava as s; s({str(dense)!r})"], check=True)
    subprocess.run([COMPRESS_PY, "-m", "crepe_plugin.cli", "prune", str(dense), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"),
                    "--calib", str(SHARED / "wikitext2" / "wiki.valid.tokens.txt"), "--out", str(out), "--num-samples", "4",
                    "--seqlen", "64"], check=True)  # fmt: skip
    res, r = check(out, "--no-server")
    assert res is None and r.returncode == 1
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "vision-language model" in err[0] and "torchvision" in err[0], r.stderr[-2000:]
