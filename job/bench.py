"""``python -m job.bench`` (``make bench``): medft's train stage against the reference recipe, on one GPU.

Random-init models with the real DeepSeek-R1-Distill architectures (:mod:`job.architectures`) train on the
same synthetic rows, shaped like the medical reasoning data (question 40-110 tokens, reasoning 330-580,
answer 80-180, plus the prompt template: 515-935 tokens a row). Every arm runs in its own process, one
after the other, in one invocation:

* ``A``: transformers + peft + bitsandbytes 4-bit, SDPA, gradient checkpointing, padded micro-batches of
  2 x 4 accumulation (medft's ``hf`` backend through its train stage).
* ``B``: Unsloth with the reference recipe's exact settings: 4-bit, LoRA r=16/alpha=16 on all 7
  projections, gradient checkpointing ``"unsloth"``, padded micro-batches of 2 x 4, 8-bit AdamW, lr 2e-4,
  5 warmup steps, weight decay 0.01. ``padding_free=False`` is set because the recipe trains padded
  batches; ``B-auto`` leaves it unset, so this Unsloth release picks for itself (it turns padding-free on).
* ``C``: medft's own train stage (``select_backend`` -> ``plan`` -> ``load`` -> ``job.train.fit``) with its
  defaults (every ``auto`` resolved by the plan for the GPU found). The variants move one lever back each:
  ``C-4bit`` (4-bit weights), ``C-8bit`` (8-bit AdamW), ``C-qlora`` (both, the recipe's), ``C-log10``
  (a log line every 10 steps), ``C-mb2`` (micro-batch 2), ``C-packed`` (``train.packing=true``:
  padding-free), ``C-grouped`` (steps of similar-length rows, transformers' ``group_by_length`` sampler,
  injected by the benchmark), ``C-gc`` (``train.gradient_checkpointing=unsloth``) and ``C-mask`` (padded
  batches with their attention mask, which the train stage leaves out: see :class:`job.train.TrainCollator`).

Measured per arm, over the optimizer steps after ``--warmup`` (the first steps compile kernels): non-padding
tokens per second, seconds per optimizer step, tokens the model processed including padding, peak GPU memory
(PyTorch's allocator: allocated and reserved), and model FLOPs utilization: tokens/s x 4 x the parameters
outside the input embedding (:func:`job.architectures.train_flops_per_token`) over the bf16 rate that an
8192 x 8192 x 8192 matmul reaches on the same GPU in the same invocation.

``--cap-gib 8`` repeats the chosen arms under ``torch.cuda.set_per_process_memory_fraction`` (the GPU
memory of the 16-24 GB cards the tutorials ran on, less what their display and CUDA context take), and
``--whole-job`` times the reference recipe's whole job (8B, 500 rows, 60 steps of 2 x 4, evaluation before
and after, merge, publish to a local store) with ``medft train``, after warming the caches.

Results: a JSON file (``--out``), a markdown table on stdout, per-arm logs under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from job import architectures
from job.architectures import PROJECTIONS, Architecture

GIB = 2**30

#: Token counts of one row's parts, drawn uniformly (inclusive), as in the real data.
ROW_PARTS = {"question": (40, 110), "reasoning": (330, 580), "answer": (80, 180)}
#: The r1-medical template around them: BOS and the instruction before the question, ``<think>`` after it
#: (masked out of the loss); ``</think>``, a separator and EOS in the completion.
PROMPT_OVERHEAD = 62
COMPLETION_OVERHEAD = 3

ARMS = {
    "A": "transformers + peft + bitsandbytes, SDPA, gradient checkpointing, padded 2 x 4",
    "B": "Unsloth, the reference recipe: 4-bit, padded 2 x 4, checkpointing 'unsloth'",
    "B-auto": "Unsloth, the recipe's code as published (padding_free left to Unsloth)",
    "C": "medft train stage (unsloth backend), defaults",
    "C-qlora": "medft, defaults but 4-bit weights and 8-bit AdamW (the recipe's)",
    "C-4bit": "medft, defaults but model.load_in_4bit=true",
    "C-8bit": "medft, defaults but train.optim=adamw_8bit",
    "C-log10": "medft, defaults but train.logging_steps=10",
    "C-mb2": "medft, defaults but train.batch_size=2",
    "C-packed": "medft, defaults but train.packing=true (padding-free)",
    "C-grouped": "medft, defaults but padded steps of similar-length rows (group_by_length sampler)",
    "C-gc": "medft, defaults but train.gradient_checkpointing=unsloth",
    "C-mask": "medft, defaults but padded batches keep their attention mask (put back by the benchmark)",
}
MEDFT_OVERRIDES = {
    # 'on' is quoted: --set values are YAML, where a bare on is the boolean true.
    "A": ["model.backend=hf", "train.batch_size=2", "train.packing=false", "model.load_in_4bit=true",
          "train.optim=adamw_8bit", "train.gradient_checkpointing='on'"],
    "C": [],
    "C-qlora": ["model.load_in_4bit=true", "train.optim=adamw_8bit"],
    "C-4bit": ["model.load_in_4bit=true"],
    "C-8bit": ["train.optim=adamw_8bit"],
    "C-log10": ["train.logging_steps=10"],
    "C-mb2": ["train.batch_size=2"],
    "C-packed": ["train.packing=true"],
    "C-grouped": [],
    "C-gc": ["train.gradient_checkpointing=unsloth"],
    "C-mask": [],
}
#: Every C arm runs the unsloth backend with medft's defaults, then its own overrides.
MEDFT_DEFAULTS = ["model.backend=unsloth"]


# ------------------------------------------------------------------------------------------------- data

def _token_sampler(arch: Architecture, rng: random.Random) -> Any:
    top = min(arch.vocab_size, arch.bos_token_id, arch.eos_token_id, arch.pad_token_id)
    return lambda k: [rng.randrange(16, top) for _ in range(k)]


def _part_lengths(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(*ROW_PARTS[p]) for p in ("question", "reasoning", "answer"))  # type: ignore[return-value]


def synthetic_rows(arch: Architecture, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` tokenized rows shaped like the real data, in :class:`job.data.PreparedData`'s format."""
    rng = random.Random(seed)
    ids = _token_sampler(arch, rng)
    rows = []
    for _ in range(n):
        q, r, a = _part_lengths(rng)
        prompt = [arch.bos_token_id, *ids(PROMPT_OVERHEAD - 1 + q)]
        completion = [*ids(r + a + COMPLETION_OVERHEAD - 1), arch.eos_token_id]
        rows.append({"input_ids": prompt + completion,
                     "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


def synthetic_records(arch: Architecture, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` raw rows (Question / Complex_CoT / Response) of ``t<N>`` words, which the synthetic tokenizer of
    :func:`job.architectures.build_tokenizer` maps one word to one token, so lengths match the real data."""
    rng = random.Random(seed)
    ids = _token_sampler(arch, rng)
    out = []
    for _ in range(n):
        q, r, a = _part_lengths(rng)
        out.append({k: " ".join(f"t{i}" for i in ids(m))
                    for k, m in (("Question", q), ("Complex_CoT", r), ("Response", a))})
    return out


# ------------------------------------------------------------------------------------------ measuring

def matmul_peak_tflops(n: int = 8192, reps: int = 30) -> float:
    """Median bf16 TFLOP/s of an n x n x n matmul on random data (CUDA events, after warm-up)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


class Meter:
    """Counts each micro-batch's tokens (at the collator) and times each optimizer step (a callback).

    Micro-batches are collated in training order, so step ``k`` consumed micro-batches
    ``[(k-1) * grad_accum, k * grad_accum)``. The clock is read after a CUDA synchronize only at the start,
    at the end of step ``warmup`` and at the last step: a synchronize every step would stall the GPU while
    the host queues the next step, and hide what the trainer's own synchronizations cost.
    """

    def __init__(self, warmup: int = 0, attention_mask: bool = False) -> None:
        self.warmup = warmup
        self.attention_mask = attention_mask  # put back the mask the train stage leaves out of padded batches
        self.real: list[int] = []     # non-padding tokens per micro-batch
        self.fed: list[int] = []      # tokens the model processed, padding included
        self.step_end: list[float] = []
        self.start: float | None = None
        self.losses: list[float] = []

    def wrap(self, collator: Any) -> Any:
        import torch

        meter = self

        class Counting:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self.inner, name)

            def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
                batch = self.inner(examples)
                lengths = [len(e["input_ids"]) for e in examples]
                if meter.attention_mask and "position_ids" not in batch:
                    width = batch["input_ids"].shape[1]
                    batch["attention_mask"] = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
                meter.real.append(sum(lengths))
                meter.fed.append(int(batch["input_ids"].numel()))
                return batch

        return Counting(collator)

    def callback(self) -> Any:
        import torch
        from transformers import TrainerCallback

        meter = self

        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        class Timing(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                sync()
                meter.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step in (meter.warmup, state.max_steps):
                    sync()
                meter.step_end.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    meter.losses.append(float(logs["loss"]))

        return Timing()

    def summary(self, grad_accum: int) -> dict[str, Any]:
        steps = len(self.step_end)
        warmup = min(self.warmup, max(steps - 1, 0))
        t0 = self.step_end[warmup - 1] if warmup else self.start
        seconds = self.step_end[-1] - t0 if steps else 0.0
        lo, hi = warmup * grad_accum, steps * grad_accum
        real, fed = sum(self.real[lo:hi]), sum(self.fed[lo:hi])
        timed = steps - warmup
        return {"steps": steps, "timed_steps": timed, "warmup_steps": warmup, "timed_seconds": seconds,
                "tokens_per_s": real / seconds if seconds else 0.0,
                "seconds_per_step": seconds / timed if timed else None,
                "tokens_per_step": real / timed if timed else None,
                "padding_share": 1 - real / fed if fed else None,
                "max_microbatch_tokens": max(self.fed) if self.fed else 0,
                "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None}


def timed_trainer(base: type, meter: Meter) -> type:
    """``base`` (an SFTTrainer class) with the meter's collator wrapper and timing callback installed."""

    class TimedTrainer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.data_collator = meter.wrap(self.data_collator)
            self.add_callback(meter.callback())

    TimedTrainer.__qualname__ = TimedTrainer.__name__ = f"Timed{base.__name__}"
    return TimedTrainer


class TimedBackend:
    """A backend whose trainer class is metered; everything else is the wrapped backend's, plus any
    ``extra_sft_args`` (a lever medft's config does not expose, tried by the benchmark)."""

    def __init__(self, inner: Any, meter: Meter, extra_sft_args: dict[str, Any] | None = None) -> None:
        self.inner, self.meter, self.name = inner, meter, inner.name
        self.extra_sft_args = extra_sft_args or {}

    def plan(self, cfg: Any) -> Any:
        return self.inner.plan(cfg)

    def load(self, *args: Any) -> Any:
        return self.inner.load(*args)

    def sft_args(self, cfg: Any, plan: Any) -> Any:
        return {**self.inner.sft_args(cfg, plan), **self.extra_sft_args}

    def for_inference(self, model: Any) -> Any:
        return self.inner.for_inference(model)

    def trainer_class(self) -> type:
        return timed_trainer(self.inner.trainer_class(), self.meter)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    names = ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "accelerate")
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def _gpu_memory(torch: Any) -> dict[str, float]:
    if not torch.cuda.is_available():
        return {"peak_allocated_gib": 0.0, "peak_reserved_gib": 0.0}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


# ------------------------------------------------------------------------------------------------- arms

def _arm_medft(spec: dict[str, Any], rows: list[dict[str, list[int]]], meter: Meter) -> dict[str, Any]:
    from job.backends import select_backend
    from job.config import load_config

    overrides = [f"model.base={spec['weights']}", f"model.max_seq_length={spec['max_seq_length']}",
                 f"train.max_steps={spec['steps']}", "train.checkpoint_every=1000000", "eval.enabled=false",
                 *(MEDFT_DEFAULTS if spec["arm"].startswith("C") else []), *MEDFT_OVERRIDES[spec["arm"]]]
    cfg = load_config(overrides=overrides, env={})
    backend = select_backend(cfg)  # imports unsloth (first) for the unsloth backend
    plan = backend.plan(cfg)
    import torch

    from job.data import DataReport, PreparedData
    from job.train import fit

    started = time.perf_counter()
    model, tokenizer = backend.load(Path(spec["weights"]), cfg, plan)
    load_s = time.perf_counter() - started
    data = PreparedData(train=rows, eval=[], eval_rows=[], report=DataReport(source="synthetic"))
    extra = {"train_sampling_strategy": "group_by_length"} if spec["arm"] == "C-grouped" else {}
    result = fit(cfg, TimedBackend(backend, meter, extra), plan, model, tokenizer, data,
                 work_dir=Path(spec["work"]) / "trainer")
    return {"load_s": load_s, "grad_accum": plan.grad_accum, "micro_batch": plan.batch_size,
            "plan": {k: v for k, v in plan.__dict__.items()}, "overrides": overrides,
            "fit_tokens_per_s": result.tokens_per_s, "fit_wall_s": result.wall_s, **_gpu_memory(torch)}


def _arm_recipe(spec: dict[str, Any], rows: list[dict[str, list[int]]], meter: Meter) -> dict[str, Any]:
    from job.backends.unsloth import import_unsloth

    import_unsloth()  # same environment as medft's backend; unsloth before trl/transformers/peft
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel, is_bfloat16_supported

    started = time.perf_counter()
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=spec["weights"], max_seq_length=spec["max_seq_length"], dtype=None, load_in_4bit=True,
        local_files_only=True, use_exact_model_name=True)
    model = FastLanguageModel.get_peft_model(
        model, r=16, target_modules=list(PROJECTIONS), lora_alpha=16, lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=3407, use_rslora=False, loftq_config=None)
    load_s = time.perf_counter() - started
    extra = {} if spec["arm"] == "B-auto" else {"padding_free": False}
    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / "trainer"), per_device_train_batch_size=2,
        gradient_accumulation_steps=4, warmup_steps=5, max_steps=spec["steps"], learning_rate=2e-4,
        fp16=not is_bfloat16_supported(), bf16=is_bfloat16_supported(), logging_steps=10, optim="adamw_8bit",
        weight_decay=0.01, lr_scheduler_type="linear", seed=3407, report_to="none", save_strategy="no",
        disable_tqdm=True, max_length=spec["max_seq_length"], packing=False, **extra)
    trainer = timed_trainer(SFTTrainer, meter)(
        model=model, processing_class=tokenizer, args=args,
        train_dataset=Dataset.from_list([{"input_ids": r["input_ids"]} for r in rows]))
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"load_s": load_s, "grad_accum": 4, "micro_batch": 2,
            "padding_free": bool(getattr(trainer.args, "padding_free", False)), **_gpu_memory(torch)}


def run_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """One arm, in this process; returns (and writes to ``spec['out']``) its measurements."""
    import torch

    if spec.get("cap_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap_gib"] * GIB / total)
        if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
            os.environ["MEDFT_GPU_MEMORY_GIB"] = str(spec["cap_gib"])  # this torch cannot report the fraction
    rows = json.loads(Path(spec["rows"]).read_text())
    meter = Meter(spec["warmup"], attention_mask=spec["arm"] == "C-mask")
    started = time.perf_counter()
    arm = spec["arm"]
    body = _arm_recipe if arm.startswith("B") else _arm_medft
    out = body(spec, rows, meter)
    out.update(meter.summary(out["grad_accum"]))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    out.update(arm=arm, model=spec["model"], cap_gib=spec.get("cap_gib"), gpu=gpu, versions=_versions(),
               wall_s=time.perf_counter() - started, description=ARMS[arm])
    Path(spec["out"]).write_text(json.dumps(out, indent=2, default=str))
    return out


# --------------------------------------------------------------------------------------------- probe

def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one training micro-batch at several lengths, with and without checkpointing.

    Feeds the constants of :func:`job.backends.unsloth.estimate_peak_bytes`: a model of the real widths with
    few layers separates per-layer activations from weights and the loss.
    """
    import torch

    from job.backends import TrainPlan
    from job.backends.unsloth import UnslothBackend, estimate_peak_bytes
    from job.config import load_config

    arch = architectures.get(spec["model"])
    backend = UnslothBackend()
    arch = replace(arch, num_hidden_layers=spec["layers"], key=f"{arch.key}-L{spec['layers']}")
    weights = architectures.save_random_checkpoint(arch, Path(spec["work"]) / arch.key)
    cfg = load_config(overrides=[f"model.base={weights}"], env={})
    results = []
    for gc in ("unsloth", False):
        plan = TrainPlan(batch_size=1, grad_accum=1, packing=True, gradient_checkpointing=gc,
                         load_in_4bit=True, precision="bf16", optim="adamw_8bit")
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model, _ = backend.load(weights, cfg, plan)
        weights_bytes = torch.cuda.memory_allocated() - before
        model.train()
        for tokens in spec["tokens"]:
            rows = synthetic_rows(arch, 64, seed=tokens)
            ids, pos = [], []
            for r in rows:
                take = r["input_ids"][: tokens - len(ids)]
                ids += take
                pos += list(range(len(take)))
                if len(ids) >= tokens:
                    break
            batch = {"input_ids": torch.tensor([ids], device="cuda"),
                     "position_ids": torch.tensor([pos], device="cuda"),
                     "labels": torch.tensor([ids], device="cuda")}
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(**batch).loss
                loss.backward()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                peak = torch.cuda.max_memory_allocated() - base
                model.zero_grad(set_to_none=True)
            est = estimate_peak_bytes(arch, tokens=tokens, load_in_4bit=True, checkpointing=gc, lora_r=16,
                                      target_modules=PROJECTIONS)
            lora = arch.lora_parameters(16) * 4
            results.append({"model": arch.key, "layers": arch.num_hidden_layers, "gc": gc, "tokens": tokens,
                            "weights_gib": weights_bytes / GIB, "step_peak_gib": peak / GIB,
                            "estimate_total_gib": est / GIB,
                            "measured_total_gib": (weights_bytes + peak) / GIB,
                            "lora_fp32_gib": lora / GIB, "fwd_bwd_s": min(times),
                            "tokens_per_s": tokens / min(times)})
            print(json.dumps(results[-1]), flush=True)
        del model
    Path(spec["out"]).write_text(json.dumps(results, indent=2))
    return {"probe": results}


# ------------------------------------------------------------------------------------- orchestration

def _subprocess(args: list[str], log: Path, timeout: float, env: dict[str, str]) -> int:
    with log.open("w") as f:
        try:
            return subprocess.run(args, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=env).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[bench] killed after {timeout:.0f} s\n")
            return 124


def _tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def _prepare_model(key: str, work: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Write the random-init checkpoint and measure the matmul peak, in a subprocess (no CUDA here)."""
    out = work / f"prepare-{key}.json"
    dest = str(work / "weights" / key)
    code = ("import json, time\n"
            "from job import architectures as A\n"
            "from job.bench import matmul_peak_tflops\n"
            f"t = time.perf_counter(); d = A.save_random_checkpoint(A.get({key!r}), {dest!r})\n"
            "s = time.perf_counter() - t; p = matmul_peak_tflops()\n"
            f"json.dump({{'weights': str(d), 'save_s': s, 'matmul_tflops': p}}, open({str(out)!r}, 'w'))")
    log = work / "logs" / f"prepare-{key}.log"
    rc = _subprocess([sys.executable, "-c", code], log, timeout, env)
    if rc != 0:
        raise SystemExit(f"preparing {key} failed (exit {rc}):\n{_tail(log)}")
    return json.loads(out.read_text())


def parse_job_log(text: str) -> dict[str, Any]:
    """Stage times, plan and training speed from a ``medft train`` JSON log, complete or not."""
    out: dict[str, Any] = {"stage_seconds": {}}
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = event.get("event")
        if name == "stage.end":  # kept even when the job stops before run.done
            out["stage_seconds"][event.get("stage")] = event.get("seconds")
        elif name == "run.done":
            out["stage_seconds"] = event.get("stage_seconds") or out["stage_seconds"]
        elif name == "train.done":
            out["train_tokens_per_s"] = event.get("tokens_per_s")
        elif name == "backend.plan":
            keys = ("batch_size", "grad_accum", "packing", "gradient_checkpointing", "load_in_4bit")
            out["plan"] = {k: event.get(k) for k in keys}
        elif name == "failed":
            out["error"] = event.get("error")
    return out


def _whole_job(key: str, weights: str, work: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Time ``medft train`` on the recipe's whole job, its weights already pulled once (a warm cache)."""
    arch = architectures.get(key)
    data = work / "whole-job-rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(arch, 500, seed=7)))
    log = work / "logs" / "whole-job-warm.log"
    warm = f"from job.model import pull_weights; pull_weights({weights!r}, None)"
    if _subprocess([sys.executable, "-c", warm], log, timeout, env) != 0:
        return {"error": "warming the weight cache failed", "log": _tail(log)}
    settings = [f"model.base={weights}", "model.backend=unsloth", f"data.source={data}", "data.subset=null",
                "data.split=train", f"output.store={work / 'store'}", "output.model_name=bench",
                f"output.run_id=bench-{int(time.time())}"]
    args = [sys.executable, "-m", "job.cli", "train", *[x for s in settings for x in ("--set", s)]]
    log = work / "logs" / "whole-job.log"
    started = time.perf_counter()
    rc = _subprocess(args, log, timeout, {**env, "MEDFT_LOG_FORMAT": "json"})
    out = {"exit_code": rc, "wall_s": time.perf_counter() - started, "command": " ".join(args[1:]),
           **parse_job_log(log.read_text(errors="replace"))}
    if rc != 0:
        out["log"] = _tail(log, 40)
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table; ``x B`` is tokens/s over arm B's in the same run and memory cap."""
    head = ("| model | arm | cap GiB | tokens/s | s/step | x B | peak alloc GiB | peak reserved GiB | MFU | "
            "micro x accum | padding | load s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {(r["model"], r.get("cap_gib")): r["tokens_per_s"] for r in results
            if r.get("arm") == "B" and "error" not in r}
    for r in results:
        cap = r.get("cap_gib") or "-"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['arm']} | {cap} | failed: {r['error']} |")
            continue
        ref = base.get((r["model"], r.get("cap_gib")))
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
        lines.append(
            f"| {r['model']} | {r['arm']} | {cap} | {r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.3f} | "
            f"{ratio} | {r['peak_allocated_gib']:.1f} | {r['peak_reserved_gib']:.1f} | "
            f"{r.get('mfu', 0):.1%} | {r['micro_batch']} x {r['grad_accum']} | "
            f"{r['padding_share'] or 0:.0%} | {r['load_s']:.0f} |")
    return "\n".join(lines)


def arm_plan(models: list[str], arms: str, cap_gib: float, cap_models: str, cap_arms: str,
             only_cap: bool = False) -> list[tuple[str, str, float]]:
    """(model, arm, cap) in run order; an arm written ``model:arm`` runs on that model only."""
    plan: list[tuple[str, str, float]] = []
    if not only_cap:
        for m in models:
            for arm in filter(None, arms.split(",")):
                on, _, name = arm.rpartition(":")
                if on in ("", m):
                    plan.append((m, name, 0.0))
    if cap_gib:
        plan += [(m, arm, cap_gib) for m in cap_models.split(",")
                 for arm in filter(None, cap_arms.split(","))]
    return plan


def _run_arms(key: str, plan: list[tuple[str, str, float]], prep: dict[str, Any], rows_path: Path,
              a: argparse.Namespace, work: Path, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Run ``key``'s arms one process each, yielding each one's result as it finishes."""
    flops = architectures.train_flops_per_token(architectures.get(key))
    for model_key, arm, cap in [x for x in plan if x[0] == key]:
        tag = f"{arm}-{model_key}" + (f"-cap{cap:g}" if cap else "")
        spec = {"arm": arm, "model": model_key, "weights": prep["weights"], "rows": str(rows_path),
                "steps": a.steps, "warmup": a.warmup, "cap_gib": cap, "max_seq_length": a.max_seq_length,
                "work": str(work / "runs" / tag), "out": str(work / f"result-{tag}.json")}
        log = work / "logs" / f"{tag}.log"
        rc = _subprocess([sys.executable, "-m", "job.bench", "--run-arm", json.dumps(spec)], log,
                         a.arm_timeout, env)
        if rc == 0:
            r = json.loads(Path(spec["out"]).read_text())
            r["flops_per_token"] = flops
            r["mfu"] = r["tokens_per_s"] * flops / (prep["matmul_tflops"] * 1e12)
            print(f"[bench] {tag}: {r['tokens_per_s']:,.0f} tokens/s, {r['seconds_per_step']:.3f} s/step, "
                  f"peak {r['peak_allocated_gib']:.1f} GiB", flush=True)
        else:
            r = {"arm": arm, "model": model_key, "cap_gib": cap, "error": f"exit {rc}", "log": _tail(log, 40)}
            print(f"[bench] {tag}: FAILED ({r['error']})\n{r['log']}", flush=True)
        yield r


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m job.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="qwen1.5b,llama8b", help="architecture keys (job.architectures)")
    p.add_argument("--arms", default="A,B,C",
                   help=f"comma-separated, of {', '.join(ARMS)}; model:arm for one model only")
    p.add_argument("--steps", type=int, default=15, help="optimizer steps per arm (8 rows each)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--cap-gib", type=float, default=0.0, help="also run --cap-arms on --cap-models, capped")
    p.add_argument("--cap-arms", default="B,C")
    p.add_argument("--cap-models", default="llama8b")
    p.add_argument("--only-cap", action="store_true", help="skip the uncapped arms")
    p.add_argument("--whole-job", default="", help="architecture key to time the whole job on (e.g. llama8b)")
    p.add_argument("--probe", default="", help="memory probe: architecture keys, e.g. llama8b,qwen1.5b")
    p.add_argument("--arm-timeout", type=float, default=300)
    p.add_argument("--whole-job-timeout", type=float, default=900)
    p.add_argument("--work", default=os.environ.get("MEDFT_BENCH_WORK", "/tmp/medft-bench"))
    p.add_argument("--out", default="bench-results.json")
    p.add_argument("--run-arm", help=argparse.SUPPRESS)
    p.add_argument("--run-probe", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.run_arm:
        run_arm(json.loads(a.run_arm))
        return
    if a.run_probe:
        run_probe(json.loads(a.run_probe))
        return

    work = Path(a.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MEDFT_CACHE": os.environ.get("MEDFT_CACHE", str(work / "cache"))}
    out_path = Path(a.out)
    command = "python -m job.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict[str, Any] = {"command": command, "host": platform.node(), "results": [], "prepared": {},
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save() -> None:  # after every arm, so a run cut short still leaves what it measured
        out_path.write_text(json.dumps(report, indent=2, default=str))

    for key in filter(None, a.probe.split(",")):
        spec = {"model": key, "layers": 4, "tokens": [2048, 8192], "work": str(work / "weights"),
                "out": str(work / f"probe-{key}.json")}
        log = work / "logs" / f"probe-{key}.log"
        rc = _subprocess([sys.executable, "-m", "job.bench", "--run-probe", json.dumps(spec)], log,
                         a.arm_timeout, env)
        found = (json.loads(Path(spec["out"]).read_text()) if rc == 0
                 else [{"model": key, "error": f"exit {rc}", "log": _tail(log)}])
        report.setdefault("probe", []).extend(found)
        save()

    models = [m for m in a.models.split(",") if m]
    plan = arm_plan(models, a.arms, a.cap_gib, a.cap_models, a.cap_arms, a.only_cap)
    needed = list(dict.fromkeys([m for m, _, _ in plan] + ([a.whole_job] if a.whole_job else [])))
    for key in needed:
        prep = _prepare_model(key, work, env, a.arm_timeout)
        rows_path = work / f"rows-{key}.json"
        rows_path.write_text(json.dumps(synthetic_rows(architectures.get(key), a.rows, seed=1)))
        report["prepared"][key] = {**prep, "rows": str(rows_path)}
        print(f"[bench] {key}: checkpoint in {prep['save_s']:.0f} s; 8192^3 bf16 matmul "
              f"{prep['matmul_tflops']:.0f} TFLOP/s", flush=True)
        save()
        for r in _run_arms(key, plan, prep, rows_path, a, work, env):
            report["results"].append(r)
            save()
    if a.whole_job:
        weights = report["prepared"][a.whole_job]["weights"]
        report["whole_job"] = _whole_job(a.whole_job, weights, work, env, timeout=a.whole_job_timeout)
        save()
        print("[bench] whole job:", json.dumps(report["whole_job"], default=str)[:3000], flush=True)
    if report["results"]:
        print("\n" + table(report["results"]))
    save()


if __name__ == "__main__":
    main()
