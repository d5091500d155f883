"""Tiny offline models and tokenizers for tests, examples and smoke runs (no hub).

Requires the ``compress`` extra (transformers, tokenizers).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["tiny_tokenizer", "tiny_llama", "save_tiny_llama", "save_tiny_gpt2", "save_tiny_moe", "save_tiny_llava",
           "save_weight_layouts"]

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


def _heavy_tails(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(torch.exp(torch.randn_like(p) * 0.5))


def save_tiny_moe(path: str | Path, arch: str = "mixtral", hidden: int = 64, intermediate: int = 64, layers: int = 2,
                  experts: int = 4, top_k: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 128,
                  seed: int = 0) -> Path:  # fmt: skip
    """A tiny mixture-of-experts decoder from its transformers config: ``arch`` 'mixtral' or
    'qwen3_moe'. transformers 5 stores the experts fused, as 3-D ``gate_up_proj`` / ``down_proj``."""
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, max_position_embeddings=512, num_experts_per_tok=top_k,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)  # fmt: skip
    if arch == "mixtral":
        cfg = MixtralConfig(intermediate_size=intermediate, num_local_experts=experts, **common)
    elif arch == "qwen3_moe":
        cfg = Qwen3MoeConfig(moe_intermediate_size=intermediate, intermediate_size=intermediate, num_experts=experts,
                             head_dim=hidden // heads, decoder_sparse_step=1, mlp_only_layers=[], **common)  # fmt: skip
    else:
        raise ValueError(f"unknown tiny MoE architecture {arch!r}; 'mixtral' or 'qwen3_moe'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    _heavy_tails(model)
    path = Path(path)
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def save_tiny_llava(path: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A tiny LLaVA (CLIP vision tower, projector, Llama language model) with its processor
    (CLIP image processor + the character tokenizer with an ``<image>`` token)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=hidden)  # fmt: skip
    text = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2)  # fmt: skip
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-1, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    _heavy_tails(model)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)  # CLIP adds a CLS token  # fmt: skip
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def save_weight_layouts(root: str | Path) -> dict[str, Path]:
    """Folders of tiny safetensors files laid out as checkpoints are found in the wild (single file,
    shards with their index, a stale file beside them, shards without an index, a stray file, an
    explicit ``transformers_weights``, Mistral's consolidated file), to compare which files a loader
    reads. Each holds a config.json; tensors are 2 x 4."""
    import json

    from safetensors.torch import save_file

    root = Path(root)
    index = {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"}
    layouts = {
        "single": ["model.safetensors"],
        "sharded": [*index.values(), "index"],
        "stale dense beside shards": [*index.values(), "index", "model.safetensors"],
        "a second file after model.safetensors": ["model.safetensors", "pruned.safetensors"],
        "shards without index": list(index.values()),
        "stray file beside shards": [*index.values(), "index", "calib_stats.safetensors"],
        "explicit transformers_weights": ["model.safetensors", "weights.safetensors", "explicit"],
        "consolidated": ["model.safetensors", "consolidated.safetensors"],
    }
    out = {}
    for name, files in layouts.items():
        d = root / name.replace(" ", "-")
        d.mkdir(parents=True)
        config = {"transformers_weights": "weights.safetensors"} if "explicit" in files else {}
        (d / "config.json").write_text(json.dumps(config))
        for f in files:
            if f == "index":
                (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
            elif f != "explicit":
                keys = [k for k, v in index.items() if v == f] or list(index)
                save_file({k: torch.ones(2, 4) for k in keys}, str(d / f), metadata={"format": "pt"})
        out[name] = d
    return out
