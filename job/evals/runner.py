"""The generation engine: a loaded model answers a benchmark's questions in batches and is scored.

:func:`run_benchmark` takes a :class:`~job.inference.loading.Loaded` (model, tokenizer and the prompt
template the model was trained with: ``loaded.prompt_ids`` is the template's ``encode_prompt``), the
questions and :class:`EvalSettings`, and:

1. builds each prompt from :func:`~job.medical_benchmarks.prompt_text` through the model's own template, so
   the model is asked as it was taught and its response opens with ``<think>\\n``;
2. asks each question ``settings.samples`` (K) times; with sampling (``temperature > 0``) answer k of
   question q gets its own seed, :func:`answer_seed` of (the settings' seed, q's id, k), so an answer does not
   depend on what else is generated with it;
3. generates every answer through :func:`job.inference.batching.generate_many` (continuous batching: a
   finished answer's slot takes the next prompt at once; answers in flight sized from free GPU memory, at most
   ``batch_size``), which stops each at its first stop token (``job.inference.stop_ids``: the tokenizer's EOS and the model's
   generation EOS ids) or at ``max_new_tokens``; and records per answer the completion, its token counts,
   whether the model stopped by itself, and the choice :func:`~job.evals.extract.extract_choice` reads from it;
4. scores the items (:func:`~job.evals.scoring.score`).

Greedy decoding gives the same completions batched and one question at a time, and the same ones on every
run. A seeded sample depends on its seed, not on what shares its batch, and repeats on the same machine.

The engine prints nothing: ``progress(done, total)`` is called as answers finish (the suite turns it into
a :mod:`registry.progress` task, so it shows as a bar on a terminal and nowhere else).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from job.evals.extract import extract_choice
from job.evals.scoring import BenchmarkResult, ItemResult, score
from job.inference.batching import Completion, generate_many
from job.inference.generate import Sampling, decoder, stop_ids
from job.inference.loading import Loaded
from job.medical_benchmarks import Question, prompt_text
from job.templates import THINK_CLOSE
from registry.errors import ConfigError
from registry.logs import get_logger

log = get_logger(__name__)

#: ``progress(done, total)``: called as answers finish, with the answers generated so far.
Progress = Callable[[int, int], None]
#: The most answers in flight; the continuous engine sizes the number from free GPU memory below it.
DEFAULT_BATCH_SIZE = 256
#: Published R1-style medical evaluations let an answer reason for 2,000-2,048 tokens (README, Evaluate).
DEFAULT_EVAL_MAX_NEW_TOKENS = 2048


def _greedy() -> Sampling:
    return Sampling(max_new_tokens=DEFAULT_EVAL_MAX_NEW_TOKENS, temperature=0.0)


@dataclass(frozen=True)
class EvalSettings:
    """How to generate: ``sampling`` (greedy here by default: ``temperature=0``; its ``seed``, None read as 0,
    seeds every answer), ``samples`` answers per question, at most ``batch_size`` prompts at once.

    Raises ConfigError for ``batch_size`` or ``samples`` below 1, and for several samples of greedy decoding
    (they would be the same answer K times)."""

    sampling: Sampling = field(default_factory=_greedy)
    batch_size: int = DEFAULT_BATCH_SIZE
    samples: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, got {self.samples}")
        if self.samples > 1 and self.sampling.temperature == 0:
            raise ConfigError(f"--samples {self.samples} with --temperature 0: greedy decoding gives the same answer "
                              "every time; sample (e.g. --temperature 0.6) or use --samples 1")

    @property
    def sampled(self) -> bool:
        return self.sampling.temperature > 0


def answer_seed(seed: int, question_id: str, sample: int) -> int:
    """The sampling seed of answer ``sample`` to question ``question_id`` under the run's ``seed``: the first
    32 bits of sha256(seed, id, sample), so it is the same on every machine and run, and differs between
    questions and samples."""
    digest = hashlib.sha256(f"{seed}\x00{question_id}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True)
class BenchmarkRun:
    """One benchmark as run: its score, every item in the questions' order, and the generation time."""

    result: BenchmarkResult
    items: tuple[ItemResult, ...]
    seconds: float
    generated_tokens: int


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


def _item(question: Question, prompt: list[int], generated: Completion, decode: Callable[[list[int]], str],
          sample: int, seed: int | None) -> ItemResult:
    ids, stopped = generated.ids, generated.stopped
    body = ids[:-1] if stopped else ids
    completion = decode(body)
    return ItemResult(id=question.id, gold=question.gold,
                      choice=extract_choice(completion, question.options, stopped=stopped), completion=completion,
                      prompt_tokens=len(prompt), completion_tokens=len(ids),
                      reasoning_tokens=reasoning_tokens(body, decode), stopped=stopped, sample=sample, seed=seed)


def run_benchmark(loaded: Loaded, benchmark: str, questions: Sequence[Question], settings: EvalSettings = EvalSettings(),
                  *, progress: Progress | None = None) -> BenchmarkRun:
    """Ask ``loaded`` every question ``settings.samples`` times and score the answers as ``benchmark`` (see the
    module docstring). ``progress(done, total)`` counts answers.

    Raises ConfigError when there are no questions or the tokenizer has no EOS token (generation could not
    stop).
    """
    if not questions:
        raise ConfigError(f"benchmark {benchmark}: no questions to ask")
    if not stop_ids(loaded):
        raise ConfigError(f"{loaded.label}: its tokenizer defines no eos_token, so generation could not stop")
    decode = decoder(loaded.tokenizer)
    prompts = [loaded.prompt_ids(prompt_text(q)) for q in questions]
    asked = [(q, k) for q in range(len(questions)) for k in range(settings.samples)]
    base_seed = settings.sampling.seed or 0
    seeds = [answer_seed(base_seed, questions[q].id, k) for q, k in asked] if settings.sampled else None
    started = time.perf_counter()
    completions = generate_many(loaded, [prompts[q] for q, _ in asked], settings.sampling, seeds=seeds,
                                max_in_flight=settings.batch_size, progress=progress)
    seconds = time.perf_counter() - started
    items = tuple(_item(questions[q], prompts[q], generated, decode, k, seeds[n] if seeds is not None else None)
                  for n, ((q, k), generated) in enumerate(zip(asked, completions, strict=True)))
    result = score(benchmark, items)
    generated = sum(item.completion_tokens for item in items)
    log.info("eval.benchmark_scored", ref=loaded.label, benchmark=benchmark, questions=result.scored,
             samples=settings.samples, temperature=settings.sampling.temperature,
             accuracy=round(result.accuracy, 4), interval=[round(x, 4) for x in result.interval],
             no_answer_share=round(result.no_answer_share, 4), hit_limit_share=round(result.hit_limit_share, 4),
             seconds=round(seconds, 2), tokens_per_s=round(generated / seconds, 1) if seconds > 0 else None)
    return BenchmarkRun(result=result, items=items, seconds=round(seconds, 3), generated_tokens=generated)
