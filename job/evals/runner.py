"""The generation engine: a loaded model answers a benchmark's questions in batches and is scored.

:func:`run_benchmark` takes a :class:`~job.inference.loading.Loaded` (model, tokenizer and the prompt
template the model was trained with: ``loaded.prompt_ids`` is the template's ``encode_prompt``), the
questions and :class:`EvalSettings`, and:

1. builds each prompt from :func:`~job.medical_benchmarks.prompt_text` through the model's own template, so
   the model is asked as it was taught and its response opens with ``<think>\\n``;
2. sorts the prompts by length (longest first: similar lengths share a batch, so little padding is
   computed, and the largest batch runs first, so running out of memory shows at once), and generates
   ``batch_size`` at a time with LEFT padding (every row's last prompt token sits at the same position, so
   the new tokens line up) and the KV cache, greedy unless the settings ask for sampling;
3. stops each row at its first stop token (``job.inference.stop_ids``: the tokenizer's EOS and the
   model's generation EOS ids) or at ``max_new_tokens``, and records per question the completion, its token
   counts, whether the model stopped by itself, and the choice :func:`~job.evals.extract.extract_choice`
   reads from it;
4. scores the items (:func:`~job.evals.scoring.score`).

Greedy decoding gives the same completions batched and one question at a time (left padding is masked and
positions follow the mask), and the same ones on every run. Seeded sampling (``temperature > 0`` with a
seed) repeats on the same machine with the same batch size.

The engine prints nothing: ``progress(done, total)`` is called after every batch (the suite turns it into
a :mod:`registry.progress` task, so it shows as a bar on a terminal and nowhere else).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from job.evals.extract import extract_choice
from job.evals.scoring import BenchmarkResult, ItemResult, score
from job.inference.generate import Sampling, decoder, generation_config, stop_ids
from job.inference.loading import Loaded
from job.medical_benchmarks import Question, prompt_text
from job.templates import THINK_CLOSE
from registry.errors import ConfigError
from registry.logs import get_logger

log = get_logger(__name__)

#: ``progress(done, total)``: called after every batch with the questions answered so far.
Progress = Callable[[int, int], None]
DEFAULT_BATCH_SIZE = 16
DEFAULT_EVAL_MAX_NEW_TOKENS = 1024


def _greedy() -> Sampling:
    return Sampling(max_new_tokens=DEFAULT_EVAL_MAX_NEW_TOKENS, temperature=0.0)


@dataclass(frozen=True)
class EvalSettings:
    """How to generate: ``sampling`` (greedy by default: ``temperature=0``) and ``batch_size`` prompts at once."""

    sampling: Sampling = field(default_factory=_greedy)
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass(frozen=True)
class BenchmarkRun:
    """One benchmark as run: its score, every item in the questions' order, and the generation time."""

    result: BenchmarkResult
    items: tuple[ItemResult, ...]
    seconds: float
    generated_tokens: int


def _batches(order: list[int], size: int) -> list[list[int]]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def _left_padded(prompts: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask) with every prompt right-aligned; the padding is masked out."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _generate(loaded: Loaded, prompts: list[list[int]], config: Any, pad_id: int) -> list[list[int]]:
    """The new token ids of each prompt (padding after a row stopped included; cut by the caller)."""
    import torch

    input_ids, mask = _left_padded(prompts, pad_id, loaded.model.device)
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    return [[int(t) for t in row] for row in out[:, input_ids.shape[1]:].tolist()]


def _until_stop(new: list[int], stops: set[int]) -> tuple[list[int], bool]:
    """The completion up to and including its first stop token, and whether there was one."""
    for n, token in enumerate(new):
        if token in stops:
            return new[:n + 1], True
    return new, False


def reasoning_tokens(ids: list[int], decode: Callable[[list[int]], str]) -> int:
    """How many of ``ids`` come before the token that completes the last ``</think>`` of their text (all of
    them without one): the shortest prefix whose text holds as many ``</think>`` as the whole, less one."""
    closes = decode(ids).count(THINK_CLOSE)
    if closes == 0:
        return len(ids)
    lo, hi = 1, len(ids)  # the shortest prefix ids[:k] with `closes` closings lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        if decode(ids[:mid]).count(THINK_CLOSE) >= closes:
            hi = mid
        else:
            lo = mid + 1
    return lo - 1


def _item(question: Question, prompt: list[int], new: list[int], stops: set[int],
          decode: Callable[[list[int]], str]) -> ItemResult:
    ids, stopped = _until_stop(new, stops)
    body = ids[:-1] if stopped else ids
    completion = decode(body)
    return ItemResult(id=question.id, gold=question.gold,
                      choice=extract_choice(completion, question.options, stopped=stopped), completion=completion,
                      prompt_tokens=len(prompt), completion_tokens=len(ids),
                      reasoning_tokens=reasoning_tokens(body, decode), stopped=stopped)


def run_benchmark(loaded: Loaded, benchmark: str, questions: Sequence[Question], settings: EvalSettings = EvalSettings(),
                  *, progress: Progress | None = None) -> BenchmarkRun:
    """Ask ``loaded`` every question and score the answers as ``benchmark`` (see the module docstring).

    Raises ConfigError when there are no questions or the tokenizer has no EOS token (generation could not
    stop).
    """
    if not questions:
        raise ConfigError(f"benchmark {benchmark}: no questions to ask")
    stops = stop_ids(loaded)
    if not stops:
        raise ConfigError(f"{loaded.label}: its tokenizer defines no eos_token, so generation could not stop")
    config = generation_config(loaded, settings.sampling, stops)
    pad_id = int(config.pad_token_id)
    decode = decoder(loaded.tokenizer)
    prompts = [loaded.prompt_ids(prompt_text(q)) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: (-len(prompts[i]), i))
    if settings.sampling.seed is not None:
        from transformers import set_seed

        set_seed(settings.sampling.seed)
    stop_set = set(stops)
    items: dict[int, ItemResult] = {}
    started = time.perf_counter()
    for batch in _batches(order, settings.batch_size):
        outputs = _generate(loaded, [prompts[i] for i in batch], config, pad_id)
        for i, new in zip(batch, outputs):
            items[i] = _item(questions[i], prompts[i], new, stop_set, decode)
        if progress is not None:
            progress(len(items), len(questions))
    seconds = time.perf_counter() - started
    ordered = tuple(items[i] for i in range(len(questions)))
    result = score(benchmark, ordered)
    generated = sum(item.completion_tokens for item in ordered)
    log.info("eval.benchmark_scored", ref=loaded.label, benchmark=benchmark, questions=result.scored,
             accuracy=round(result.accuracy, 4), interval=[round(x, 4) for x in result.interval],
             no_answer_share=round(result.no_answer_share, 4), hit_limit_share=round(result.hit_limit_share, 4),
             seconds=round(seconds, 2), tokens_per_s=round(generated / seconds, 1) if seconds > 0 else None)
    return BenchmarkRun(result=result, items=ordered, seconds=round(seconds, 3), generated_tokens=generated)
