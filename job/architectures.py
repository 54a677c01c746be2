"""The real DeepSeek-R1-Distill architectures as data: the shapes that set a model's size, speed and memory.

What each entry holds is taken from the released ``config.json`` of the named model. The parameter counts
here are analytic (from the shapes), so they hold without building a model: the unsloth backend sizes its
plan from them (:func:`job.backends.memory_plan.estimate_peak_bytes`) before any weights are loaded.

Random-init models, the synthetic tokenizer and the FLOPs count the benchmarks report against are built from
these shapes in :mod:`benchmarks.models` (not part of the installed package).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

#: The projections LoRA adapts in medft's default config (mirrors job.config.ALL_PROJECTIONS).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer's shape: everything that sets its size, speed and memory."""

    key: str
    name: str
    model_type: str  # "llama" or "qwen2"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 2
    special_tokens: dict[str, int] = field(default_factory=dict)  # name -> id, beyond bos/eos/pad

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2"

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear projection in one decoder layer."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: projections, their biases (Qwen2's q/k/v) and two RMSNorms."""
        shapes = self.projection_shapes()
        weights = sum(a * b for a, b in shapes.values())
        bias = sum(shapes[p][1] for p in ("q_proj", "k_proj", "v_proj")) if self.qkv_bias else 0
        return weights + bias + 2 * self.hidden_size

    def parameter_counts(self) -> dict[str, int]:
        """Analytic counts: ``total``, ``input_embedding``, ``lm_head`` (0 when tied), ``layers``."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        layers = self.num_hidden_layers * self.layer_parameters()
        return {"total": embed + head + layers + self.hidden_size, "input_embedding": embed, "lm_head": head,
                "layers": layers, "final_norm": self.hidden_size}

    def lora_parameters(self, r: int, target_modules: tuple[str, ...] = PROJECTIONS) -> int:
        """Trainable parameters LoRA of rank ``r`` adds on ``target_modules`` in every layer."""
        shapes = self.projection_shapes()
        return self.num_hidden_layers * sum(r * (shapes[m][0] + shapes[m][1]) for m in target_modules
                                            if m in shapes)


LLAMA_8B = Architecture(
    key="llama8b", name="DeepSeek-R1-Distill-Llama-8B", model_type="llama", hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004,
)
QWEN_7B = Architecture(
    key="qwen7b", name="DeepSeek-R1-Distill-Qwen-7B", model_type="qwen2", hidden_size=3584,
    intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=151646, eos_token_id=151643, pad_token_id=151654,
)
QWEN_1_5B = Architecture(
    key="qwen1.5b", name="DeepSeek-R1-Distill-Qwen-1.5B", model_type="qwen2", hidden_size=1536,
    intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=151646, eos_token_id=151643, pad_token_id=151654,
)
#: Small enough for a test to build in seconds; Llama-shaped with grouped-query attention like the real ones.
TINY_LLAMA = Architecture(
    key="tiny-llama", name="tiny-llama", model_type="llama", hidden_size=256, intermediate_size=704,
    num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, vocab_size=2048,
    rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=4096,
    bos_token_id=2000, eos_token_id=2001, pad_token_id=2004,
)
TINY_QWEN2 = replace(TINY_LLAMA, key="tiny-qwen2", name="tiny-qwen2", model_type="qwen2", rms_norm_eps=1e-6,
                     rope_theta=10000.0, rope_scaling=None)

ARCHITECTURES: dict[str, Architecture] = {
    a.key: a for a in (LLAMA_8B, QWEN_7B, QWEN_1_5B, TINY_LLAMA, TINY_QWEN2)}


def get(key_or_name: str) -> Architecture:
    """An architecture by key (``llama8b``) or model name; raises KeyError listing the known ones."""
    found = ARCHITECTURES.get(key_or_name) or match(key_or_name)
    if found is None:
        raise KeyError(f"unknown architecture {key_or_name!r}; known: {', '.join(ARCHITECTURES)}")
    return found


def match(base: str) -> Architecture | None:
    """The known architecture a model URI names (``hf://deepseek-ai/DeepSeek-R1-Distill-Llama-8B``,
    ``unsloth/DeepSeek-R1-Distill-Qwen-7B-bnb-4bit``), or None."""
    last = re.split(r"[\\/]", base.rstrip("/").split("://", 1)[-1])[-1].lower()
    for arch in ARCHITECTURES.values():
        name = arch.name.lower()
        if last == name or last.startswith(name + "-"):
            return arch
    return None


def from_config_dict(config: dict[str, Any], key: str = "local") -> Architecture | None:
    """The shape a ``config.json`` describes, for the model types medft knows; None for others."""
    text = config.get("text_config", config)
    if text.get("model_type") not in ("llama", "qwen2", "qwen3", "mistral"):
        return None
    try:
        heads = int(text["num_attention_heads"])
        rope = text.get("rope_parameters") or {}
        return Architecture(
            key=key, name=str(text.get("_name_or_path") or key), model_type=text["model_type"],
            hidden_size=int(text["hidden_size"]), intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            vocab_size=int(text["vocab_size"]),
            rope_theta=float(text.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings",
                                                text.get("tie_word_embeddings", False))),
        )
    except (KeyError, TypeError, ValueError):
        return None


def from_pretrained_dir(path: str | Path) -> Architecture | None:
    """The shape of a local model directory's ``config.json``; None when absent or of an unknown type."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        return from_config_dict(json.loads(cfg.read_text()), key=Path(path).name)
    except (OSError, ValueError):
        return None
