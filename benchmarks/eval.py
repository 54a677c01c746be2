"""``python -m benchmarks.eval``: ``medft eval``'s engine against plain one-question-at-a-time ``generate``.

The random-init DeepSeek-R1-Distill-Llama-8B architecture (:mod:`benchmarks.models`, synthetic word-level
tokenizer) is written once as a safetensors checkpoint under ``--work`` and loaded the way ``medft eval``
loads a model (the inference backend: unsloth's ``FastLanguageModel`` on a GPU with unsloth, else
transformers). ``--questions`` made-up four-option questions (question texts of 60-360 words, so prompts
differ in length as MedQA's do) are then answered, in the same process:

* **batched**: :func:`job.evals.runner.run_benchmark` (sorted by prompt length, left-padded batches of
  ``--batch-size``, KV cache, greedy), all questions;
* **plain**: :func:`job.inference.generate.generate`, one question at a time, greedy, on the first
  ``--plain-questions`` of them; its time is extrapolated to all questions (mean seconds per question x
  questions).

Forced length: random weights rarely emit EOS, but "rarely" is not "never", so the model's generation config
gets ``min_new_tokens = max_new_tokens`` before either arm runs. transformers then masks every stop token's
logit (``MinNewTokensLengthLogitsProcessor`` over the engine's ``eos_token_id`` list) until the limit, so
every answer in both arms is exactly ``--max-new-tokens`` tokens long; the output checks it (``forced``).
One short warm-up generation runs before timing (kernel compilation, caches).

Output: one JSON line on stdout: tokens/s and wall seconds of each arm (plain extrapolated to all
questions), the speed-up, load time, device and settings. ``--dry`` runs the same code on the tiny Llama
architecture on the CPU with few, short questions (what the test suite runs).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import click

DEFAULT_WORK = "/tmp/medft-bench-eval"


def made_up_questions(n: int, seed: int = 0, words: tuple[int, int] = (60, 360)) -> list[Any]:
    """``n`` four-option questions of synthetic words (``t<N>``, which the synthetic tokenizer maps to id N),
    with question lengths drawn from ``words``."""
    from job.medical_benchmarks import Question

    rng = random.Random(seed)
    out = []
    for i in range(n):
        text = " ".join(f"t{rng.randrange(10, 1900)}" for _ in range(rng.randint(*words)))
        options = {letter: " ".join(f"t{rng.randrange(10, 1900)}" for _ in range(rng.randint(2, 8)))
                   for letter in "ABCD"}
        out.append(Question(benchmark="synthetic", id=f"q{i}", question=text, options=options,
                            gold="ABCD"[i % 4], row=i + 1))
    return out


def load_model(path: Path, max_seq_length: int) -> Any:
    """The checkpoint loaded as ``medft eval`` loads a version: the inference backend, then fast inference."""
    from job.backends import inference_backend
    from job.inference.loading import Loaded
    from job.templates import get_template
    from job.tokenizer import load_tokenizer

    backend = inference_backend()
    model = backend.for_inference(backend.load_for_inference(path, max_seq_length=max_seq_length))
    return Loaded(label=path.name, model=model, tokenizer=load_tokenizer(path, trust_remote_code=False),
                  template=get_template("r1-medical"), backend=backend.name)


def force_length(loaded: Any, max_new_tokens: int) -> None:
    """Every answer runs to ``max_new_tokens``: stop tokens are masked until then (see the module docstring)."""
    loaded.model.generation_config.min_new_tokens = max_new_tokens


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(loaded: Any, questions: list[Any], *, max_new_tokens: int, batch_size: int,
            plain_questions: int) -> dict[str, Any]:
    """Both arms on ``loaded`` (see the module docstring); the result line's numbers."""
    from job.evals.runner import EvalSettings, run_benchmark
    from job.inference.generate import Sampling, generate
    from job.medical_benchmarks import prompt_text

    greedy = Sampling(max_new_tokens=max_new_tokens, temperature=0.0)
    loaded.model.generation_config.min_new_tokens = 8
    generate(loaded, prompt_text(questions[0]), Sampling(max_new_tokens=8, temperature=0.0))  # warm-up
    force_length(loaded, max_new_tokens)

    _sync()
    started = time.perf_counter()
    run = run_benchmark(loaded, "synthetic", questions, EvalSettings(sampling=greedy, batch_size=batch_size))
    _sync()
    batched_s = time.perf_counter() - started

    plain = questions[:plain_questions]
    plain_tokens = 0
    _sync()
    started = time.perf_counter()
    for q in plain:
        answer = generate(loaded, prompt_text(q), greedy)
        plain_tokens += answer.completion_tokens
    _sync()
    plain_s = time.perf_counter() - started
    plain_all_s = plain_s / len(plain) * len(questions)
    forced = (all(item.completion_tokens == max_new_tokens for item in run.items)
              and plain_tokens == max_new_tokens * len(plain))
    return {
        "questions": len(questions), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "forced": forced, "generated_tokens": run.generated_tokens,
        "batched_wall_s": round(batched_s, 2), "batched_tokens_per_s": round(run.generated_tokens / batched_s, 1),
        "plain_questions_timed": len(plain), "plain_wall_s_measured": round(plain_s, 2),
        "plain_wall_s_for_all": round(plain_all_s, 1), "plain_tokens_per_s": round(plain_tokens / plain_s, 1),
        "speedup": round(plain_all_s / batched_s, 2),
    }


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--model", "arch_key", default="llama8b", show_default=True,
              help="architecture key (job.architectures); --dry uses tiny-llama")
@click.option("--questions", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True,
              help="questions per batch in the batched arm")
@click.option("--plain-questions", type=click.IntRange(min=1), default=4, show_default=True,
              help="questions the one-at-a-time arm answers (extrapolated to --questions)")
@click.option("--max-seq-length", type=click.IntRange(min=64), default=2048, show_default=True)
@click.option("--work", default=lambda: os.environ.get("MEDFT_BENCH_WORK", DEFAULT_WORK), show_default=DEFAULT_WORK,
              help="where the random checkpoint is written (reused when it matches)")
@click.option("--dry", is_flag=True, help="CPU smoke run: tiny-llama, 6 short questions, 16 new tokens")
def main(arch_key: str, questions: int, max_new_tokens: int, batch_size: int, plain_questions: int,
         max_seq_length: int, work: str, dry: bool) -> None:
    from benchmarks.models import save_random_checkpoint
    from job import architectures
    from registry import logs

    logs.configure()  # log lines to stderr: stdout holds the one result line
    words = (60, 360)
    if dry:
        arch_key, questions, max_new_tokens, batch_size, plain_questions = "tiny-llama", 6, 16, 4, 2
        words = (5, 40)
    arch = architectures.get(arch_key)
    started = time.perf_counter()
    path = save_random_checkpoint(arch, Path(work) / f"{arch.key}-random")
    created_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_model(path, max_seq_length)
    load_s = time.perf_counter() - started
    result = measure(loaded, made_up_questions(questions, words=words), max_new_tokens=max_new_tokens,
                     batch_size=batch_size, plain_questions=min(plain_questions, questions))
    line = {"benchmark": "eval", "model": arch.key, "device": _device(), "backend": loaded.backend,
            "checkpoint_s": round(created_s, 1), "load_s": round(load_s, 1), **result}
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
