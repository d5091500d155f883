"""CRePEPruningModifier / RIAPruningModifier through llm-compressor's real oneshot."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import crepe_plugin  # noqa: F401  (registers the modifiers)
from crepe_plugin import RIA_CONFIG, CRePEConfig, CRePEPruningModifier, RIAPruningModifier, crepe_scores, is_nm, prune_mask
from crepe_plugin.core import InputNormStats, LayerShapeError, NonFiniteError, PruningError
from crepe_plugin.checkpoint.record import RECORD_KEY, read_record
from crepe_plugin.testing import tiny_llama, tiny_tokenizer

from .conftest import calib_dataset

llmc = pytest.importorskip("llmcompressor")
from llmcompressor import oneshot  # noqa: E402
from llmcompressor.recipe import Recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _run(model, recipe, out=None, n=8):
    if isinstance(model, torch.nn.Module) and not model.config.name_or_path:
        # llm-compressor 0.14's oneshot re-reads the config from name_or_path
        import tempfile

        d = tempfile.mkdtemp(prefix="crepe-cfg-")
        model.config.save_pretrained(d)
        model.config._name_or_path = d
    return oneshot(
        model=model,
        tokenizer=tiny_tokenizer(),
        dataset=calib_dataset(n),
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=128,
        output_dir=str(out) if out else None,
    )


def _recipe(body: str) -> str:
    return "sparsity_stage:\n  sparsity_modifiers:\n" + body


def test_registered_with_factory():
    from llmcompressor.modifiers import ModifierFactory

    assert ModifierFactory._registered_registry["CRePEPruningModifier"] is crepe_plugin.CRePEPruningModifier
    assert ModifierFactory._registered_registry["RIAPruningModifier"] is crepe_plugin.RIAPruningModifier


@pytest.mark.parametrize("recipe", ["crepe_2of4.yaml", "ria_2of4.yaml"])
def test_yaml_recipe_oneshot_saves_exact_2of4(tmp_path, tiny_model_dir, recipe):
    dense = load_file(tiny_model_dir / "model.safetensors")
    out = tmp_path / "out"
    _run(str(tiny_model_dir), str(ROOT / "recipes" / recipe), out)
    tensors = load_file(out / "model.safetensors")
    rec = read_record(out)
    assert rec["structure"] == "2:4" and rec["method"] == recipe.split("_")[0]
    pruned = {k for k in tensors if any(t in k for t in TARGETS) and k.endswith("weight")}
    assert len(pruned) == 2 * 7
    for k in pruned:
        assert is_nm(tensors[k], 2, 4), k
        assert (tensors[k] == 0).float().mean() == 0.5
        assert k.removesuffix(".weight") in rec["modules"]
    for k, v in tensors.items():  # ignored / untargeted modules untouched
        if k not in pruned:
            assert torch.equal(v, dense[k]), k
    # transformers loads it and keeps the record
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(m.config, RECORD_KEY)["structure"] == "2:4"


def test_unstructured_recipe(tmp_path, tiny_model_dir):
    out = tmp_path / "u"
    _run(str(tiny_model_dir), str(ROOT / "recipes" / "crepe_unstructured50.yaml"), out)
    t = load_file(out / "model.safetensors")
    w = t["model.layers.1.mlp.up_proj.weight"]
    # the default unstructured scope is 'row' (Wanda's): every row prunes int(in * s) weights
    assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), int(w.shape[1] * 0.5)))
    assert read_record(out)["structure"] == "0:0" and read_record(out)["config"]["scope"] == "row"


def test_ria_modifier_mask_equals_core_on_first_layer():
    """The modifier's statistics and mask equal the core applied to captured inputs."""
    model = tiny_llama(seed=3)
    q = model.model.layers[0].self_attn.q_proj
    w0 = q.weight.detach().clone()
    stats = InputNormStats(w0.shape[1])
    h = q.register_forward_hook(lambda m, a, o: stats.update(a[0]))
    tok = tiny_tokenizer()
    with torch.no_grad():
        for row in calib_dataset(8):
            model(**tok(row["text"], return_tensors="pt", truncation=True, max_length=128))
    h.remove()
    expected = w0.masked_fill(prune_mask(crepe_scores(w0, stats.value(), RIA_CONFIG), structure="2:4"), 0)
    _run(model, _recipe("    RIAPruningModifier:\n      mask_structure: '2:4'\n"))
    assert torch.equal(q.weight.detach(), expected)


def test_bf16_model_prunes_with_fp32_stats():
    model = tiny_llama(dtype=torch.bfloat16)
    _run(model, _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n      neighbor_coef: 0.2\n"))
    w = model.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.bfloat16 and is_nm(w, 2, 4)
    assert torch.isfinite(w.float()).all()


def test_per_layer_sparsity_dict_and_list():
    model = tiny_llama()
    _run(
        model,
        _recipe(
            "    CRePEPruningModifier:\n      mask_structure: '0:0'\n      sparsity:\n"
            "        're:.*mlp.*': 0.7\n        model.layers.0: 0.3\n        default: 0.5\n"
        ),
    )
    z = lambda m: float((m.weight == 0).float().mean())  # noqa: E731
    row = lambda m, s: int(m.in_features * s) / m.in_features  # noqa: E731  the default scope is 'row'
    up0, up1 = model.model.layers[0].mlp.up_proj, model.model.layers[1].mlp.up_proj
    q0, q1 = model.model.layers[0].self_attn.q_proj, model.model.layers[1].self_attn.q_proj
    assert z(up1) == row(up1, 0.7)
    assert z(up0) == row(up0, 0.7)  # first key wins
    assert z(q0) == row(q0, 0.3)
    assert z(q1) == row(q1, 0.5)
    model = tiny_llama()
    _run(model, _recipe("    CRePEPruningModifier:\n      sparsity: [0.2, 0.6]\n"))
    d0, d1 = model.model.layers[0].mlp.down_proj, model.model.layers[1].mlp.down_proj
    assert z(d0) == row(d0, 0.2) and z(d1) == row(d1, 0.6)


def test_nm_with_dense_layer_via_zero_sparsity():
    model = tiny_llama()
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    _run(model, _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n      sparsity: {'re:.*layers.0.mlp.down_proj': 0.0, default: 0.5}\n"))
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert is_nm(model.model.layers[1].mlp.down_proj.weight, 2, 4)


@pytest.mark.parametrize(
    "body, match",
    [
        ("mask_structure: '3:2'", "0 < N < M"),
        ("sparsity: 1.0", r"\[0, 1\)"),
        ("sparsity: -0.1", r"\[0, 1\)"),
        ("mask_structure: '2:4'\n      kernel_size: 4", "odd"),
        ("mask_structure: '2:4'\n      row_coef: -1.0", "greater than or equal to 0"),
        ("mask_structure: '2:4'\n      sparsity: 0.7", "conflicts with mask_structure"),
        ("mask_structure: '0:0'", "sparsity is required"),
        ("mask_structure: '2:4'\n      kernal_size: 3", "kernal_size"),
    ],
)
def test_recipe_validation_errors(body, match):
    with pytest.raises(ValidationError, match=match):
        Recipe.create_instance(_recipe("    CRePEPruningModifier:\n      " + body + "\n"))


def test_ria_rejects_crepe_coefficients():
    with pytest.raises(ValidationError, match="CRePEPruningModifier"):
        Recipe.create_instance(_recipe("    RIAPruningModifier:\n      neighbor_coef: 0.1\n      mask_structure: '2:4'\n"))


def test_indivisible_layer_error_names_layer():
    with pytest.raises(LayerShapeError, match=r"layer 'model.layers.0.self_attn.q_proj'.*ignore"):
        _run(tiny_llama(), _recipe("    CRePEPruningModifier:\n      mask_structure: '3:7'\n"))


def test_nan_weight_error_names_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.gate_proj"):
        _run(model, _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n"))


def test_targets_matching_nothing_is_error():
    with pytest.raises(PruningError, match="match no"):
        _run(tiny_llama(), _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n      targets: ['re:.*nothing']\n"))


def test_record_is_valid_json_in_saved_config(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    _run(str(tiny_model_dir), _recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n      neighbor_coef: 0.1\n"), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg[RECORD_KEY]["config"]["neighbor_coef"] == 0.1
    assert cfg[RECORD_KEY]["plugin_version"] == crepe_plugin.__version__


def test_reconstruct_recipe_keeps_2of4_and_lowers_layer_error(tmp_path, tiny_model_dir):
    """reconstruct: true updates kept weights (exact 2:4 still) and lowers the output error
    of a first-layer projection on its calibration inputs versus masking alone."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    q = dense.model.layers[0].mlp.gate_proj
    inputs = []
    h = q.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    tok = tiny_tokenizer()
    with torch.no_grad():
        for row in calib_dataset(8):
            dense(**tok(row["text"], return_tensors="pt", truncation=True, max_length=128))
    h.remove()
    X = torch.cat(inputs)
    w0 = q.weight.detach().clone()

    out = tmp_path / "r"
    _run(str(tiny_model_dir), str(ROOT / "recipes" / "crepe_2of4_reconstruct.yaml"), out)
    plain_out = tmp_path / "p"
    _run(str(tiny_model_dir), str(ROOT / "recipes" / "crepe_2of4.yaml"), plain_out)
    wr = load_file(out / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    wp = load_file(plain_out / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]
    assert is_nm(wr, 2, 4) and torch.equal(wr == 0, wp == 0)  # same mask (first layer)
    err = lambda w: float(((X @ (w0 - w).t()) ** 2).sum())  # noqa: E731
    assert err(wr) < 0.9 * err(wp)
    rec = read_record(out)
    assert rec["config"]["reconstruct"] is True and rec["config"]["refine_steps"] == 20
    for k, v in load_file(out / "model.safetensors").items():
        if k.removesuffix(".weight") in rec["modules"]:
            assert is_nm(v, 2, 4), k


def test_reconstruct_validation():
    with pytest.raises(ValidationError, match="dampening_frac"):
        Recipe.create_instance(_recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n      reconstruct: true\n      dampening_frac: 0\n"))


@pytest.mark.parametrize("structure,extra", [("2:4", ""), ("0:0", "      sparsity: 0.5\n      scope: row\n")])
def test_adaptive_mask_selection_through_oneshot(tmp_path, tiny_model_dir, structure, extra):
    body = (
        f"    CRePEPruningModifier:\n      mask_structure: '{structure}'\n{extra}"
        "      reconstruct: true\n      mask_selection: adaptive\n      block_size: 32\n"
    )
    out = tmp_path / "a"
    _run(str(tiny_model_dir), _recipe(body), out)
    rec = read_record(out)
    assert rec["config"]["mask_selection"] == "adaptive" and rec["config"]["reconstruct"] is True
    weights = load_file(out / "model.safetensors")
    for name in rec["modules"]:
        w = weights[name + ".weight"]
        if structure == "2:4":
            assert is_nm(w, 2, 4), name
        else:  # row scope: every row keeps exactly half of its inputs
            assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), w.shape[1] // 2)), name


def test_adaptive_mask_selection_needs_reconstruction():
    with pytest.raises(ValidationError, match="reconstruct: true"):
        Recipe.create_instance(_recipe("    CRePEPruningModifier:\n      mask_structure: '2:4'\n      mask_selection: adaptive\n"))


def test_defaults_are_the_searched_ones_per_structure():
    """One resolved configuration per modifier: unset fields take the structure's shipped default,
    set ones win, and the object is built once (not per access)."""
    from crepe_plugin.core import CREPE_DEFAULTS

    nm = CRePEPruningModifier(mask_structure="2:4")
    assert nm.crepe_config == CREPE_DEFAULTS["nm"] and not nm.crepe_config.is_ria
    assert nm.row_coef is None and nm.crepe_config is nm.crepe_config is nm.prune_config.score
    un = CRePEPruningModifier(mask_structure="0:0", sparsity=0.5)
    assert un.crepe_config == CREPE_DEFAULTS["unstructured"] and un.prune_config.scope == "row"
    one = CRePEPruningModifier(mask_structure="2:4", row_coef=1.25)  # a recipe value wins, the rest stay default
    assert one.crepe_config == CREPE_DEFAULTS["nm"].override(row_coef=1.25)
    assert RIAPruningModifier(mask_structure="2:4").crepe_config == RIA_CONFIG
    assert RIAPruningModifier(mask_structure="0:0", sparsity=0.5).prune_config.scope == "matrix"
    with pytest.raises(ValidationError, match="both 0"):  # refused when the recipe is parsed
        CRePEPruningModifier(mask_structure="2:4", row_coef=0.0, col_coef=0.0)


def test_docstring_yaml_shows_the_shipped_defaults():
    import re

    import yaml

    from crepe_plugin.core import CREPE_DEFAULTS

    block = re.search(r"```yaml\n(.*?)```", CRePEPruningModifier.__doc__, re.S).group(1)
    args = yaml.safe_load(textwrap.dedent(block))["sparsity_stage"]["sparsity_modifiers"]["CRePEPruningModifier"]
    assert set(CRePEConfig.model_fields) <= set(args)  # every coefficient is shown
    assert CRePEPruningModifier(**args).crepe_config == CREPE_DEFAULTS["nm"]


def test_one_layer_predicate_selects_for_targets_ignore_and_sparsity_keys(tmp_path):
    """``crepe_plugin.selection``: targets / ignore as llm-compressor reads them (names, containers,
    classes, 're:'), the default ignores, Conv1D; a sparsity-map key selects as a target does."""
    from transformers import AutoModelForCausalLM

    from crepe_plugin.modifiers.base import layer_sparsities
    from crepe_plugin.selection import layer_filter, select_layers
    from crepe_plugin.testing import save_tiny_gpt2

    model = tiny_llama(layers=2)
    names = [f"model.layers.{i}.{p}" for i in range(2) for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    assert list(select_layers(model)) == names  # every Linear but the lm_head, in model order
    assert list(select_layers(model, ["model.layers.1"], [])) == names[7:]  # a container by name
    assert list(select_layers(model, "LlamaMLP", ["re:.*up_proj$"])) == [n for n in names if "gate" in n or "down" in n]
    keep = layer_filter(model, ["re:.*q_proj$"])
    assert keep(model.model.layers[0].self_attn.q_proj, names[0]) and not keep(model.model.layers[0].self_attn.k_proj, names[1])
    gpt2 = AutoModelForCausalLM.from_pretrained(save_tiny_gpt2(tmp_path / "gpt2", layers=1))
    assert list(select_layers(gpt2)) == [f"transformer.h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]

    layers = select_layers(model)
    sp = layer_sparsities({"model.layers.0": 0.3, "re:.*down_proj$": 0.7, "LlamaAttention": 0.2, "default": 0.5}, model, layers)
    assert sp == {n: 0.3 if n.startswith("model.layers.0.") else 0.7 if "down" in n else 0.2 if "attn" in n else 0.5 for n in names}
    with pytest.raises(PruningError, match="match no targeted layer"):
        layer_sparsities({"re:.*nothing": 0.5, "default": 0.5}, model, layers)
    with pytest.raises(PruningError, match="no entry for layer"):
        layer_sparsities({"model.layers.0": 0.5}, model, layers)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_is_read_by_llmcompressor(recipe):
    from crepe_plugin.pipeline import load_recipe

    assert load_recipe(str(ROOT / "recipes" / recipe)).modifiers
