"""Random-init models with the real DeepSeek-R1-Distill shapes (:mod:`job.architectures`), for benchmarks and
GPU tests.

The hub is out of reach on the GPU machine and in CI, so benchmarks and GPU tests train models with the
real shapes and random weights: same parameter count, same FLOPs per token, same memory. Speed does not
depend on the values, only on the shapes.

The tokenizer is synthetic: a word-level vocabulary where the word ``t<N>`` is token ``N``, with the released
models' own begin/end-of-sentence ids, so text made of ``t<N>`` words tokenizes to exactly the ids chosen.
:func:`train_flops_per_token` is the 4 x N count the benchmark reports model FLOPs utilization against.

Imports only the standard library and :mod:`job.architectures` at module level; torch, transformers and
tokenizers are imported by the functions that build something.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from job.architectures import Architecture


def hf_config_dict(arch: Architecture, **overrides: Any) -> dict[str, Any]:
    """The ``config.json`` content transformers builds ``arch`` from."""
    model_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch.model_type]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": arch.rope_theta}
    if arch.rope_scaling:
        rope = {**arch.rope_scaling, "rope_theta": arch.rope_theta}
    out: dict[str, Any] = {
        "architectures": [model_class], "model_type": arch.model_type, "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_key_value_heads,
        "head_dim": arch.head_dim, "vocab_size": arch.vocab_size, "rms_norm_eps": arch.rms_norm_eps,
        "rope_parameters": rope, "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings, "hidden_act": "silu", "initializer_range": 0.02,
        "bos_token_id": arch.bos_token_id, "eos_token_id": arch.eos_token_id,
        "pad_token_id": arch.pad_token_id, "attention_dropout": 0.0, "use_cache": True,
    }
    if arch.model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=arch.num_hidden_layers)
    out.update(overrides)
    return out


def train_flops_per_token(arch: Architecture) -> int:
    """Model FLOPs of one LoRA training token: 4 x the parameters outside the input embedding.

    Forward is 2N; backward needs only the activations' gradients through the frozen weights (another 2N),
    not the weights' own (the LoRA factors' gradients are negligible). The input embedding is a lookup.
    Recomputation by activation checkpointing is not counted: MFU credits useful work only.
    """
    counts = arch.parameter_counts()
    return 4 * (counts["total"] - counts["input_embedding"])


def hf_config(arch: Architecture, **overrides: Any) -> Any:
    """A transformers ``PretrainedConfig`` for ``arch``."""
    from transformers import AutoConfig

    d = hf_config_dict(arch, **overrides)
    return AutoConfig.for_model(d.pop("model_type"), **{k: v for k, v in d.items() if k != "architectures"})


def build_tokenizer(arch: Architecture) -> Any:
    """A fast tokenizer over ``arch.vocab_size`` ids: word ``t<N>`` is id ``N``; unknown words map to ``t0``.

    bos/eos/pad are special tokens at the architecture's ids, named as in the released DeepSeek-R1-Distill
    tokenizers (pad is a distinct token so padding never hides an end of sentence).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = {arch.bos_token_id: "<｜begin▁of▁sentence｜>", arch.eos_token_id: "<｜end▁of▁sentence｜>",
             arch.pad_token_id: "<｜pad｜>"}
    names.update({i: n for n, i in arch.special_tokens.items()})
    vocab = {names.get(i, f"t{i}"): i for i in range(arch.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=names[arch.bos_token_id], eos_token=names[arch.eos_token_id],
        pad_token=names[arch.pad_token_id], unk_token="t0", model_max_length=arch.max_position_embeddings)
    fast.add_special_tokens({"additional_special_tokens": []})
    return fast


def build_random_model(arch: Architecture, *, dtype: Any = None, device: Any = None, seed: int = 0) -> Any:
    """A random-init ``*ForCausalLM`` of ``arch`` (transformers' own init: normal(0, 0.02)), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    config = hf_config(arch)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_random_checkpoint(arch: Architecture, dest: str | Path, *, dtype: Any = None, device: Any = None,
                           seed: int = 0, shard_size: str = "5GB") -> Path:
    """Write a random-init model of ``arch`` as a local weights directory (safetensors, config, tokenizer).

    Built on ``device`` (CUDA when available: an 8B model initialises in seconds there, minutes on a CPU).
    A directory already holding ``.medft-random.json`` for the same architecture and seed is reused.
    """
    import torch

    dest = Path(dest)
    marker = dest / ".medft-random.json"
    wanted = {"architecture": asdict(arch), "seed": seed}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return dest
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_random_model(arch, dtype=dtype or torch.bfloat16, device=device, seed=seed)
    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest, max_shard_size=shard_size)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    build_tokenizer(arch).save_pretrained(dest)
    marker.write_text(json.dumps(wanted))
    return dest
