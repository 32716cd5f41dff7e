"""Llama-style causal LMs built from config (Hugging Face `LlamaForCausalLM`).

Proxies and targets are the same architecture at different sizes; a size is a
config group (`proxy=tiny`, `proxy=regmix_1m`, `train=tiny`, ...). The RegMix
1M proxy (arXiv 2407.01492, Table 6 / `regmix/model_training` configs) is
2 layers, hidden 256, FFN 512, 8 heads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    context: int
    kv_heads: int | None = None
    tie_embeddings: bool = False
    rope_theta: float = 10000.0


def build_model(shape: ModelShape | dict, vocab_size: int, bos_id: int = 1, eos_id: int = 2,
                pad_id: int = 0, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised Llama; `seed` fixes the initial weights."""
    if isinstance(shape, dict):
        shape = ModelShape(**shape)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape.hidden, intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads or shape.heads,
        max_position_embeddings=shape.context, tie_word_embeddings=shape.tie_embeddings,
        rope_theta=shape.rope_theta, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, use_cache=False,
    )
    # sdpa: fused attention on CPU and CUDA alike; no extra package needed.
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def flop_params(model: torch.nn.Module) -> int:
    """N in the 6ND / 2ND FLOP rule: every parameter except the input embedding
    table (a lookup, no multiply-adds). The LM head counts; when it is tied to
    the embedding the shared matrix is counted once, as the head."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    return total if emb is head else total - emb.numel()


def save_with_tokenizer(model, tokenizer, path) -> None:
    """`save_pretrained` of a model and its tokenizer, loadable by transformers and by
    stock lm-eval (`lm_eval --model hf --model_args pretrained=PATH`). The saved
    tokenizer and config name EOS as the BOS token: lm-eval's hf model scores an empty
    context (the unconditional term of acc_mutual_info) after the tokenizer's BOS, a
    token these models never saw in training, where documents are joined by EOS and
    the in-run adapter puts EOS; with EOS as BOS both score the same."""
    import copy
    tok = copy.deepcopy(tokenizer)
    tok.bos_token = tok.eos_token
    configs = [model.config] + ([model.generation_config] if getattr(model, "generation_config", None) else [])
    before = [c.bos_token_id for c in configs]
    try:
        for c in configs:
            c.bos_token_id = tok.eos_token_id
        model.save_pretrained(path)
    finally:
        for c, b in zip(configs, before):
            c.bos_token_id = b
    tok.save_pretrained(path)
