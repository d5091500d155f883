"""Local reconstruction against a dense teacher stream (issue 22): the fit lowers the block's error
against the dense teacher, masks stay fixed (or stay exactly N:M when they move), the teacher
stream is the dense model's own forward pass, and quantization stages after it keep 2:4."""

import copy

import pytest
import torch
from pydantic import ValidationError

import crepe_plugin  # noqa: F401
from crepe_plugin.checkpoint.verify import verify_checkpoint
from crepe_plugin.core import is_nm, nm_mask
from crepe_plugin.core.local import LocalReconstruction, fit_block, low_precision_linear_grads, nm_keep_from_scores
from crepe_plugin.testing import save_tiny_llama, tiny_tokenizer

from .conftest import calib_dataset

pytest.importorskip("llmcompressor")
from llmcompressor import oneshot  # noqa: E402

LOCAL = "      local_reconstruction:\n        epochs: {epochs}\n        lr: {lr}\n        mask_moves: {moves}\n"


def _recipe(epochs=2, lr=1e-3, moves=False, extra=""):
    return ("sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n"
            + LOCAL.format(epochs=epochs, lr=lr, moves=str(moves).lower()) + extra)  # fmt: skip


def _linear_problem(seed=0, rows=16, cols=32, batches=6, tokens=24):
    """A 2:4-masked linear block whose inputs (the sparse stream) differ from the dense stream's."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    dense_x = [torch.randn(tokens, cols, generator=g) for _ in range(batches)]
    sparse_x = [x + 0.3 * torch.randn(x.shape, generator=g) for x in dense_x]
    targets = [x @ w.T for x in dense_x]  # the dense block's output on the dense stream
    keep = ~nm_mask(w.abs(), 2, 4)
    pruned = w * keep

    def forward(params, b):
        return sparse_x[b] @ params["w"].T

    return w, pruned, keep, targets, forward


def test_fit_lowers_the_error_against_the_dense_teacher_and_keeps_the_mask():
    w, pruned, keep, targets, forward = _linear_problem()
    fit = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=20, lr=1e-2)
    # the optimum of the fixed mask, row by row: least squares over each row's kept inputs
    x = torch.cat([forward({"w": torch.eye(w.shape[1])}, b) for b in range(len(targets))])  # the sparse stream
    y = torch.cat(targets)
    cols = keep.nonzero()[:, 1].reshape(w.shape[0], -1)
    sol = torch.linalg.lstsq(x[:, cols].permute(1, 0, 2), y.T.unsqueeze(-1)).solution.squeeze(-1)
    best = torch.zeros_like(w).scatter_(1, cols, sol)
    optimum = float(((x @ best.T - y) ** 2).mean())
    assert optimum < fit.loss_after < fit.loss_before
    assert fit.loss_after - optimum < 0.2 * (fit.loss_before - optimum)  # most of the way to the optimum
    out = fit.weights["w"]
    assert torch.equal(out != 0, keep)  # the same positions are kept
    assert torch.equal(fit.keep["w"], keep) and fit.mask_changes == 0
    assert is_nm(out, 2, 4)
    assert not torch.equal(out, pruned)  # the kept weights moved


def test_pruned_weights_are_exactly_zero_in_every_training_step():
    # the fit feeds its weights to the block unmasked: Adam must never move a pruned one, even when
    # the start it is given carries values there and the learning rate is large
    w, pruned, keep, targets, forward = _linear_problem(seed=3)
    seen = []

    def watching(params, b):
        if params["w"].requires_grad:  # a training step, not a measurement
            seen.append(params["w"].detach()[~keep].abs().max())
        return forward(params, b)

    fit = fit_block(watching, {"w": w}, {"w": keep}, targets, epochs=5, lr=0.3, lr_scale="absolute")
    assert len(seen) == 5 * len(targets)
    assert all(float(v) == 0.0 for v in seen)
    assert torch.equal(fit.weights["w"] != 0, keep) and fit.loss_after < fit.loss_before


def test_mask_moves_stay_exactly_n_of_m_and_do_move():
    """Started from a bad mask (each group keeps its two smallest weights), moves re-choose groups."""
    w, _, _, targets, forward = _linear_problem(seed=1)
    bad_keep = ~nm_mask(-w.abs(), 2, 4)
    fit = fit_block(forward, {"w": w * bad_keep}, {"w": bad_keep}, targets, epochs=4, lr=1e-2, mask_moves=True,
                    nm=(2, 4), shadow={"w": w}, col_scale={"w": torch.ones(w.shape[1])})  # fmt: skip
    out, kept = fit.weights["w"], fit.keep["w"]
    assert is_nm(out, 2, 4) and torch.all(out[~kept] == 0)
    assert torch.equal(kept.reshape(-1, 4).sum(-1), torch.full((kept.numel() // 4,), 2))
    assert fit.mask_changes > 0 and not torch.equal(kept, bad_keep)
    assert fit.loss_after < fit.loss_before


def test_nm_keep_from_scores_keeps_the_top_of_each_group():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_keep_from_scores(s, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


def test_settings_are_validated():
    with pytest.raises(ValueError):
        LocalReconstruction(epochs=0)
    with pytest.raises(ValueError):
        LocalReconstruction(granularity="head")
    with pytest.raises(ValueError):
        LocalReconstruction(lr=0.0)


def _run(model, recipe, out=None):
    return oneshot(model=model, tokenizer=tiny_tokenizer(), dataset=calib_dataset(8), recipe=recipe,
                   num_calibration_samples=8, max_seq_length=64, output_dir=str(out) if out else None)  # fmt: skip


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_teacher_stream_equals_a_plain_dense_forward(monkeypatch, tmp_path):
    """The dense activations the teacher hands each layer are the dense model's own hidden states."""
    from crepe_plugin.modifiers.teacher import TeacherStream

    model = _load(save_tiny_llama(tmp_path / "m", layers=3, seed=3))
    dense = copy.deepcopy(model)
    seen, first = [], []
    orig_advance, orig_capture = TeacherStream.advance, TeacherStream.capture

    def advance(self, outputs):
        seen.append([o.clone() for o in outputs])
        orig_advance(self, outputs)

    def capture(self, layer, args, kwargs):
        orig_capture(self, layer, args, kwargs)
        if len(seen) == 0:
            first.append(self.calls[-1])

    monkeypatch.setattr(TeacherStream, "advance", advance)
    monkeypatch.setattr(TeacherStream, "capture", capture)
    _run(model, _recipe(epochs=1))
    assert len(seen) == 3 and len(first) == 8
    with torch.no_grad():
        for b, call in enumerate(first):
            h = call.hidden
            for i, layer in enumerate(dense.model.layers):
                out = layer(h, *call.args, **call.kwargs)
                h = out[0] if isinstance(out, tuple) else out
                torch.testing.assert_close(seen[i][b], h, rtol=1e-5, atol=1e-5)
    # and the pruned model's layers differ from it (the sparse stream is not the teacher's)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, dense.model.layers[0].mlp.up_proj.weight)


def _block_error(model, dense, ids):
    """Each decoder layer's output error on the pruned model's inputs against the dense layer on dense inputs."""
    hs = model(ids, output_hidden_states=True).hidden_states
    hd = dense(ids, output_hidden_states=True).hidden_states
    errs = []
    for i, (ls, ld) in enumerate(zip(model.model.layers, dense.model.layers)):
        pos = model.model.rotary_emb(hs[i], torch.arange(ids.shape[1])[None])
        out_s = ls(hs[i], position_embeddings=pos, attention_mask=None)
        out_d = ld(hd[i], position_embeddings=pos, attention_mask=None)
        out_s, out_d = (o[0] if isinstance(o, tuple) else o for o in (out_s, out_d))
        errs.append(float(((out_s - out_d) ** 2).mean()))
    return errs


def test_reconstruction_lowers_each_layers_error_and_keeps_the_masks(tmp_path, monkeypatch):
    from crepe_plugin.modifiers import CRePEPruningModifier

    base = _load(save_tiny_llama(tmp_path / "m", layers=2, seed=5))
    dense = copy.deepcopy(base)
    plain, local = copy.deepcopy(base), copy.deepcopy(base)
    _run(plain, "sparsity_stage:\n  sparsity_modifiers:\n    CRePEPruningModifier:\n      mask_structure: '2:4'\n")
    masks, before = {}, CRePEPruningModifier.after_layers

    def after_layers(self, layers):  # the masks as the scores chose them, before the fit
        masks.update({name: (m.weight == 0).clone() for name, m in layers.items()})
        before(self, layers)

    monkeypatch.setattr(CRePEPruningModifier, "after_layers", after_layers)
    _run(local, _recipe(epochs=3, lr=1e-3))
    ids = tiny_tokenizer()(calib_dataset(8)["text"][0], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        e_plain, e_local = _block_error(plain, dense, ids), _block_error(local, dense, ids)
    assert all(l < p for l, p in zip(e_local, e_plain)), (e_local, e_plain)
    fitted = {n: m for n, m in local.named_modules() if n in masks}
    assert len(fitted) == 14
    for n, m in fitted.items():
        assert torch.equal(m.weight == 0, masks[n]), n  # masks unchanged by the fit (mask moves off)
    # the first layer sees the same inputs in both runs: same mask, different kept values
    q0 = "model.layers.0.self_attn.q_proj"
    assert torch.equal(plain.get_submodule(q0).weight == 0, masks[q0])
    assert not torch.equal(plain.get_submodule(q0).weight, fitted[q0].weight)


def test_mask_moves_in_a_recipe_give_exact_2of4(tmp_path):
    model = save_tiny_llama(tmp_path / "m")
    out = tmp_path / "o"
    _run(str(model), _recipe(epochs=3, lr=1e-2, moves=True), out)
    rep = verify_checkpoint(out)
    assert rep.ok, rep.errors
    assert all(l.nm_ok for l in rep.layers if l.recorded) and len([l for l in rep.layers if l.recorded]) == 14


@pytest.mark.parametrize("scheme,fmt", [("FP8_DYNAMIC", "fp8"), ("W8A8", "int8")])
def test_quantization_after_local_reconstruction_keeps_exact_2of4(tmp_path, scheme, fmt):
    model = save_tiny_llama(tmp_path / "m", hidden=128, intermediate=256, heads=2, kv_heads=1)
    q = f"q_stage:\n  q_modifiers:\n    QuantizationModifier:\n      scheme: {scheme}\n      targets: ['Linear']\n      ignore: ['lm_head']\n"
    out = tmp_path / "o"
    _run(str(model), _recipe(epochs=1).replace("sparsity_stage", "sparsity_stage", 1) + q, out)
    rep = verify_checkpoint(out)
    assert rep.ok, rep.errors
    pruned = [l for l in rep.layers if l.recorded]
    assert len(pruned) == 14 and all(l.nm_ok for l in pruned) and {l.fmt for l in pruned} == {fmt}


def test_recipe_refuses_mask_moves_without_n_of_m():
    from crepe_plugin.modifiers import CRePEPruningModifier

    with pytest.raises(ValueError, match="mask_moves"):
        CRePEPruningModifier(mask_structure="0:0", sparsity=0.5, local_reconstruction={"mask_moves": True})


@pytest.mark.parametrize("log_error", [False, True])
def test_log_error_measures_the_block_error_only_when_asked(tmp_path, log_error):
    """Off (the default), the fit logs its training loss and runs no extra pass; on, it logs the
    block's output error before and after, and the error after is the lower."""
    from loguru import logger

    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", filter=lambda r: "local reconstruction" in r["message"])
    try:
        extra = "        log_error: true\n" if log_error else ""
        _run(str(save_tiny_llama(tmp_path / "m", layers=2, seed=3)), _recipe(epochs=2, lr=1e-3, extra=extra))
    finally:
        logger.remove(sink)
    assert len(lines) == 2  # one per decoder layer (granularity: layer)
    for line in lines:
        if log_error:
            before, after = (float(x) for x in line.split("block output error ")[1].split(" -> "))
            assert after < before, line
        else:
            assert "training loss by epoch" in line and line.count(" -> ") == 1, line  # two epochs


def test_weight_rms_lr_scale_is_invariant_to_the_weights_scale():
    """With ``lr_scale: weight_rms`` the same setting takes the same relative step at any weight
    scale: scaling the weights and the teacher's outputs by c scales the fit by c. With
    ``absolute`` it does not (the step is the same size on small weights as on large ones)."""
    w, pruned, keep, targets, forward = _linear_problem(seed=4)
    c = 0.05
    small_targets = [t * c for t in targets]
    fits = {}
    for scale in ("weight_rms", "absolute"):
        big = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=3, lr=1e-2, lr_scale=scale, measure=False)
        small = fit_block(forward, {"w": pruned * c}, {"w": keep}, small_targets, epochs=3, lr=1e-2, lr_scale=scale,
                          measure=False)  # fmt: skip
        fits[scale] = (big.weights["w"], small.weights["w"])
    big, small = fits["weight_rms"]
    assert torch.allclose(small, big * c, rtol=1e-4, atol=1e-7)
    big, small = fits["absolute"]
    assert not torch.allclose(small, big * c, rtol=1e-2, atol=1e-5)
    with pytest.raises(ValueError):
        LocalReconstruction(lr_scale="per_row")


def test_several_learning_rates_keep_the_best_fit_and_the_guard_keeps_the_start():
    """A learning rate too large for the block raises its error. Given several, the block keeps
    the fit with the lowest loss on the held-out batches, whatever their order; with the guard,
    the start competes too, so the block is never returned worse than it came."""
    w, pruned, keep, targets, forward = _linear_problem(seed=2)
    plain = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=1, lr=0.5)
    assert plain.loss_after > plain.loss_before and plain.probe_losses == []  # the large step raises the error
    assert plain.held_out == 0 and plain.steps == len(targets)  # one rate, no guard: every batch is trained on
    both = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=1, lr=[0.5, 0.05])
    assert both.lr == 0.05 and both.probe_losses[0] > both.probe_losses[1]
    assert both.loss_after < both.loss_before and both.held_out == 1 and both.steps == len(targets) - 1
    assert torch.all(both.weights["w"][~keep] == 0) and is_nm(both.weights["w"], 2, 4)
    swapped = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=1, lr=[0.05, 0.5])
    assert swapped.lr == 0.05 and torch.equal(swapped.weights["w"], both.weights["w"])
    hopeless = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=1, lr=[20.0, 2.0], guard=True)
    assert hopeless.lr == 0.0 and min(hopeless.probe_losses[1:]) > hopeless.probe_losses[0]
    assert torch.equal(hopeless.weights["w"], pruned) and hopeless.loss_after == hopeless.loss_before
    # a learning rate that works passes the guard, and gives exactly the fit at that rate alone
    good = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=4, lr=1e-2, guard=True)
    alone = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=4, lr=[1e-2, 1e-2])
    assert good.lr == 1e-2 and len(good.probe_losses) == 2 and good.probe_final < good.probe_losses[0]
    assert torch.equal(good.weights["w"], alone.weights["w"])


def _many_batches(seed=5, batches=32):
    """The linear problem with 32 batches, and a forward that records, in order, each batch it
    trains on ("t") and each it only evaluates ("e")."""
    _, pruned, keep, targets, plain = _linear_problem(seed=seed, batches=batches)
    events = []

    def forward(params, b):
        events.append(("t" if torch.is_grad_enabled() and params["w"].requires_grad else "e", b))
        return plain(params, b)

    return pruned, keep, targets, forward, events


def test_compared_fits_never_train_on_the_batches_they_are_compared_on():
    """Fits run to the end are compared on batches held out of training (1 in 8, evenly
    spaced). Fits compared early (``trial``) are compared on batches the first epoch has not
    reached, and the one kept then trains on every batch. One learning rate without the guard
    trains on every batch and evaluates none."""
    pruned, keep, targets, forward, events = _many_batches()
    fit = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=2, lr=[1e-2, 1e-3], measure=False)
    trained, evaluated = {b for e, b in events if e == "t"}, {b for e, b in events if e == "e"}
    assert fit.held_out == 4 and evaluated == {4, 12, 20, 28} and trained == set(range(32)) - evaluated
    assert not fit.trained_all

    events.clear()
    fit = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=2, lr=[1e-2, 1e-3], trial=0.1, measure=False)
    first_eval = next(i for i, (e, _) in enumerate(events) if e == "e")
    seen, compared = {b for e, b in events[:first_eval]}, {b for e, b in events if e == "e"}
    assert first_eval == 7 and len(compared) == fit.held_out == 4 and not compared & seen  # pause: 7 of 64 steps
    assert fit.trained_all and {b for e, b in events if e == "t"} == set(range(32))

    events.clear()
    fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=1, lr=1e-2, measure=False)
    assert events and all(e == "t" for e, _ in events) and {b for _, b in events} == set(range(32))


def test_a_trial_compares_rates_early_and_runs_only_the_best_to_the_end():
    """With ``trial`` < 1 the learning rates are compared after that fraction of the steps and
    only the best goes on, on its own full schedule over every batch: it ends exactly where the
    fit at that rate alone ends, and the losing rate costs only the trial's steps."""
    pruned, keep, targets, forward, events = _many_batches(seed=2)
    alone = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=1, lr=0.05, measure=False)
    events.clear()
    early = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=1, lr=[0.5, 0.05], trial=0.25, measure=False)
    assert early.lr == 0.05 and early.probe_losses[0] > early.probe_losses[1]
    assert torch.equal(early.weights["w"], alone.weights["w"]) and early.steps == alone.steps == 32
    assert sum(e == "t" for e, _ in events) == 32 + 8  # the losing rate ran 8 steps
    assert early.probe_final < early.probe_losses[1]  # the rest of the fit lowered the loss further
    with pytest.raises(ValueError, match="trial"):
        fit_block(forward, {"w": pruned}, {"w": keep}, targets, lr=[0.5, 0.05], trial=0.0)
    with pytest.raises(ValidationError):
        LocalReconstruction(trial=1.5)


@pytest.mark.parametrize(
    "lr,extra,kept",
    [
        ("[1.0, 1.0e-3]", "        guard: true\n", "kept the fit at lr 0.001"),
        ("1.0", "        guard: true\n", "kept the block as pruned"),
        ("[1.0, 1.0e-3]", "        trial: 0.25\n", "at 0.25 of the fit with lr 1: "),  # compared early, then 1e-3 goes on
    ],
)
def test_learning_rates_and_guard_in_a_recipe_log_each_layers_choice(tmp_path, lr, extra, kept):
    """``lr: [...]``, ``trial`` and ``guard: true`` in YAML: each decoder layer logs the losses
    compared and what it kept (an absurd learning rate loses to a sane one, or to the start
    under the guard), and the checkpoint is still exactly 2:4."""
    from loguru import logger

    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", filter=lambda r: "not trained on" in r["message"])
    try:
        out = tmp_path / "out"
        _run(str(save_tiny_llama(tmp_path / "m", layers=2, seed=3)), _recipe(epochs=1, lr=lr, extra=extra), out)
    finally:
        logger.remove(sink)
    assert len(lines) == 2 and all(kept in line for line in lines), lines
    assert "guard" in extra or all("kept the fit at lr 0.001" in line for line in lines), lines
    rep = verify_checkpoint(out)
    assert all(l.nm_ok for l in rep.layers if l.recorded)


def test_bfloat16_compute_runs_the_training_steps_in_bfloat16_and_fits_as_float32_does():
    """``compute_dtype=bfloat16``: the training steps' products run in bfloat16 (autocast), while
    the loss measured before and after stays float32; the fit keeps the mask, stays exactly 2:4,
    and gets as far towards the optimum as the float32 fit, within a few per cent."""
    w, pruned, keep, targets, forward = _linear_problem(seed=6)
    seen = []

    def spy(params, b):
        out = forward(params, b)
        seen.append((torch.is_grad_enabled(), out.dtype))
        return out

    f32 = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=20, lr=1e-2)
    bf16 = fit_block(spy, {"w": pruned}, {"w": keep}, targets, epochs=20, lr=1e-2, compute_dtype=torch.bfloat16)
    assert {d for grad, d in seen if grad} == {torch.bfloat16}  # every training step
    assert {d for grad, d in seen if not grad} == {torch.float32}  # the measurements
    assert bf16.weights["w"].dtype == torch.float32 and torch.equal(bf16.weights["w"] != 0, keep)
    assert is_nm(bf16.weights["w"], 2, 4)
    assert bf16.loss_before == f32.loss_before
    assert bf16.loss_after < bf16.loss_before
    assert abs(bf16.loss_after - f32.loss_after) < 0.05 * (f32.loss_before - f32.loss_after)
    assert not torch.equal(bf16.weights["w"], f32.weights["w"])  # a different (rounded) path
    with pytest.raises(ValueError):
        LocalReconstruction(compute_dtype="float16")


def test_bfloat16_backward_rounds_only_the_linears_gradient_products():
    """``low_precision_linear_grads(bfloat16)``: F.linear's output is exactly float32's, and its
    input, weight and bias gradients are the bfloat16 products of the incoming gradient, within
    bfloat16's rounding of the float32 ones; float32 is a no-op."""
    g = torch.Generator().manual_seed(4)
    x0, w0, b0 = torch.randn(3, 40, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    up = torch.randn(3, 40, 48, generator=g)  # the gradient arriving from above

    def run(dtype):
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        with low_precision_linear_grads(dtype):
            y = torch.nn.functional.linear(x, w, bias=b)
        y.backward(up)
        return y.detach(), x.grad, w.grad, b.grad

    y32, gx32, gw32, gb32 = run(torch.float32)
    y16, gx16, gw16, gb16 = run(torch.bfloat16)
    assert torch.equal(y16, y32)
    bf = torch.bfloat16
    assert torch.equal(gx16, (up.to(bf) @ w0.to(bf)).float())
    assert torch.equal(gw16, (up.reshape(-1, 48).to(bf).T @ x0.reshape(-1, 64).to(bf)).float())
    assert torch.equal(gb16, gb32)
    for lo, hi in ((gx16, gx32), (gw16, gw32)):
        assert not torch.equal(lo, hi) and float((lo - hi).norm() / hi.norm()) < 1e-2
    assert torch.equal(run(torch.float32)[2], gw32)


def test_bfloat16_backward_fits_as_float32_does():
    """``backward_dtype=bfloat16`` in ``fit_block``: the fit keeps the mask, stays exactly 2:4, and
    gets as far towards the optimum as the float32 fit, within a few per cent."""
    w, pruned, keep, targets, plain = _linear_problem(seed=7)
    xs = [plain({"w": torch.eye(w.shape[1])}, b) for b in range(len(targets))]  # the sparse stream

    def forward(params, b):  # through F.linear, where the rounding applies
        return torch.nn.functional.linear(xs[b], params["w"])

    f32 = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=20, lr=1e-2)
    low = fit_block(forward, {"w": pruned}, {"w": keep}, targets, epochs=20, lr=1e-2, backward_dtype=torch.bfloat16)
    assert torch.equal(low.weights["w"] != 0, keep) and is_nm(low.weights["w"], 2, 4)
    assert low.loss_before == f32.loss_before and low.loss_after < low.loss_before
    assert abs(low.loss_after - f32.loss_after) < 0.05 * (f32.loss_before - f32.loss_after)
    assert not torch.equal(low.weights["w"], f32.weights["w"])  # a different (rounded) path
    with pytest.raises(ValidationError):
        LocalReconstruction(backward_dtype="float16")


def test_compute_dtype_in_a_recipe_reaches_the_fit(tmp_path, monkeypatch):
    """``compute_dtype`` and ``backward_dtype: bfloat16`` in YAML reach each decoder layer's fit, and the checkpoint is
    still exactly 2:4."""
    from crepe_plugin.modifiers import teacher

    got, real = [], teacher.fit_block

    def fit_block_spy(*args, **kwargs):
        got.append((kwargs["compute_dtype"], kwargs["backward_dtype"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher, "fit_block", fit_block_spy)
    out = tmp_path / "out"
    extra = "        compute_dtype: bfloat16\n        backward_dtype: bfloat16\n"
    _run(str(save_tiny_llama(tmp_path / "m", layers=2, seed=3)), _recipe(extra=extra), out)
    assert got == [(torch.bfloat16, torch.bfloat16)] * 2
    rep = verify_checkpoint(out)
    assert rep.ok and all(l.nm_ok for l in rep.layers if l.recorded)


def test_a_token_fraction_trains_on_a_new_subset_each_step_and_measures_on_every_token():
    """``token_fraction``: each training step sees ceil(f * seq) distinct positions, a new subset
    each step, and the loss there; the comparison of learning rates and the measured errors use
    every position; the fit still lowers the error and keeps the mask."""
    w, pruned, keep, targets, forward = _linear_problem(seed=4, tokens=24)
    seen, full_calls = [], []

    def subset_forward(params, b, tokens=None):
        if tokens is None:
            full_calls.append(b)
            return forward(params, b)
        seen.append(tokens.clone())
        return forward(params, b).index_select(-2, tokens)

    fit = fit_block(subset_forward, {"w": pruned}, {"w": keep}, targets, epochs=10, lr=[1e-2, 1e-3], trial=0.5,
                    token_fraction=0.3)  # fmt: skip
    assert all(len(t) == 8 and torch.equal(t, t.unique()) for t in seen)  # ceil(0.3 * 24), distinct, sorted
    # 5 batches trained (1 held out to compare the rates) x 10 epochs: each rate's first 25 steps, then the best's last 25,
    # every step a new subset, the same ones for both rates
    assert len(seen) == 75 and all(torch.equal(a, b) for a, b in zip(seen[:25], seen[25:50]))
    assert len({tuple(t.tolist()) for t in seen}) == 50
    assert full_calls  # the comparison of the two rates and the errors before and after
    assert fit.loss_after < fit.loss_before
    assert torch.equal(fit.weights["w"] != 0, keep) and is_nm(fit.weights["w"], 2, 4)
    with pytest.raises(ValueError, match="token_fraction"):
        fit_block(subset_forward, {"w": pruned}, {"w": keep}, targets, token_fraction=0.0)


def test_mlp_on_a_token_subset_gives_the_decoder_layers_exact_output_there(tmp_path):
    """``on_tokens``: the MLP runs on the chosen positions only, and the decoder layer's output
    there is exactly its full output; a block called with more than its hidden states (attention)
    is refused."""
    from crepe_plugin.core.errors import PruningError
    from crepe_plugin.modifiers.teacher import mlp_block, on_tokens

    model = _load(save_tiny_llama(tmp_path / "m", layers=1, seed=2))
    layer = model.model.layers[0]
    x = torch.randn(1, 20, model.config.hidden_size)
    pos = model.model.rotary_emb(x, torch.arange(20)[None])
    name, mlp = mlp_block(layer, set(m for m in layer.modules() if isinstance(m, torch.nn.Linear)))
    assert mlp is layer.mlp and name == "mlp"
    sizes = []
    h = mlp.gate_proj.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[-2]))
    tokens = torch.tensor([0, 3, 4, 11, 19])
    with torch.no_grad():
        full = layer(x, position_embeddings=pos, attention_mask=None)
        with on_tokens(mlp, name, tokens):
            part = layer(x, position_embeddings=pos, attention_mask=None)
    h.remove()
    full, part = (o[0] if isinstance(o, tuple) else o for o in (full, part))
    assert sizes == [20, 5]
    torch.testing.assert_close(part[:, tokens], full[:, tokens], rtol=0, atol=1e-6)
    assert not torch.allclose(part[:, 1], full[:, 1])  # elsewhere the MLP did not run
    with pytest.raises(PruningError, match="token-wise"), on_tokens(layer.self_attn, "self_attn", tokens):
        layer(x, position_embeddings=pos, attention_mask=None)
    assert not any((m._forward_pre_hooks, m._forward_hooks) != ({}, {}) for m in (layer.self_attn, mlp))  # hooks removed


@pytest.mark.parametrize("granularity,mlp_only", [("layer", False), ("blocks", False), ("layer", True)])
def test_mlp_tokens_in_a_recipe_lowers_each_layers_error_and_stays_2of4(tmp_path, monkeypatch, granularity, mlp_only):
    """``mlp_tokens: 0.5`` reaches the fit of every block that holds the MLP (the attention block
    alone trains on every token), the training steps run the MLP on half the tokens while attention
    sees all of them, each layer's error still falls, and the checkpoint is exactly 2:4; also when
    only the MLPs are pruned."""
    from loguru import logger

    from crepe_plugin.modifiers import teacher

    got, real = [], teacher.fit_block
    monkeypatch.setattr(teacher, "fit_block", lambda *a, **k: got.append(k["token_fraction"]) or real(*a, **k))
    model = _load(save_tiny_llama(tmp_path / "m", layers=2, seed=3))
    seen, last = [], {}  # (tokens at the layer's input, tokens at its MLP) of every call of layer 1's MLP
    layer = model.model.layers[1]
    hooks = [layer.register_forward_pre_hook(lambda _m, args, kw: last.update(n=(args[0] if args else kw["hidden_states"]).shape[-2]),
                                             with_kwargs=True),
             layer.mlp.gate_proj.register_forward_pre_hook(lambda _m, args: seen.append((last.get("n"), args[0].shape[-2])))]  # fmt: skip
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", filter=lambda r: "local reconstruction" in r["message"])
    extra = f"        mlp_tokens: 0.5\n        log_error: true\n        granularity: {granularity}\n"
    if mlp_only:
        extra += "      targets: ['re:.*mlp.*']\n"
    try:
        _run(model, _recipe(epochs=3, lr=1e-3, extra=extra))
    finally:
        logger.remove(sink)
        for h in hooks:
            h.remove()
    assert got == ([1.0, 0.5] * 2 if granularity == "blocks" else [0.5] * 2)
    if granularity == "layer":  # 8 windows x 3 epochs of training steps with the MLP on half the layer's tokens
        halves = [(n, k) for n, k in seen if k != n]
        assert len(halves) == 24 and all(k == -(-n // 2) for n, k in halves), seen
    for line in lines:
        before, after = (float(x.split(",")[0]) for x in line.split("block output error ")[1].split(" -> "))
        assert after < before, line
    pruned = {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert all(is_nm(w, 2, 4) == (not mlp_only or ".mlp." in n) for n, w in pruned.items())
    with pytest.raises(ValidationError):
        LocalReconstruction(mlp_tokens=0.0)


def test_attention_replay_gives_the_layers_exact_output_and_refuses_what_it_cannot_replay(tmp_path):
    """``attention_replay`` keeps what the attention's output projection receives; with it swapped
    in, the decoder layer's output is exactly the real one, and it follows the output projection's
    weight; a token-wise block (an MLP) gets None, and an attention whose output is not its last
    Linear's output is refused."""
    from crepe_plugin.core.errors import PruningError
    from crepe_plugin.modifiers.teacher import _swapped, attention_replay

    model = _load(save_tiny_llama(tmp_path / "m", layers=1, seed=2))
    layer = model.model.layers[0]
    xs = [torch.randn(1, 20, model.config.hidden_size) for _ in range(3)]
    pos = model.model.rotary_emb(xs[0], torch.arange(20)[None])

    def run(b):
        out = layer(xs[b], position_embeddings=pos, attention_mask=None)
        return out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        full = [run(b) for b in range(3)]
        replay = attention_replay(layer.self_attn, "self_attn", run, 3, lambda t: t.detach().clone())
        assert replay.path == "o_proj" and len(replay.inputs) == 3
        with _swapped(layer, "self_attn", replay):
            for b in range(3):
                replay.window = b
                torch.testing.assert_close(run(b), full[b], rtol=0, atol=0)
            layer.self_attn.o_proj.weight.mul_(0.5)  # the replay runs the real output projection
            replay.window = 0
            assert not torch.allclose(run(0), full[0])
        assert layer.self_attn is not replay  # swapped back
        assert attention_replay(layer.mlp, "mlp", run, 3, lambda t: t) is None  # token-wise: not attention
        orig = layer.self_attn.forward
        layer.self_attn.forward = lambda *a, **k: (2 * orig(*a, **k)[0], None)
        with pytest.raises(PruningError, match="'self_attn' to return its last Linear's output"):
            attention_replay(layer.self_attn, "self_attn", run, 3, lambda t: t)
    assert not any((m._forward_pre_hooks, m._forward_hooks) != ({}, {}) for m in layer.modules())  # hooks removed


@pytest.mark.parametrize("granularity", ["layer", "blocks"])
def test_attention_output_trains_only_the_output_projection_and_lowers_each_layers_error(tmp_path, monkeypatch, granularity):
    """``attention: output``: q, k and v keep the weights the pruning gave them, the output
    projection and the MLP are trained, each layer's error against the dense teacher falls, the
    training steps never run attention, and the checkpoint is exactly 2:4."""
    from loguru import logger

    from crepe_plugin.modifiers import CRePEPruningModifier

    model = _load(save_tiny_llama(tmp_path / "m", layers=2, seed=3))
    pruned, before = {}, CRePEPruningModifier.after_layers

    def after_layers(self, layers):  # the weights as the pruning left them, before the fit
        pruned.update({name: m.weight.detach().clone() for name, m in layers.items()})
        before(self, layers)

    monkeypatch.setattr(CRePEPruningModifier, "after_layers", after_layers)
    calls, hooks, lines = [], [], []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", filter=lambda r: "local reconstruction" in r["message"])
    out = tmp_path / "o"
    extra = f"        log_error: true\n        granularity: {granularity}\n"
    try:
        _run(_load(save_tiny_llama(tmp_path / "m", layers=2, seed=3)), _recipe(epochs=3, lr=1e-3, extra=extra))
        plain, lines[:] = list(lines), []
        for h in hooks:
            h.remove()
        hooks = [l.self_attn.k_proj.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
                 for l in model.model.layers]  # fmt: skip
        pruned.clear()
        _run(model, _recipe(epochs=3, lr=1e-3, extra="        attention: output\n" + extra), out)
    finally:
        logger.remove(sink)
        for h in hooks:
            h.remove()
    # the first layer's first block starts from the same weights on the same inputs: the replay gives the same error
    first = [float(x.split("block output error ")[1].split(" -> ")[0]) for x in (plain[0], lines[0])]
    assert first[0] == pytest.approx(first[1], rel=1e-6), (plain[0], lines[0])
    assert len(pruned) == 14
    for name, w in pruned.items():
        same = torch.equal(model.get_submodule(name).weight, w)
        assert same == any(p in name for p in ("q_proj", "k_proj", "v_proj")), name
    # k_proj runs in the passes without gradients (the pipeline's, the teacher's, the replay's fill), never in a
    # training step
    assert calls and not any(calls), sum(calls)
    assert len(lines) == (4 if granularity == "blocks" else 2)
    for line in lines:
        b, a = (float(x.split(",")[0]) for x in line.split("block output error ")[1].split(" -> "))
        assert a < b, line
    rep = verify_checkpoint(out)
    assert rep.ok, rep.errors
    assert all(l.nm_ok for l in rep.layers if l.recorded) and len([l for l in rep.layers if l.recorded]) == 14
    with pytest.raises(ValidationError):
        LocalReconstruction(attention="none")


def test_attention_output_skips_a_block_left_with_nothing_to_train(tmp_path):
    """``attention: output`` when the output projection is not pruned: the attention block has
    nothing to train and is skipped (with a warning that its pruned Linears get no repair), the MLP
    is still fitted, and q, k and v stay 2:4 (o_proj dense)."""
    from loguru import logger

    model = _load(save_tiny_llama(tmp_path / "m", layers=1, seed=4))
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", filter=lambda r: "attention: output" in r["message"]
                      or "local reconstruction" in r["message"])  # fmt: skip
    try:
        _run(model, _recipe(epochs=2, lr=1e-3, extra="        attention: output\n        granularity: blocks\n"
                                                      "      ignore: ['lm_head', 're:.*o_proj']\n"))  # fmt: skip
    finally:
        logger.remove(sink)
    assert any("trains only 'o_proj', which is not pruned" in x for x in lines), lines
    assert any("self_attn: local reconstruction, nothing to train" in x for x in lines), lines
    assert any(".mlp: local reconstruction, training loss" in x for x in lines), lines
    attn = model.model.layers[0].self_attn
    assert is_nm(attn.q_proj.weight, 2, 4) and not is_nm(attn.o_proj.weight, 2, 4)


def test_attention_output_on_gpt2s_conv1d_attention(tmp_path, monkeypatch):
    """GPT-2 (Conv1D, q/k/v fused in ``c_attn``): ``attention: output`` keeps ``c_attn`` as pruned,
    trains ``c_proj`` and the MLP, and each layer's error falls."""
    from loguru import logger

    from crepe_plugin.modifiers import CRePEPruningModifier
    from crepe_plugin.testing import save_tiny_gpt2

    model = _load(save_tiny_gpt2(tmp_path / "m", layers=2, seed=1))
    pruned, before = {}, CRePEPruningModifier.after_layers

    def after_layers(self, layers):
        pruned.update({name: m.weight.detach().clone() for name, m in layers.items()})
        before(self, layers)

    monkeypatch.setattr(CRePEPruningModifier, "after_layers", after_layers)
    lines = []
    sink = logger.add(lambda m: lines.append(str(m)), format="{message}", filter=lambda r: "local reconstruction" in r["message"])
    try:
        _run(model, _recipe(epochs=3, lr=1e-3, extra="        attention: output\n        log_error: true\n"))
    finally:
        logger.remove(sink)
    assert len(pruned) == 8 and len(lines) == 2
    for name, w in pruned.items():
        assert torch.equal(model.get_submodule(name).weight, w) == name.endswith("c_attn"), name
    for line in lines:
        b, a = (float(x.split(",")[0]) for x in line.split("block output error ")[1].split(" -> "))
        assert a < b, line
