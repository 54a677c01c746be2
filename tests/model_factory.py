"""Tiny random-init Llama and Qwen2 models that tests build in a second, saved as safetensors directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_config(arch: str = "llama", vocab_size: int = 512) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    raise ValueError(arch)


def save_tiny_model(dest: Path, tokenizer: Any, arch: str = "llama", seed: int = 0) -> Path:
    """Write a random-init model sized to ``tokenizer`` plus the tokenizer to ``dest``; returns ``dest``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=len(tokenizer))
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    return dest

