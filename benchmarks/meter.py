"""Measuring a training run: the GPU's bf16 matmul peak, tokens and time per optimizer step.

:class:`Meter` counts tokens at the collator and times optimizer steps with a trainer callback;
:class:`TimedBackend` wraps a medft backend so its trainer class carries both. torch and transformers are
imported by the functions that need them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any


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

    def __init__(self, warmup: int = 0, attention_mask: bool = False, trace_steps: int = 0,
                 trace_out: Path | None = None, pad_to_multiple_of: int | None = None) -> None:
        self.warmup = warmup
        # torch.profiler over the last ``trace_steps`` warm-up steps (compiled by then, not yet timed), written
        # to ``trace_out`` as a table of the kernels and ops that took the most device time.
        self.trace_steps, self.trace_out = (trace_steps, trace_out) if 0 < trace_steps < warmup else (0, None)
        self._profiler: Any = None
        self.attention_mask = attention_mask  # put back the mask the train stage leaves out of padded batches
        self.pad_to_multiple_of = pad_to_multiple_of  # set on TRL's collator inside medft's (recurring shapes)
        self.real: list[int] = []     # non-padding tokens per micro-batch
        self.fed: list[int] = []      # tokens the model processed, padding included
        self.step_end: list[float] = []
        self.start: float | None = None
        self.losses: list[float] = []

    def wrap(self, collator: Any) -> Any:
        import torch

        meter = self
        trl_collator = getattr(collator, "inner", None)
        if self.pad_to_multiple_of and trl_collator is not None:
            trl_collator.pad_to_multiple_of = self.pad_to_multiple_of

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
                meter.trace(state.global_step)
                if state.global_step in (meter.warmup, state.max_steps):
                    sync()
                meter.step_end.append(time.perf_counter())

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    meter.losses.append(float(logs["loss"]))

        return Timing()

    def trace(self, step: int) -> None:
        """Called at the end of each optimizer ``step``: starts the profiler ``trace_steps`` steps before the
        timing starts and writes its table when the timing starts (before the clock is read)."""
        if not self.trace_steps:
            return
        import torch

        if step == self.warmup - self.trace_steps:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()
        elif step == self.warmup and self._profiler is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self._profiler.__exit__(None, None, None)
            order = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = self._profiler.key_averages().table(sort_by=order, row_limit=45, max_name_column_width=70)
            assert self.trace_out is not None
            self.trace_out.write_text(f"{self.trace_steps} optimizer steps before timing, by {order}\n{table}\n")
            self._profiler = None

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
                "last_loss": self.losses[-1] if self.losses else None, "losses": self.losses,
                # Every step, compiling ones included: what a short job pays (the host's clock at each step's
                # end; the GPU is synchronized only around the timed steps, and at each logged loss).
                "step_seconds": [b - a for a, b in zip([self.start, *self.step_end], self.step_end)],
                "train_seconds": self.step_end[-1] - self.start if steps else 0.0}


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

    def for_training(self, model: Any) -> Any:
        return self.inner.for_training(model)

    def trainer_class(self) -> type:
        return timed_trainer(self.inner.trainer_class(), self.meter)
