"""``python -m benchmarks.eval``: ``medft eval``'s engines side by side, on the same questions, in one process.

The random-init DeepSeek-R1-Distill-Llama-8B architecture (:mod:`benchmarks.models`, synthetic word-level
tokenizer) is written once as a safetensors checkpoint under ``--work`` and loaded the way ``medft eval``
loads a model (the inference backend: unsloth's ``FastLanguageModel`` on a GPU with unsloth, else
transformers). ``--questions`` made-up four-option questions (question texts of 60-360 words, so prompts
differ in length as MedQA's do) are answered greedily by each arm of :func:`job.inference.batching.generate_many`:

* **continuous**: the slot engine, answers in flight sized from free GPU memory (``--max-in-flight`` bounds it);
* **static**: transformers' ``generate`` on left-padded batches of ``--static-batch`` prompts sorted by
  length, the engine ``medft eval`` used before.

Random weights rarely stop on their own, so each workload forces the answer lengths (stop tokens masked until
the length, then forced; the output's ``forced`` checks every answer's length):

* **forced**: every answer exactly ``--max-new-tokens`` tokens (the worst case for nobody: both engines
  run full batches);
* **mixed**: answer lengths drawn uniformly from ``--mixed-min`` to ``--mixed-max`` (seeded), as real R1
  answers stop where they stop: a static batch waits for its longest answer, the continuous engine refills.

One short warm-up generation runs before timing. Output: one JSON line per (workload, arm) on stdout, also
appended to ``--out`` as each finishes (so a run cut short keeps what it measured), then a summary line
with each workload's speed-up. ``--dry`` runs the same code on the tiny Llama architecture on the CPU with
few, short questions (what the test suite runs).
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


def workload_lengths(workload: str, n: int, *, max_new_tokens: int, mixed: tuple[int, int], seed: int = 0
                     ) -> tuple[list[int], int]:
    """(each answer's forced length, the generation limit) for a workload."""
    if workload == "forced":
        return [max_new_tokens] * n, max_new_tokens
    rng = random.Random(seed)
    lengths = [rng.randint(*mixed) for _ in range(n)]
    return lengths, max(mixed[1], max(lengths))


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if torch.cuda.is_available() else None


def measure(loaded: Any, prompts: list[list[int]], lengths: list[int], limit: int, arm: str, *,
            max_in_flight: int | None, static_batch: int) -> dict[str, Any]:
    """One arm over the prompts: wall time, tokens/s, and whether every answer had its forced length."""
    import torch

    from job.inference.batching import generate_many, plan_engine
    from job.inference.generate import Sampling

    greedy = Sampling(max_new_tokens=limit, temperature=0.0)
    bound = static_batch if arm == "static" else max_in_flight
    plan = plan_engine(loaded.model, prompts, limit, bound, arm)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    started = time.perf_counter()
    out = generate_many(loaded, prompts, greedy, max_in_flight=bound, engine=arm, lengths=lengths)
    _sync()
    seconds = time.perf_counter() - started
    tokens = sum(len(c.ids) for c in out)
    return {"arm": arm, "in_flight": plan.slots, "plan": plan.reason, "wall_s": round(seconds, 2),
            "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
            "forced": [len(c.ids) for c in out] == lengths, "peak_gib": _peak_gib()}


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _emit(line: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(line)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    if out is not None:
        with out.open("a") as f:
            f.write(text + "\n")


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--model", "arch_key", default="llama8b", show_default=True,
              help="architecture key (job.architectures); --dry uses tiny-llama")
@click.option("--questions", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="the forced workload's answer length")
@click.option("--workloads", default="forced,mixed", show_default=True, help="forced, mixed (comma-separated)")
@click.option("--arms", default="continuous,static", show_default=True, help="continuous, static, in this order")
@click.option("--mixed-min", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--mixed-max", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("--max-in-flight", type=click.IntRange(min=1), default=None, help="upper bound for the continuous arm")
@click.option("--static-batch", type=click.IntRange(min=1), default=100, show_default=True,
              help="prompts per batch in the static arm")
@click.option("--max-seq-length", type=click.IntRange(min=64), default=4096, show_default=True)
@click.option("--work", default=lambda: os.environ.get("MEDFT_BENCH_WORK", DEFAULT_WORK), show_default=DEFAULT_WORK,
              help="where the random checkpoint is written (reused when it matches)")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also append each result line to this file as it is measured")
@click.option("--dry", is_flag=True, help="CPU smoke run: tiny-llama, 6 short questions, 16 new tokens")
def main(arch_key: str, questions: int, max_new_tokens: int, workloads: str, arms: str, mixed_min: int,
         mixed_max: int, max_in_flight: int | None, static_batch: int, max_seq_length: int, work: str,
         out: Path | None, dry: bool) -> None:
    from job.backends import inference_backend

    inference_backend()  # unsloth, where it runs, imported before transformers builds the checkpoint, as in medft eval
    from benchmarks.models import save_random_checkpoint
    from job import architectures
    from job.inference.batching import generate_many
    from job.inference.generate import Sampling
    from job.medical_benchmarks import prompt_text
    from registry import logs

    logs.configure()  # log lines to stderr: stdout holds the result lines
    words = (60, 360)
    if dry:
        arch_key, questions, max_new_tokens, static_batch, mixed_min, mixed_max = "tiny-llama", 6, 16, 4, 2, 20
        words = (5, 40)
    wanted_arms = [a for a in arms.split(",") if a]
    wanted_loads = [w for w in workloads.split(",") if w]
    if not set(wanted_arms) <= {"continuous", "static"} or not set(wanted_loads) <= {"forced", "mixed"}:
        raise click.UsageError("--arms takes continuous,static and --workloads forced,mixed")
    arch = architectures.get(arch_key)
    started = time.perf_counter()
    path = save_random_checkpoint(arch, Path(work) / f"{arch.key}-random")
    created_s = time.perf_counter() - started
    started = time.perf_counter()
    loaded = load_model(path, max_seq_length)
    load_s = time.perf_counter() - started
    prompts = [loaded.prompt_ids(prompt_text(q)) for q in made_up_questions(questions, words=words)]
    generate_many(loaded, prompts[:2], Sampling(max_new_tokens=8, temperature=0.0))  # warm-up
    head = {"benchmark": "eval", "model": arch.key, "device": _device(), "backend": loaded.backend,
            "questions": questions, "prompt_tokens": [min(map(len, prompts)), max(map(len, prompts))],
            "checkpoint_s": round(created_s, 1), "load_s": round(load_s, 1)}
    summary: dict[str, Any] = {}
    for workload in wanted_loads:
        lengths, limit = workload_lengths(workload, questions, max_new_tokens=max_new_tokens,
                                          mixed=(mixed_min, mixed_max))
        times = {}
        for arm in wanted_arms:
            result = measure(loaded, prompts, lengths, limit, arm, max_in_flight=max_in_flight,
                             static_batch=static_batch)
            times[arm] = result["wall_s"]
            _emit({**head, "workload": workload, "max_new_tokens": limit, **result}, out)
        if len(times) == 2 and times["continuous"] > 0:
            summary[workload] = round(times["static"] / times["continuous"], 2)
    _emit({"benchmark": "eval", "summary": "speedup of continuous over static", **summary}, out)


if __name__ == "__main__":
    main()
