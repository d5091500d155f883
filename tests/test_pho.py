"""PHO: proxies (pure torch), statistics cache, Optuna search (resume, two processes),
the recipe `search:` block, and the `crepe search` / `search-validate` commands."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crepe_plugin.core import RIA_CONFIG, CRePEConfig, CalibrationError, crepe_scores, is_nm, prune_mask
from crepe_plugin.core.proxies import diag_output_error, gini, layer_proxy, output_error

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ proxies (core)
def test_gini_extremes_and_scale_invariance():
    assert gini(torch.ones(100)) == pytest.approx(0.0, abs=1e-12)
    one_hot = torch.zeros(100)
    one_hot[7] = 3.0
    assert gini(one_hot) == pytest.approx(0.99)  # (n - 1) / n
    x = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert gini(x) == pytest.approx(gini(4 * x), rel=1e-12)
    assert 0.25 < gini(x) < 0.42  # uniform(0, 1) has Gini 1/3


def test_output_error_equals_explicit_activations():
    torch.manual_seed(0)
    X = torch.randn(300, 32, dtype=torch.float64)  # tokens x inputs
    W = torch.randn(16, 32, dtype=torch.float64)
    mask = prune_mask(crepe_scores(W, (X**2).sum(0)), 0.5, "2:4")
    Wp = W.masked_fill(mask, 0)
    H = X.t() @ X
    want = ((X @ (W - Wp).t()) ** 2).sum() / ((X @ W.t()) ** 2).sum()
    assert output_error(W, Wp, H) == pytest.approx(float(want), rel=1e-10)
    assert output_error(W, W, H) == 0.0
    # the diagonal proxy equals the full one when the inputs are uncorrelated
    Hd = torch.diag(torch.diagonal(H))
    assert diag_output_error(W, mask, torch.diagonal(H)) == pytest.approx(output_error(W, Wp, Hd), rel=1e-6)
    with pytest.raises(CalibrationError, match="layer 'l0'"):
        output_error(W, Wp, H[:8, :8], layer_name="l0")


def test_recon_proxy_prefers_the_better_mask():
    torch.manual_seed(1)
    X = torch.randn(400, 64) * torch.linspace(0.1, 3, 64)
    W = torch.randn(32, 64)
    H = X.t() @ X
    s = (X**2).sum(0)
    good = prune_mask(crepe_scores(W, s, CRePEConfig(act_exponent=1.0, col_coef=0.0)), 0.5, "2:4")
    bad = prune_mask(-crepe_scores(W, s, CRePEConfig(act_exponent=1.0, col_coef=0.0)), 0.5, "2:4")
    sc = torch.ones_like(W)
    assert layer_proxy("recon", W, good, sc, s, H) < layer_proxy("recon", W, bad, sc, s, H)
    assert layer_proxy("diag", W, good, sc, s) < layer_proxy("diag", W, bad, sc, s)
    with pytest.raises(ValueError, match="unknown proxy"):
        layer_proxy("nope", W, good, sc, s)
    with pytest.raises(CalibrationError, match="Gram"):
        layer_proxy("recon", W, good, sc, s, None, "l0")


# ------------------------------------------------------------------ with transformers / optuna
transformers = pytest.importorskip("transformers")
optuna = pytest.importorskip("optuna")

from crepe_plugin.pho import SearchConfig, SearchSpace  # noqa: E402
from crepe_plugin.core.stats import CalibStats, gather_stats  # noqa: E402
from crepe_plugin.pho.calib import sample_layer_names, target_modules  # noqa: E402
from crepe_plugin.pho.search import RIA_PARAMS, Evaluator, run_search  # noqa: E402
from crepe_plugin.testing import tiny_llama  # noqa: E402


def _batches(n=6, seqlen=48, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (1, seqlen), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama(layers=4).eval()
    mods = target_modules(model)
    sampled = sample_layer_names(mods, 2)
    stats = gather_stats(model, _batches(), mods, sampled)
    return model, mods, sampled, stats


def test_sample_layer_names_even_spacing():
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(10)] + ["lm_head"]
    picked = sample_layer_names(names, 3)
    assert picked == ["model.layers.0.mlp.down_proj", "model.layers.4.mlp.down_proj", "model.layers.9.mlp.down_proj"] or picked == [
        "model.layers.0.mlp.down_proj", "model.layers.5.mlp.down_proj", "model.layers.9.mlp.down_proj"]  # fmt: skip
    assert sample_layer_names(names, "all") == names


def test_stats_share_gram_and_match_hooks(tiny, tmp_path):
    model, mods, sampled, stats = tiny
    assert "lm_head" not in mods and len(mods) == 4 * 7
    assert set(stats.sq_norms) == set(mods)
    # q/k/v read one tensor, as do gate/up: one Gram matrix each
    pre = "model.layers.0."
    assert stats.gram_of[pre + "self_attn.k_proj"] == stats.gram_of[pre + "self_attn.v_proj"] == pre + "self_attn.q_proj"
    assert stats.gram_of[pre + "mlp.up_proj"] == pre + "mlp.gate_proj"
    assert stats.gram_of[pre + "mlp.down_proj"] == pre + "mlp.down_proj"
    assert len(stats.grams) == 2 * 4  # two sampled decoder layers x (qkv, o, gate/up, down)
    # diag(H)/2 is the scores' input statistic
    H = stats.H(pre + "mlp.down_proj")
    assert torch.allclose(torch.diagonal(H) / 2, stats.sq_norms[pre + "mlp.down_proj"], rtol=1e-4)
    # the cache round-trips; a corrupt one is a clear error
    stats.save(tmp_path / "s.safetensors")
    back = CalibStats.load(tmp_path / "s.safetensors")
    assert back.gram_of == stats.gram_of and torch.equal(back.grams[pre + "mlp.down_proj"], H)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CalibrationError, match="bad.safetensors"):
        CalibStats.load(tmp_path / "bad.safetensors")


def test_gather_stats_rejects_empty_data():
    model = tiny_llama(layers=1)
    with pytest.raises(CalibrationError, match="empty"):
        gather_stats(model, [], target_modules(model))


def test_search_starts_at_ria_and_never_reruns_the_model(tiny):
    model, mods, sampled, stats = tiny
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ev = Evaluator(model, mods, stats, "2:4", 0.5, sampled=sampled)
        res = run_search(ev, SearchConfig(proxy="recon", trials=10), {"kernel": "box"}, progress=False)
    finally:
        hook.remove()
    assert calls == []  # no trial ran the model: statistics are cached
    assert res["trials"] == 10
    space = SearchSpace()
    for k, v in res["params"].items():
        r = getattr(space, k)
        assert r.low <= v <= r.high


def _one_layer_case(seed=0):
    """One linear layer whose inputs span two decades of scale: RIA's a = 0.5 (and its column
    term) under-weights the loud inputs; the output-error optimum is near Wanda's point (a = 1,
    no column term), which lies inside the search space."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, 64)[torch.randperm(64, generator=g)]  # mixed within every group of 4
    X = torch.randn(512, 64, generator=g) * scale  # tokens x inputs
    lin = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * torch.exp(torch.randn(32, 64, generator=g) * 0.5))
    H = 2 * X.t() @ X / 8  # 8 samples of 64 tokens, as HessianStats scales it
    stats = CalibStats({"l": torch.diagonal(H) / 2}, {"l": H}, {"l": "l"}, 8)
    return torch.nn.Sequential(lin), {"l": lin}, stats


def test_search_finds_a_better_point_than_ria_where_one_exists():
    model, mods, stats = _one_layer_case()
    ev = Evaluator(model, mods, stats, "2:4", 0.5)
    ria = ev.proxy(RIA_CONFIG, "recon")
    wanda = ev.proxy(CRePEConfig(row_coef=1.0, col_coef=0.0, act_exponent=1.0), "recon")
    assert wanda < 0.8 * ria  # a better point exists
    res = run_search(ev, SearchConfig(proxy="recon", trials=16), progress=False)
    assert res["value"] < 0.9 * ria and res["params"] != RIA_PARAMS  # and the search moved to one
    assert ev.proxy(CRePEConfig(**res["config"]), "recon") == pytest.approx(res["value"], rel=1e-9)


def test_energy_proxy_pools_the_layers(tiny):
    from crepe_plugin.core.proxies import output_energy, output_error_terms

    model, mods, sampled, stats = tiny
    ev = Evaluator(model, mods, stats, "2:4", 0.5, sampled=sampled)
    cfg = CRePEConfig(row_coef=2.0)
    num = den = 0.0
    for name in sampled:
        w = mods[name].weight.detach()
        mask = prune_mask(crepe_scores(w, stats.sq_norms[name], cfg), 0.5, "2:4")
        H = stats.H(name)
        num += output_error_terms(w, mask, H)
        den += output_energy(w, H)
        # the pooled numerator is each layer's relative error times its energy
        assert output_error_terms(w, mask, H) == pytest.approx(output_error(w, w.masked_fill(mask, 0), H) * output_energy(w, H), rel=1e-4)
    assert ev.proxy(cfg, "energy") == pytest.approx(num / den, rel=1e-9)


def test_prune_model_restores_dense_weights(tiny):
    model, mods, sampled, stats = tiny
    before = {n: m.weight.detach().clone() for n, m in mods.items()}
    ev = Evaluator(model, mods, stats, "2:4", 0.5, sampled=sampled)
    with ev.prune_model(CRePEConfig(neighbor_coef=0.3)):
        assert all(is_nm(m.weight, 2, 4) for m in mods.values())
    assert all(torch.equal(before[n], m.weight) for n, m in mods.items())


def test_resume_continues_the_stored_study(tiny, tmp_path):
    model, mods, sampled, stats = tiny
    ev = Evaluator(model, mods, stats, "2:4", 0.5, sampled=sampled)
    url = f"sqlite:///{tmp_path / 's.db'}"
    run_search(ev, SearchConfig(proxy="diag", trials=4, storage=url, study_name="x"), progress=False)
    res = run_search(ev, SearchConfig(proxy="diag", trials=9, storage=url, study_name="x"), progress=False)
    study = optuna.load_study(study_name="x", storage=url)
    assert res["trials"] == 9 and len(study.trials) == 9
    assert study.trials[0].params == {k: v for k, v in RIA_PARAMS.items()}


def test_ppl_baseline_hill_climbs(tiny, tmp_path):
    """Each proposal moves one coordinate of the best point so far, and the climb leaves RIA."""
    model, mods, sampled, stats = tiny
    ev = Evaluator(model, mods, stats, "2:4", 0.5, sampled=sampled, ppl_batches=_batches(2, seed=5))
    url = f"sqlite:///{tmp_path / 'hc.db'}"
    res = run_search(ev, SearchConfig(proxy="ppl", trials=8, storage=url, study_name="hc"), progress=False)
    assert res["sampler"] == "hillclimb"
    trials = optuna.load_study(study_name="hc", storage=url).trials
    assert trials[0].params == RIA_PARAMS
    for i in range(1, len(trials)):
        best = min(trials[:i], key=lambda t: t.value)
        assert sum(trials[i].params[k] != best.params[k] for k in RIA_PARAMS) == 1, (i, trials[i].params)
    assert res["value"] < ev.calib_ppl(RIA_CONFIG) and res["params"] != RIA_PARAMS


def test_search_config_validation():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="above high"):
        SearchSpace(row_coef={"low": 2.0, "high": 1.0})
    with pytest.raises(ValidationError, match="odd"):
        SearchSpace(kernel_size={"low": 1, "high": 4})
    with pytest.raises(ValidationError):
        SearchConfig(proxy="perplexity")
    with pytest.raises(ValidationError):
        SearchConfig(trials=0)


# ------------------------------------------------------------------ in a recipe
llmc = pytest.importorskip("llmcompressor")


def test_recipe_search_block_runs_pho_and_records_it(tmp_path, tiny_model_dir, calib_file):
    from safetensors.torch import load_file

    import crepe_plugin  # noqa: F401
    from crepe_plugin.checkpoint.record import RECORD_KEY

    from .test_modifiers import _run

    recipe = (ROOT / "recipes" / "crepe_pho_2of4.yaml").read_text().replace("trials: 40", "trials: 6").replace("layers: 6", "layers: 1")
    out = tmp_path / "out"
    _run(str(tiny_model_dir), recipe, out)
    cfg = json.loads((out / "config.json").read_text())
    rec = cfg[RECORD_KEY]
    s = rec["config"]["search"]
    assert s["proxy"] == "energy" and s["trials"] == 6
    for k, v in s["params"].items():  # the model was pruned with the chosen point
        assert rec["config"][k] == pytest.approx(v)
    sd = load_file(out / "model.safetensors")
    ws = [v for k, v in sd.items() if k.endswith("proj.weight")]
    assert ws and all(is_nm(w, 2, 4) for w in ws)
    # `crepe search` searches the same space: what PHO does not search (kernel, border, map) is fixed
    # at the same values in both entry points
    from crepe_plugin.pho.api import search

    res = search(str(tiny_model_dir), str(calib_file), "2:4", config=SearchConfig(proxy="diag", trials=2, layers=1),
                 num_samples=2, seqlen=32)  # fmt: skip
    fixed = ("kernel", "border", "neighbor_map")
    assert {k: res["config"][k] for k in fixed} == {k: rec["config"][k] for k in fixed}
    # `crepe verify` reads the record's coefficients back as the config the layers were pruned with
    from crepe_plugin.checkpoint.verify import verify_checkpoint

    assert verify_checkpoint(out).config == CRePEConfig(**{k: rec["config"][k] for k in CRePEConfig.model_fields})


def test_recipe_search_rejects_ppl():
    from pydantic import ValidationError

    from crepe_plugin import CRePEPruningModifier

    with pytest.raises(ValidationError, match="baseline"):
        CRePEPruningModifier(mask_structure="2:4", search={"proxy": "ppl"})
    with pytest.raises(ValidationError):
        CRePEPruningModifier(mask_structure="2:4", search={"trails": 5})


# ------------------------------------------------------------------ the commands
def _cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "crepe_plugin.cli", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip


def test_cli_search_two_processes_one_storage_then_report(tmp_path, tiny_model_dir, calib_file):
    """Two processes share one SQLite study; then the ppl baseline and the validation report."""
    out = tmp_path / "run"
    common = [tiny_model_dir, "--calib", calib_file, "--structure", "2:4", "--out", out, "--num-samples", "6", "--seqlen", "48", "--layers", "1"]
    first = _cli("search", *common, "--trials", "4", "--proxy", "recon")
    assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    # the cache now exists: two workers, one storage, one study of 16 trials
    procs = [_cli("search", *common, "--trials", "16", "--proxy", "recon") for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.communicate()[1][-2000:]
    study = optuna.load_study(study_name="crepe-2of4-s0.5-recon", storage=f"sqlite:///{out / 'pho.db'}")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 16 <= len(done) <= 17  # each worker stops once the study holds 16
    workers = {t.user_attrs.get("worker") for t in done if t.number >= 4}
    assert len(workers) == 2, workers
    best = json.loads((out / "best_recon.json").read_text())
    assert (out / "recipe_recon.yaml").is_file() and (out / "trajectory.png").is_file()
    from crepe_plugin.pipeline import load_recipe

    mod = load_recipe(str(out / "recipe_recon.yaml")).modifiers[0]
    assert mod.row_coef == pytest.approx(best["params"]["row_coef"], abs=1e-6)

    base = _cli("search", *common, "--trials", "4", "--proxy", "ppl")
    assert base.wait(timeout=300) == 0, base.communicate()[1][-2000:]
    evalf = tmp_path / "eval.txt"
    evalf.write_text(calib_file.read_text()[::-1][:20000])
    v = _cli("search-validate", out, "--eval", evalf, "--samples", "3", "--eval-seqlen", "64", "--eval-segments", "2")
    assert v.wait(timeout=300) == 0, v.communicate()[1][-2000:]
    rows = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 3 + 1 + 2  # samples + RIA + two searched optima
    assert all(r["heldout_ppl"] > 1 for r in rows)
    rep = (out / "report.md").read_text()
    assert "| recon |" in rep and "Spearman" in rep and "ppl baseline" in rep
    assert (out / "scatter.png").is_file()


def test_a_study_of_other_inputs_is_refused_not_resumed(tiny, tmp_path):
    from crepe_plugin.core.errors import PruningError

    model, mods, sampled, stats = tiny
    ev = Evaluator(model, mods, stats, "2:4", 0.5, sampled=sampled)
    url = f"sqlite:///{tmp_path / 's.db'}"
    cfg = SearchConfig(proxy="diag", trials=3, storage=url, study_name="x")
    run_search(ev, cfg, identity={"model": "a", "seed": 0}, progress=False)
    run_search(ev, cfg.model_copy(update={"trials": 4}), identity={"model": "a", "seed": 0}, progress=False)  # resumes
    with pytest.raises(PruningError, match="other inputs"):
        run_search(ev, cfg.model_copy(update={"trials": 5}), identity={"model": "a", "seed": 1}, progress=False)
    with pytest.raises(PruningError, match="other inputs"):
        run_search(ev, cfg.model_copy(update={"trials": 5}), {"kernel": "gaussian"}, identity={"model": "a", "seed": 0}, progress=False)


@pytest.mark.parametrize(
    "arch,structure,extra,ignore",
    [("llama", "0:0", ["--sparsity", "0.5"], "o_proj"), ("llama", "2:4", [], "o_proj"), ("gpt2", "2:4", [], "attn.c_proj")],
)
def test_search_recipe_prunes_what_the_search_evaluated(arch, structure, extra, ignore, tmp_path, calib_file):
    """`crepe search` (here with --ignore) writes a recipe; `crepe prune` with it prunes the same layers
    with the same masks as the search evaluated at its best point: same scope at 0:0, the user's
    ignore, Conv1D layers (GPT-2). One decoder layer, so the pruner's statistics are the dense ones."""
    from safetensors.torch import load_file

    from crepe_plugin.cli import main
    from crepe_plugin.core import weight_out_in
    from crepe_plugin.pho.calib import STATS_FILE
    from crepe_plugin.pho.session import load_session
    from crepe_plugin.testing import save_tiny_gpt2, save_tiny_llama

    model = (save_tiny_gpt2 if arch == "gpt2" else save_tiny_llama)(tmp_path / "m", layers=1)
    common = ["--calib", str(calib_file), "--num-samples", "4", "--seqlen", "64", "--seed", "0"]
    out = tmp_path / "search"
    assert main(["search", str(model), *common, "--structure", structure, *extra, "--trials", "3", "--layers", "all",
                 "--proxy", "recon", "--ignore", ignore, "--out", str(out)]) == 0  # fmt: skip
    best = json.loads((out / "best_recon.json").read_text())

    # the masks the search evaluated at its best point (its cached statistics, its layers)
    dense, _, _ = load_session(str(model), str(calib_file), 4, 64, 0)
    stats = CalibStats.load(out / STATS_FILE)
    layers = {n: dense.get_submodule(n) for n in stats.sq_norms}
    assert layers and not any(n.endswith(ignore) for n in layers)
    ev = Evaluator(dense, layers, stats, best["structure"], best["sparsity"], best["scope"])
    with ev.prune_model(CRePEConfig(**best["config"])):
        searched = {n: weight_out_in(m) == 0 for n, m in layers.items()}

    pruned = tmp_path / "pruned"
    assert main(["prune", str(model), "--recipe", str(out / "recipe_recon.yaml"), *common, "--out", str(pruned)]) == 0
    record = json.loads((pruned / "config.json").read_text())["crepe_sparsity"]
    assert sorted(record["modules"]) == sorted(searched)
    sd = load_file(pruned / "model.safetensors")
    for name, mask in searched.items():
        w = sd[f"{name}.weight"]
        assert torch.equal((w.t() if record["modules"][name].get("layout") == "in_out" else w) == 0, mask), name


def test_search_validate_seed_draws_the_samples(tmp_path, tiny_model_dir, calib_file):
    """`crepe search-validate --seed` chooses the sampled configurations (the search's own seed
    still chooses the calibration windows)."""
    from crepe_plugin.cli import main
    from crepe_plugin.pho.validate import sample_configs

    out = tmp_path / "s"
    assert main(["search", str(tiny_model_dir), "--calib", str(calib_file), "--trials", "2", "--layers", "1", "--proxy", "diag",
                 "--num-samples", "2", "--seqlen", "32", "--out", str(out)]) == 0  # fmt: skip
    evalf = tmp_path / "eval.txt"
    evalf.write_text(calib_file.read_text()[::-1][:5000])
    assert main(["search-validate", str(out), "--eval", str(evalf), "--samples", "2", "--eval-seqlen", "32",
                 "--eval-segments", "1", "--proxies", "diag", "--seed", "7"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in (out / "validation.jsonl").read_text().splitlines()]
    sampled = [r["params"] for r in rows if r["kind"] == "sample"]
    assert sampled == sample_configs(SearchSpace(), 2, 7) != sample_configs(SearchSpace(), 2, 0)


def test_pho_scores_the_layers_the_pruner_prunes(tmp_path):
    """PHO's layers are the modifier's: no vision tower or projector (LLaVA), no Linear router
    (Qwen2-MoE's shared_expert_gate), no lm_head."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, Qwen2MoeConfig

    from crepe_plugin import CRePEPruningModifier
    from crepe_plugin.testing import save_tiny_llava

    llava = LlavaForConditionalGeneration.from_pretrained(save_tiny_llava(tmp_path / "llava"))
    moe = AutoModelForCausalLM.from_config(Qwen2MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2))  # fmt: skip
    for model, kept_dense in ((llava, ("vision_tower", "multi_modal_projector", "lm_head")), (moe, ("shared_expert_gate", "lm_head"))):
        layers = target_modules(model)
        assert layers and not any(k in n for n in layers for k in kept_dense), sorted(layers)
        assert layers == CRePEPruningModifier(mask_structure="2:4").prunable_layers(model)
