"""The benchmark's arms and its memory probe, each run in a process of its own (``--run-arm``, ``--run-probe``).

An arm trains one model on the synthetic rows and returns what :class:`benchmarks.meter.Meter` measured: ``A``
(transformers + peft + bitsandbytes through medft's ``hf`` backend), ``B`` (Unsloth with the reference recipe's
exact settings) and ``C`` and its variants (medft's own train stage). :mod:`benchmarks.train` says what each does.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.meter import Meter, TimedBackend, timed_trainer
from benchmarks.models import save_random_checkpoint
from benchmarks.rows import synthetic_rows
from job import architectures
from job.architectures import PROJECTIONS, Architecture

GIB = 2**30

ARMS = {
    "A": "transformers + peft + bitsandbytes, SDPA, gradient checkpointing, padded 2 x 4",
    "B": "Unsloth, the reference recipe: 4-bit, padded 2 x 4, checkpointing 'unsloth'",
    "B-auto": "Unsloth, the recipe's code as published (padding_free left to Unsloth)",
    "C": "medft train stage (unsloth backend), defaults, decoder blocks compiled as a long job's are",
    "C-qlora": "medft, defaults but 4-bit weights and 8-bit AdamW (the recipe's)",
    "C-4bit": "medft, defaults but model.load_in_4bit=true",
    "C-8bit": "medft, defaults but train.optim=adamw_8bit",
    "C-log10": "medft, defaults but train.logging_steps=10",
    "C-mb2": "medft, defaults but train.batch_size=2",
    "C-packed": "medft, defaults but train.packing=true (padding-free)",
    "C-packed-eager": "medft, defaults but train.packing=true and train.compile=false: padding-free as a short "
                      "job would run it",
    "C-grouped": "medft, defaults but padded steps of similar-length rows (group_by_length sampler)",
    "C-gc": "medft, defaults but train.gradient_checkpointing=unsloth",
    "C-mask": "medft, defaults but padded batches keep their attention mask (put back by the benchmark)",
    "C-fp8": "medft, 16-bit plan but the base's linear layers in FP8 (Unsloth's load_in_fp8: row-wise FP8 "
             "weights through torchao, FP8 matmuls in the forward pass)",
    "C-fp8-eager": "C-fp8 without unsloth's per-block torch.compile (train.compile=false)",
    "C-eager": "medft, defaults but train.compile=false (no per-block torch.compile), as a short job runs: "
               "what it saves in compiling against what each step loses",
    "C-graphs": "medft, defaults but unsloth's per-block CUDA graphs (UNSLOTH_BLOCK_CUDAGRAPHS=1), batches "
                "padded to a multiple of 64 tokens so that a few shapes recur",
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
    "C-packed-eager": ["train.packing=true", "train.compile=false"],
    "C-grouped": [],
    "C-gc": ["train.gradient_checkpointing=unsloth"],
    "C-mask": [],
    # The plan sized for 16-bit weights; FP8 weights take half of that. Compare with C at the same plan.
    "C-fp8": ["model.load_in_4bit=false"],
    "C-fp8-eager": ["model.load_in_4bit=false", "train.compile=false"],
    "C-eager": ["train.compile=false"],
    "C-graphs": [],
}
#: Environment an arm sets in its own process before loading. CUDA graphs replay the launches of a whole
#: block, for the host-bound 1.5B; unsloth records a graph set per shape and gives graphs up past 8 shapes,
#: hence the padding to a multiple (about 4% more tokens here).
ARM_ENV = {"C-graphs": {"UNSLOTH_BLOCK_CUDAGRAPHS": "1"}}
PAD_TO_MULTIPLE = {"C-graphs": 64}
#: Every C arm runs the unsloth backend with medft's defaults, then its own overrides. The arms run a few dozen
#: steps but measure the speed of long jobs, which compile their decoder blocks (``train.compile: auto``).
MEDFT_DEFAULTS = ["model.backend=unsloth", "train.compile=true"]


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

    if spec["arm"].startswith("C-fp8"):
        _load_in_fp8()
    started = time.perf_counter()
    model, tokenizer = backend.load(Path(spec["weights"]), cfg, plan)
    load_s = time.perf_counter() - started
    data = PreparedData(train=rows, eval=[], eval_rows=[], report=DataReport(source="synthetic"))
    extra = {"train_sampling_strategy": "group_by_length"} if spec["arm"] == "C-grouped" else {}
    result = fit(cfg, TimedBackend(backend, meter, extra), plan, model, tokenizer, data,
                 work_dir=Path(spec["work"]) / "trainer")
    return {"load_s": load_s, "grad_accum": plan.grad_accum, "micro_batch": plan.batch_size,
            "plan": {k: v for k, v in plan.__dict__.items()}, "overrides": overrides,
            "estimate_gib": _plan_estimate(spec["model"], cfg, plan, max(meter.fed, default=0)) / GIB,
            "fit_tokens_per_s": result.tokens_per_s, "fit_wall_s": result.wall_s, "fp8_weights": _fp8_weights(model),
            **_gpu_memory(torch)}


def _plan_estimate(model_key: str, cfg: Any, plan: Any, tokens: int) -> int:
    """The memory plan's estimate for the largest micro-batch the arm trained (``tokens``, padding included), to
    set beside its measured peak: a plan built on an estimate below the peak can run out of memory."""
    from job.backends.memory_plan import micro_batch_peak

    return micro_batch_peak(cfg, architectures.get(model_key), plan, tokens)


def _load_in_fp8() -> None:
    """Make unsloth's ``FastLanguageModel.from_pretrained`` load the base in FP8 (``load_in_fp8=True``).

    The lever under test has no medft setting (it ships only if it wins: ``docs/benchmarks.md``), so the arm
    reroutes the one call medft's backend makes; unsloth quantizes the 16-bit checkpoint with torchao and
    trains the LoRA over it.
    """
    from unsloth import FastLanguageModel

    load = FastLanguageModel.from_pretrained

    def fp8(*args: Any, **kwargs: Any) -> Any:
        return load(*args, **{**kwargs, "load_in_fp8": True, "load_in_16bit": False, "load_in_4bit": False})

    FastLanguageModel.from_pretrained = staticmethod(fp8)


def _fp8_weights(model: Any) -> int:
    """How many linear weights are FP8 (torchao's Float8Tensor or a float8 dtype): proof the FP8 arm is FP8."""
    import torch

    fp8 = (torch.float8_e4m3fn, torch.float8_e5m2)
    weights = [getattr(m, "weight", None) for m in model.modules()]
    return sum(1 for w in weights if w is not None and (type(w).__name__ == "Float8Tensor" or w.dtype in fp8))


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
    os.environ.update(ARM_ENV.get(spec["arm"], {}))
    rows = json.loads(Path(spec["rows"]).read_text())
    trace = spec.get("trace_steps", 0)
    meter = Meter(spec["warmup"], attention_mask=spec["arm"] == "C-mask", trace_steps=trace,
                  pad_to_multiple_of=PAD_TO_MULTIPLE.get(spec["arm"]),
                  trace_out=Path(spec["out"]).with_suffix(".trace.txt") if trace else None)
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

    Feeds the constants of :func:`job.backends.memory_plan.estimate_peak_bytes`: a model of the real widths with
    few layers separates per-layer activations from weights and the loss.
    """
    import torch

    from job.backends import TrainPlan
    from job.backends.unsloth import UnslothBackend
    from job.config import load_config

    arch = architectures.get(spec["model"])
    backend = UnslothBackend()
    arch = replace(arch, num_hidden_layers=spec["layers"], key=f"{arch.key}-L{spec['layers']}")
    weights = save_random_checkpoint(arch, Path(spec["work"]) / arch.key)
    cfg = load_config(overrides=[f"model.base={weights}"], env={})
    results = []
    for gc in ("unsloth", False):
        plan = TrainPlan(batch_size=1, grad_accum=1, packing=True, gradient_checkpointing=gc,
                         load_in_4bit=True, precision="bf16", optim="adamw_8bit", compile=True)
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        model, _ = backend.load(weights, cfg, plan)
        weights_bytes = torch.cuda.memory_allocated() - before
        model.train()
        for tokens in spec["tokens"]:
            seconds, peak = _forward_backward(model, _packed_batch(arch, tokens))
            results.append(_probe_record(arch, gc, tokens, weights_bytes, seconds, peak))
            print(json.dumps(results[-1]), flush=True)
        del model
    Path(spec["out"]).write_text(json.dumps(results, indent=2))
    return {"probe": results}


def _packed_batch(arch: Architecture, tokens: int) -> dict[str, Any]:
    """One padding-free micro-batch of exactly ``tokens`` tokens: synthetic rows back to back, on the GPU."""
    import torch

    rows = synthetic_rows(arch, 64, seed=tokens)
    ids, pos = [], []
    for r in rows:
        take = r["input_ids"][: tokens - len(ids)]
        ids += take
        pos += list(range(len(take)))
        if len(ids) >= tokens:
            break
    return {"input_ids": torch.tensor([ids], device="cuda"),
            "position_ids": torch.tensor([pos], device="cuda"),
            "labels": torch.tensor([ids], device="cuda")}


def _forward_backward(model: Any, batch: dict[str, Any], reps: int = 3) -> tuple[float, int]:
    """The fastest of ``reps`` forward and backward passes in seconds, and the last one's peak bytes above
    what was allocated before it (the step's own memory, weights excluded)."""
    import torch

    times = []
    for _ in range(reps):
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
    return min(times), peak


def _probe_record(arch: Architecture, gc: bool | str, tokens: int, weights_bytes: int, seconds: float,
                  peak: int) -> dict[str, Any]:
    """One probe measurement beside the plan's estimate for the same micro-batch."""
    from job.backends.memory_plan import estimate_peak_bytes

    est = estimate_peak_bytes(arch, tokens=tokens, load_in_4bit=True, checkpointing=gc, lora_r=16,
                              target_modules=PROJECTIONS)
    lora = arch.lora_parameters(16) * 4
    return {"model": arch.key, "layers": arch.num_hidden_layers, "gc": gc, "tokens": tokens,
            "weights_gib": weights_bytes / GIB, "step_peak_gib": peak / GIB,
            "estimate_total_gib": est / GIB,
            "measured_total_gib": (weights_bytes + peak) / GIB,
            "lora_fp32_gib": lora / GIB, "fwd_bwd_s": seconds,
            "tokens_per_s": tokens / seconds}
