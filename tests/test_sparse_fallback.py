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
