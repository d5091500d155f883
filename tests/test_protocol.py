"""The measuring protocol: calibration, validation and test texts never mixed."""

import subprocess
import sys

import pytest

from crepe_plugin.data import TestTextError, protocol, read_text, refuse_test_text, split_source

from .conftest import SHARED_DATA


def test_fractional_slices_are_disjoint_and_cover_the_file(tmp_path):
    f = tmp_path / "t.txt"
    lines = [f"line {i} " + "x" * (i % 7) for i in range(1000)]
    f.write_text("\n".join(lines) + "\n")
    head, tail = read_text(f"{f}[:0.75]"), read_text(f"{f}[0.75:]")
    assert head + tail == f.read_text()
    assert head.endswith("\n") and 0.74 < len(head) / len(f.read_text()) < 0.76  # cut at a line start
    assert not set(head.splitlines()) & set(tail.splitlines())
    assert read_text(f"{f}[0.25:0.5]") in f.read_text()
    assert split_source(str(f)) == (str(f), 0.0, 1.0)


@pytest.mark.parametrize("bad", ["[0.8:0.2]", "[0:1.5]", "[a:b]"])
def test_bad_slices_are_refused(tmp_path, bad):
    f = tmp_path / "t.txt"
    f.write_text("a\nb\n")
    with pytest.raises(ValueError, match="slice"):
        read_text(f"{f}{bad}")


def test_calibration_windows_come_only_from_the_calibration_part(tmp_path):
    from crepe_plugin.data import calibration_dataset
    from crepe_plugin.testing import tiny_tokenizer

    f = tmp_path / "t.txt"
    f.write_text("alpha beta gamma delta\n" * 300 + "ZZZZ ZZZZ ZZZZ\n" * 100)  # 'Z' only in the last 25%
    tok = tiny_tokenizer()
    z = tok("Z", add_special_tokens=False)["input_ids"][0]
    head = calibration_dataset(f"{f}[:0.75]", tok, num_samples=64, seqlen=8)
    assert z not in {i for row in head["input_ids"] for i in row}
    tail = calibration_dataset(f"{f}[0.75:]", tok, num_samples=8, seqlen=8)
    assert z in {i for row in tail["input_ids"] for i in row}


def test_project_protocol_splits_wikitext_valid():
    p = protocol(SHARED_DATA)
    if p is None:
        pytest.fail(f"WikiText-2 missing under {SHARED_DATA}; set CREPE_DATA_DIR")
    assert p.calib.endswith("wiki.valid.tokens.txt[:0.75]") and p.validation.endswith("wiki.valid.tokens.txt[0.75:]")
    assert p.test.endswith("wiki.test.raw.txt")
    refuse_test_text(p.calib, "calib")
    refuse_test_text(p.validation, "validation")
    with pytest.raises(TestTextError, match="test text"):
        refuse_test_text(p.test, "--eval")
    refuse_test_text(p.test, "--eval", allow=True)  # a loud warning, not an error


def test_search_validate_refuses_the_test_text(tmp_path):
    test = SHARED_DATA / "wikitext2" / "wiki.test.raw.txt"
    r = subprocess.run([sys.executable, "-m", "crepe_plugin.cli", "search-validate", str(tmp_path), "--eval", str(test)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --eval") and "test text" in lines[0]
