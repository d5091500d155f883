"""`crepe verify` is not fooled and does not crash: corrupt a small valid checkpoint in many
ways; verify must never raise and never exit 0 on a broken one."""

import json
import random
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from crepe_plugin.cli import main
from crepe_plugin.checkpoint.record import RECORD_KEY

from .conftest import ROOT


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_model_dir, calib_file):
    out = tmp_path_factory.mktemp("v") / "pruned"
    assert main(["prune", str(tiny_model_dir), "--recipe", str(ROOT / "recipes" / "crepe_2of4.yaml"), "--calib",
                 str(calib_file), "--out", str(out), "--num-samples", "4", "--seqlen", "64"]) == 0  # fmt: skip
    assert main(["verify", str(out)]) == 0
    return out


def _copy(pruned, tmp_path):
    d = tmp_path / "c"
    shutil.copytree(pruned, d)
    return d


def _set_record(d, value):
    cfg = json.loads((d / "config.json").read_text())
    cfg[RECORD_KEY] = value
    (d / "config.json").write_text(json.dumps(cfg))


DEEP = "deep"  # a record nested 100000 levels deep, written as text (json cannot build it)


@pytest.mark.parametrize(
    "record", ["a string", [1, 2], 3.5, float("nan"), None, {"modules": "x"}, {"modules": {"a": {"structure": 24}}},
               {"modules": {"model.layers.0.mlp.up_proj": {"structure": "5:4"}}}, DEEP],  # fmt: skip
    ids=["string", "list", "number", "nan", "null", "modules-string", "structure-int", "structure-bad", "deep"],
)
def test_malformed_record(record, pruned, tmp_path, capsys):
    d = _copy(pruned, tmp_path)
    if record == DEEP:
        cfg = json.loads((d / "config.json").read_text())
        del cfg[RECORD_KEY]
        deep = '{"modules": ' * 100000 + "{}" + "}" * 100000
        (d / "config.json").write_text(json.dumps(cfg)[:-1] + f', "{RECORD_KEY}": {deep}}}')
    else:
        _set_record(d, record)
    rc = main(["verify", str(d), "--require-record"])
    assert rc in (1, 2)
    if record is not None:
        assert rc == 2 and "config.json" in capsys.readouterr().err


def test_no_record_is_not_ok(pruned, tmp_path, capsys):
    d = _copy(pruned, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg[RECORD_KEY]
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["verify", str(d)]) == 0
    out = capsys.readouterr().out
    assert "NOT VERIFIED" in out and "\nOK" not in out
    assert main(["verify", str(d), "--require-record"]) == 1


def test_recorded_layer_missing_and_nan_weights(pruned, tmp_path):
    d = _copy(pruned, tmp_path)
    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.self_attn.q_proj.weight"][0, 1] = float("nan")  # a kept position
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(d)]) == 1
    del sd["model.layers.0.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(d)]) == 2


def test_unstructured_record_sparsity_is_checked(pruned, tmp_path, capsys):
    d = _copy(pruned, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    name = "model.layers.0.mlp.up_proj"
    cfg[RECORD_KEY]["modules"] = {name: {"structure": "0:0", "sparsity": 0.7}}
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["verify", str(d)]) == 1
    assert "sparsity 0.7000" in capsys.readouterr().err


def _corrupt(d, rng):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.choice(["header-bytes", "truncate", "record-values", "header-json", "tensor-bytes-nan", "grow"])
    if kind == "header-bytes":
        for _ in range(rng.randint(1, 8)):
            data[8 + rng.randrange(n)] = rng.randrange(256)
        f.write_bytes(bytes(data))
    elif kind == "truncate":
        f.write_bytes(bytes(data[: rng.randrange(1, len(data) - 1)]))
    elif kind == "grow":
        f.write_bytes(bytes(data) + bytes(rng.randrange(1, 64)))
    elif kind == "header-json":
        header = json.loads(data[8 : 8 + n])
        k = rng.choice([k for k in header if k != "__metadata__"])
        field = rng.choice(["data_offsets", "shape", "dtype"])
        header[k][field] = rng.choice([None, "x", [1], [-5, 3], {"a": 1}])
        h = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(h)) + h + bytes(data[8 + n :]))
    elif kind == "tensor-bytes-nan":
        sd = load_file(f)
        k = rng.choice([k for k in sd if "proj" in k])
        sd[k].view(-1)[rng.randrange(sd[k].numel())] = float(rng.choice(["nan", "inf"]))
        save_file(sd, f, metadata={"format": "pt"})
    else:
        cfg = json.loads((d / "config.json").read_text())
        mods = cfg[RECORD_KEY]["modules"]
        k = rng.choice(sorted(mods))
        field, bad = rng.choice([("structure", [None, -1, "7:3", [], "2:"]), ("sparsity", [-1, 2.5, "x", []]),
                                 ("layout", [None, "sideways", 3])])  # fmt: skip
        mods[k][field] = rng.choice(bad)
        (d / "config.json").write_text(json.dumps(cfg))
    return kind


@pytest.mark.parametrize("seed", range(40))
def test_random_corruption_never_passes_and_never_raises(seed, pruned, tmp_path):
    rng = random.Random(seed)
    d = _copy(pruned, tmp_path)
    kind = _corrupt(d, rng)
    rc = main(["verify", str(d), "--require-record"])  # must not raise
    if kind == "tensor-bytes-nan":
        assert rc == 1, kind
    elif kind == "record-values":
        assert rc == 2, kind
    else:
        assert rc != 0 or _still_valid(d), kind


def _still_valid(d):
    """A header mutation can leave the file valid (e.g. a byte inside a dtype name that still
    parses to the same header); then verify passing is correct."""
    try:
        load_file(d / "model.safetensors")
        return True
    except Exception:  # noqa: BLE001
        return False


def test_weight_files_resolve_as_transformers_resolves_them(tmp_path):
    """verify's notion of the files transformers reads is transformers' own, on every layout."""
    from transformers.modeling_utils import _get_resolved_checkpoint_files

    from crepe_plugin.checkpoint.verify import _transformers_files
    from crepe_plugin.testing import save_weight_layouts

    for name, d in save_weight_layouts(tmp_path).items():
        config = json.loads((d / "config.json").read_text())
        try:
            files, _ = _get_resolved_checkpoint_files(str(d), None, None, None, None, False,
                                                      transformers_explicit_filename=config.get("transformers_weights"))
            theirs = sorted(Path(f).name for f in files)
        except OSError:
            theirs = None
        assert _transformers_files(d, config) == theirs, name
