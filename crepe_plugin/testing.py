"""Tiny offline models and tokenizers for tests, examples and smoke runs (no hub).

Requires the ``compress`` extra (transformers, tokenizers).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["tiny_tokenizer", "tiny_llama", "save_tiny_llama", "save_tiny_gpt2"]

_ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:'\"!?-()\n@=")


def tiny_tokenizer():
    """A character-level fast tokenizer (vocab < 100) built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in _ALPHABET:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def tiny_llama(
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    # random init is too uniform to tell scoring rules apart; give weights heavy tails
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.exp(torch.randn_like(p) * 0.5))
    return model


def save_tiny_llama(path: str | Path, **kwargs) -> Path:
    path = Path(path)
    model = tiny_llama(**kwargs)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_gpt2(path: str | Path, hidden: int = 64, layers: int = 2, heads: int = 4, vocab: int = 128, seed: int = 0) -> Path:
    """A tiny GPT-2 (transformers Conv1D layers, stored (in, out); attn.c_proj is square)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512,
                     bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(torch.exp(torch.randn_like(p) * 0.5))
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
