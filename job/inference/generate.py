"""Answering one question with a loaded model: sampling settings, stop tokens, the completion split in two.

The prompt is the template's, token for token the masked head of a training example, opened with
``<think>\\n``; the completion is split at the first ``</think>`` into reasoning and answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from job.inference.console import CUT_OFF, SectionWriter, TokenStream
from job.inference.loading import Loaded, _device
from job.templates import THINK_CLOSE, THINK_OPEN
from registry.errors import ConfigError
from registry.logs import get_logger

log = get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
#: DeepSeek's advice for R1-Distill models: 0.5-0.7, 0.6 recommended, with top-p 0.95.
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.95
#: numpy, which transformers' set_seed seeds, takes seeds in [0, 2**32).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Sampling:
    """Generation settings; ``temperature == 0`` means greedy decoding (top-p is then unused)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature must be 0 (greedy) or a finite positive number, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be in 0..{MAX_SEED}, got {self.seed}")


@dataclass(frozen=True)
class Answer:
    """One answered question; ``to_dict`` is what ``--json`` prints.

    ``finish_reason`` is ``stop`` when the model ended its answer, ``length`` when ``max_new_tokens`` cut
    it off (then ``answer`` may be empty: the model was still reasoning).
    """

    question: str
    reasoning: str
    answer: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ref: str
    finish_reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        """The reasoning and the answer under headings; an answer cut off before it began says so."""
        answer = self.answer or (CUT_OFF if self.finish_reason == "length" else "")
        return f"Reasoning:\n{self.reasoning}\n\nAnswer:\n{answer}"


def split_completion(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a completion that follows the prompt's opening ``<think>\\n``.

    The reasoning is everything before the first ``</think>``, the answer everything after it, both
    stripped. Without ``</think>`` (cut off while reasoning) all of it is reasoning and the answer is empty.
    """
    reasoning, sep, answer = text.partition(THINK_CLOSE)
    return (reasoning.strip(), answer.strip()) if sep else (text.strip(), "")


def stop_ids(loaded: Loaded) -> list[int]:
    """Token ids that end a response: the tokenizer's EOS, which training appended to every example, and
    the model's own generation EOS ids (they can differ, e.g. after a GGUF conversion)."""
    ids: list[int] = []
    if loaded.tokenizer.eos_token_id is not None:
        ids.append(int(loaded.tokenizer.eos_token_id))
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        configured = [configured]
    ids += [int(i) for i in configured or () if int(i) not in ids]
    return ids


def decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """Decode completion ids without special tokens, keeping ``<think>``/``</think>`` should a tokenizer
    mark them special (R1-Distill tokenizers add them as tokens)."""
    keep = {tokenizer.convert_tokens_to_ids(t) for t in (THINK_OPEN.strip(), THINK_CLOSE)
            if t in getattr(tokenizer, "all_special_tokens", ())}
    special = set(getattr(tokenizer, "all_special_ids", ())) - keep

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode([i for i in ids if i not in special], skip_special_tokens=False))

    return decode


def generation_config(loaded: Loaded, sampling: Sampling, stops: list[int]) -> Any:
    import copy

    from transformers import GenerationConfig

    own = getattr(loaded.model, "generation_config", None)
    config = copy.deepcopy(own) if own is not None else GenerationConfig()
    config.max_new_tokens = sampling.max_new_tokens
    config.max_length = None
    config.use_cache = True  # the KV cache: each new token attends to cached keys and values
    config.eos_token_id = stops
    config.pad_token_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else stops[0]
    if sampling.temperature > 0:
        config.do_sample, config.temperature, config.top_p = True, sampling.temperature, sampling.top_p
    else:
        # Sampling knobs a model ships in its generation config would only earn warnings when greedy.
        config.do_sample, config.temperature, config.top_p, config.top_k = False, None, None, None
    return config


def generate(loaded: Loaded, question: str, sampling: Sampling = Sampling(), *, stream: TextIO | None = None
             ) -> Answer:
    """Answer one question (a fresh single-turn prompt, as the model was trained).

    ``stream``: a text stream that receives the reasoning and the answer as tokens are generated. The same
    ``sampling.seed`` gives the same answer on the same machine. Raises ConfigError for an empty question.
    """
    import torch

    question = question.strip() if isinstance(question, str) else ""
    if not question:
        raise ConfigError("the question is empty; pass --question \"...\" (or type one at the chat prompt)")
    if loaded.model is None:
        raise ConfigError(f"{loaded.label} was unloaded; load it again")
    ids = loaded.prompt_ids(question)
    stops = stop_ids(loaded)
    if not stops:
        raise ConfigError(f"{loaded.label}: its tokenizer defines no eos_token, so generation could not stop")
    device = _device(loaded.model)
    inputs = torch.tensor([ids], dtype=torch.long, device=device)
    decode = decoder(loaded.tokenizer)
    writer = SectionWriter(stream) if stream is not None else None
    streamer = TokenStream(decode, writer) if writer is not None else None
    if sampling.seed is not None:
        from transformers import set_seed

        set_seed(sampling.seed)
    config = generation_config(loaded, sampling, stops)
    decode(ids[-1:])  # a tokenizer's one-time warnings (at its first decode) come now, not inside the answer
    with writer or nullcontext():
        if writer is not None:
            writer.open()
        started = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                        generation_config=config, streamer=streamer)
        seconds = time.perf_counter() - started
        new = [int(i) for i in out[0, len(ids):].tolist()]
        # Generation pads nothing for a single row, but cut at the first stop token in case a model keeps going.
        end = next((n for n, i in enumerate(new) if i in stops), None)
        finish = "stop" if end is not None else "length"
        completion = new[:end + 1] if end is not None else new
        reasoning, answer = split_completion(decode(completion))
        if writer is not None:
            writer.close(finish)
    result = Answer(question=question, reasoning=reasoning, answer=answer, prompt_tokens=len(ids),
                    completion_tokens=len(completion), seconds=round(seconds, 3), ref=loaded.label,
                    finish_reason=finish)
    log.info("inference.answered", ref=loaded.label, prompt_tokens=result.prompt_tokens,
             completion_tokens=result.completion_tokens, seconds=result.seconds, finish_reason=finish,
             tokens_per_s=round(result.completion_tokens / seconds, 1) if seconds > 0 else None)
    return result
