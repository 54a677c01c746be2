"""The unsloth backend's memory plan: which micro-batch, checkpointing, precision and optimizer fit this GPU,
and whether the job is long enough to compile its decoder blocks.

Pure functions over the GPU's facts and the model's shape, so the plan is unit-tested on a CPU.
Planning (:meth:`UnslothBackend.plan`) reads the GPU's usable memory (its total, the per-process memory
fraction when one is set, and ``MEDFT_GPU_MEMORY_GIB`` when set, whichever is least) and the model's shape
(from ``config.json`` when ``model.base`` is a local directory, else from the known architectures in
:mod:`job.architectures`), and picks from an estimate of each setting's peak memory for the *worst case*
micro-batch: every row at ``model.max_seq_length`` tokens. So a plan that fits never runs out of memory on
longer rows later; the estimate's coefficients were measured on the GPU (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from job import architectures
from job.architectures import Architecture
from job.backends import TrainPlan
from job.config import JobConfig
from job.paths import is_prequantized
from registry.errors import ConfigError
from registry.uris import parse_uri

GIB = 2**30

# --- the memory model -------------------------------------------------------------------------------------
# Calibrated on an H200 (docs/benchmarks.md): peak allocated memory of the full Llama-8B and Qwen-1.5B shapes
# training micro-batches of 1,800 to 7,200 tokens, and of 4-layer models of the same widths at 2,048 and 8,192
# tokens with and without checkpointing. Each constant sits about 10% above what was measured, so the
# estimate errs towards memory to spare. Checked on an H100 at the worst case the plan sizes for, 8 rows of
# 2,048 tokens (run 12): the 8B's 4-bit plan peaked at 65.4 GiB eager and 66.4 compiled against 74.5
# estimated, the 1.5B in 16-bit at 31.9 and 29.9 against 33.8.
#
# Bytes kept per token for each decoder layer's backward pass, as multiples of hidden and intermediate size
# in 16-bit values (measured 7.6 and 2.0 on the full models).
ACT_HIDDEN = 8.5
ACT_INTERMEDIATE = 2.2
# Per token outside the layers (embeddings' output, final norm, the loss's hidden-state gradient), in bytes
# per hidden unit: measured 38 on the 4-layer models. With unsloth's offloaded checkpointing the layer inputs
# go to host memory and what stays on the GPU is one layer's activations plus 16 of these.
OUTSIDE_BYTES_PER_HIDDEN = 40
OUTSIDE_BYTES_PER_HIDDEN_OFFLOADED = 16
# NF4 with double-quantised block scales: 4 bits plus about 0.13 bits of scales per weight (measured: the
# estimate of the 4-layer Llama-8B-wide model's weights was within 1% of the allocator's count).
NF4_BYTES_PER_PARAM = 0.53
# LoRA factors train in float32: weight, gradient, a float32 temporary, plus the optimizer's two moments
# (one byte each in 8-bit AdamW, four in torch's AdamW).
LORA_BYTES_PER_PARAM = 4 + 4 + 4
OPTIMIZER_STATE_BYTES_PER_PARAM = {"adamw_8bit": 2, "paged_adamw_8bit": 2}
FLOAT32_ADAM_STATE_BYTES = 8
FUSED_ADAMW = "adamw_torch_fused"
# Unsloth's fused cross-entropy makes float32 logits max(512, tokens / 8) tokens at a time.
LOSS_MIN_CHUNK_TOKENS = 512
LOSS_BYTES_PER_LOGIT = 4
# Kept free on top of the estimate: cuBLAS workspaces, allocator fragmentation (unsloth turns on
# expandable segments, which keeps it small), the odd temporary.
HEADROOM_BYTES = int(0.5 * GIB)
HEADROOM_FRACTION = 0.04

#: ``train.compile: auto`` compiles unsloth's decoder blocks for jobs of at least this many optimizer steps.
#: On the 8B (H100, docs/benchmarks.md run 10) compiling added about 17 s to the first step and then saved
#: 0.02 s a step (0.444 against 0.465 s), so it pays back after about 800 steps; the recipe's job is 60.
COMPILE_MIN_STEPS = 1000


@dataclass(frozen=True)
class GpuFacts:
    """The GPU the plan is for: what it is and how much of its memory this process may use."""

    name: str
    total_bytes: int
    usable_bytes: int
    bf16: bool
    capability: tuple[int, int]
    limit: str  # what set usable_bytes: "total", "memory fraction", "MEDFT_GPU_MEMORY_GIB", "free memory"


def gpu_facts(device: int = 0) -> GpuFacts:
    """Read the current CUDA device. Raises ConfigError when there is none."""
    if not torch.cuda.is_available():
        raise ConfigError("model.backend: unsloth needs a CUDA GPU; use --set model.backend=hf on this "
                          "machine")
    props = torch.cuda.get_device_properties(device)
    total = int(props.total_memory)
    limits = {"total": total}
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    if get_fraction is not None:
        fraction = float(get_fraction(device))
        if fraction < 1.0:
            limits["memory fraction"] = int(total * fraction)
    if os.environ.get("MEDFT_GPU_MEMORY_GIB"):
        try:
            limits["MEDFT_GPU_MEMORY_GIB"] = int(float(os.environ["MEDFT_GPU_MEMORY_GIB"]) * GIB)
        except ValueError:
            raise ConfigError(f"MEDFT_GPU_MEMORY_GIB={os.environ['MEDFT_GPU_MEMORY_GIB']!r}: "
                              "give the GPU memory to plan for in GiB, e.g. 8") from None
    free, _ = torch.cuda.mem_get_info(device)
    # Memory other processes hold is not ours to plan with; what this process already holds still is.
    limits["free memory"] = int(free) + int(torch.cuda.memory_reserved(device))
    limit = min(limits, key=lambda k: limits[k])
    return GpuFacts(name=props.name, total_bytes=total, usable_bytes=limits[limit],
                    bf16=bool(torch.cuda.is_bf16_supported()), capability=(props.major, props.minor),
                    limit=limit)


def model_shape(cfg: JobConfig) -> Architecture | None:
    """The base model's shape without loading it: a local directory's config.json, else a known name."""
    base = cfg.model.base
    location = parse_uri(base)
    if location.is_local:
        shape = architectures.from_pretrained_dir(location.local_path())
        if shape is not None:
            return shape
    return architectures.match(base)


def estimate_peak_bytes(arch: Architecture, *, tokens: int, load_in_4bit: bool, checkpointing: bool | str,
                        lora_r: int, target_modules: tuple[str, ...], optim: str = "adamw_8bit") -> int:
    """Estimated peak GPU memory of one training micro-batch of ``tokens`` tokens (allocator's view)."""
    counts = arch.parameter_counts()
    linear = arch.num_hidden_layers * sum(a * b for a, b in arch.projection_shapes().values())
    if load_in_4bit:
        weights = linear * NF4_BYTES_PER_PARAM + (counts["total"] - linear) * 2
    else:
        weights = counts["total"] * 2
    state = OPTIMIZER_STATE_BYTES_PER_PARAM.get(optim, FLOAT32_ADAM_STATE_BYTES)
    lora = arch.lora_parameters(lora_r, target_modules) * (LORA_BYTES_PER_PARAM + state)
    layer = 2 * (ACT_HIDDEN * arch.hidden_size + ACT_INTERMEDIATE * arch.intermediate_size)
    if checkpointing == "unsloth":
        # Unsloth offloads each layer's input to host memory: one layer's activations live at a time.
        activations = tokens * (layer + OUTSIDE_BYTES_PER_HIDDEN_OFFLOADED * arch.hidden_size)
    elif checkpointing:
        # Plain checkpointing keeps every layer's input on the GPU.
        activations = tokens * (layer + OUTSIDE_BYTES_PER_HIDDEN * arch.hidden_size
                                + 2 * arch.hidden_size * arch.num_hidden_layers)
    else:
        activations = tokens * (layer * arch.num_hidden_layers + OUTSIDE_BYTES_PER_HIDDEN * arch.hidden_size)
    loss = max(LOSS_MIN_CHUNK_TOKENS, tokens // 8) * arch.vocab_size * LOSS_BYTES_PER_LOGIT
    return int(weights + lora + activations + loss)


def _budget(gpu: GpuFacts) -> int:
    return int(gpu.usable_bytes * (1 - HEADROOM_FRACTION)) - HEADROOM_BYTES


def _gc_value(setting: str) -> bool | str:
    return {"off": False, "on": True, "unsloth": "unsloth"}[setting]


def _gc_label(value: bool | str) -> str:
    return {False: "off", True: "on", "unsloth": "unsloth (offloaded to host memory)"}[value]


# --- the memory search: pure, no reasons ------------------------------------------------------------------

class Setting(NamedTuple):
    """One combination the plan may pick: checkpointing, micro-batch rows, 4-bit weights, optimizer."""

    gradient_checkpointing: bool | str
    micro_batch: int
    load_in_4bit: bool
    optim: str


@dataclass(frozen=True)
class SearchSpace:
    """The options for each ``auto`` setting (a configured value is the only option), each most preferred first.

    ``four_bit_tiers`` are searched one after the other: an explicit ``model.load_in_4bit: false`` is a tier
    of its own, ahead of 4-bit, so 4-bit is tried only when 16-bit fits nowhere.
    """

    four_bit_tiers: tuple[tuple[bool, ...], ...]
    gradient_checkpointing: tuple[bool | str, ...]
    micro_batch: tuple[int, ...]
    optim: tuple[str, ...]
    rows_per_step: int

    def candidates(self) -> list[Setting]:
        """Every combination in search order (the order of :func:`plan_for`'s docstring): itertools.product
        varies the last option fastest."""
        return [Setting(*c) for tier in self.four_bit_tiers
                for c in itertools.product(self.gradient_checkpointing, self.micro_batch, tier, self.optim)]


def search_space(cfg: JobConfig) -> SearchSpace:
    """The options ``cfg`` leaves open; a pre-quantized base or ``load_in_4bit: true`` allows only 4-bit."""
    t = cfg.train
    four_bit_setting = cfg.model.load_in_4bit
    if is_prequantized(cfg.model.base) or four_bit_setting is True:
        four_bit_tiers: tuple[tuple[bool, ...], ...] = ((True,),)
    elif four_bit_setting == "auto":
        four_bit_tiers = ((False, True),)
    else:
        four_bit_tiers = ((False,), (True,))
    rows_per_step = (2 if t.batch_size == "auto" else t.batch_size) * t.grad_accum
    if t.batch_size == "auto":
        micro = tuple(m for m in range(rows_per_step, 0, -1) if rows_per_step % m == 0)
    else:
        micro = (t.batch_size,)
    gc_setting = t.gradient_checkpointing
    return SearchSpace(
        four_bit_tiers=four_bit_tiers,
        gradient_checkpointing=(False, "unsloth") if gc_setting == "auto" else (_gc_value(gc_setting),),
        micro_batch=micro, optim=(FUSED_ADAMW, "adamw_8bit") if t.optim == "auto" else (t.optim,),
        rows_per_step=rows_per_step)


def micro_batch_peak(cfg: JobConfig, shape: Architecture, chosen: Setting | TrainPlan, tokens: int) -> int:
    """Estimated peak bytes of one micro-batch of ``tokens`` tokens (padding included) trained with ``chosen``'s
    weights, checkpointing and optimizer and ``cfg``'s LoRA: what a plan is sized by, and what a measured peak
    is held against."""
    return estimate_peak_bytes(shape, tokens=tokens, load_in_4bit=chosen.load_in_4bit,
                               checkpointing=chosen.gradient_checkpointing, lora_r=cfg.lora.r,
                               target_modules=cfg.lora.target_modules, optim=chosen.optim)


def setting_peak(cfg: JobConfig, shape: Architecture, setting: Setting) -> int:
    """Estimated peak bytes of ``setting``'s worst-case micro-batch: every row ``model.max_seq_length`` long."""
    return micro_batch_peak(cfg, shape, setting, setting.micro_batch * cfg.model.max_seq_length)


def first_fit(candidates: list[Setting], peak: Callable[[Setting], int], budget: int) -> tuple[Setting, bool]:
    """The first candidate whose peak fits ``budget``, and True; when none fits, the last (least preferred)
    one, which is the smallest where the options are ``auto``, and False."""
    chosen = next((c for c in candidates if peak(c) <= budget), None)
    return (chosen, True) if chosen is not None else (candidates[-1], False)


def recipe_setting(cfg: JobConfig) -> Setting:
    """The reference recipe's settings for every ``auto`` one: what a plan falls back to without a shape."""
    t = cfg.train
    gc_setting = t.gradient_checkpointing
    return Setting(gradient_checkpointing="unsloth" if gc_setting == "auto" else _gc_value(gc_setting),
                   micro_batch=2 if t.batch_size == "auto" else t.batch_size,
                   load_in_4bit=cfg.model.load_in_4bit is not False,
                   optim="adamw_8bit" if t.optim == "auto" else t.optim)


def _grad_accum(cfg: JobConfig, space: SearchSpace, setting: Setting) -> int:
    """Accumulation that keeps the recipe's rows per optimizer step when the micro-batch is ``auto``."""
    return space.rows_per_step // setting.micro_batch if cfg.train.batch_size == "auto" else cfg.train.grad_accum


# --- the reasons the plan logs ----------------------------------------------------------------------------
# Why each setting was chosen, in words: measured figures belong in docs/benchmarks.md, not in these strings.

def _hardware_reasons(cfg: JobConfig, gpu: GpuFacts) -> dict[str, str]:
    """The reasons that do not depend on the search: the GPU, its precision and the packing setting."""
    reasons = {"gpu": f"{gpu.name}, {gpu.usable_bytes / GIB:.1f} GiB usable "
                      f"(limited by {gpu.limit}; {gpu.total_bytes / GIB:.1f} GiB total)",
               "precision": "bf16: the GPU supports bfloat16" if gpu.bf16 else "fp16: the GPU lacks bfloat16"}
    if cfg.train.packing == "auto":
        reasons["packing"] = (
            "padded (auto): padded micro-batches run Unsloth's compiled decoder blocks and were measured fastest "
            "on an H200, ahead of padding-free varlen batches and of steps grouped by length, see "
            "docs/benchmarks.md")
    elif cfg.train.packing is True:
        reasons["packing"] = ("padding-free (train.packing: true): rows are concatenated without padding and "
                              "attend only within themselves (varlen attention)")
    else:
        reasons["packing"] = "padded (train.packing: false)"
    return reasons


def _unknown_shape_reasons(cfg: JobConfig, setting: Setting, grad_accum: int) -> dict[str, str]:
    """Why the recipe's settings were kept: there was no shape to size against."""
    t, four_bit_setting = cfg.train, cfg.model.load_in_4bit
    unknown = f"the model's shape is unknown before its weights are pulled ({cfg.model.base})"
    return {
        "batch_size": f"{setting.micro_batch} x {grad_accum}: {unknown}, so the recipe's micro-batch is kept",
        "gradient_checkpointing": f"{_gc_label(setting.gradient_checkpointing)}: model shape unknown, the "
                                  "recipe's setting",
        "load_in_4bit": f"{setting.load_in_4bit}: " + ("as configured" if four_bit_setting != "auto" else unknown),
        "optim": f"{setting.optim}: " + ("as configured" if t.optim != "auto" else unknown),
    }


def _batch_reason(cfg: JobConfig, setting: Setting, grad_accum: int, rows_per_step: int, need: int, budget: int,
                  fits: bool) -> str:
    micro, seq = setting.micro_batch, cfg.model.max_seq_length
    worst = f"worst case {micro} x {seq} tokens needs ~{need / GIB:.1f} GiB of a {budget / GIB:.1f} GiB budget"
    if cfg.train.batch_size == "auto":
        reason = (f"{micro} rows x {grad_accum} accumulation = the recipe's {rows_per_step} rows per optimizer "
                  f"step; {worst}")
    else:
        reason = f"{micro} x {grad_accum}: as configured; {worst}"
    if not fits:
        reason += " (does not fit: expect out-of-memory on the longest rows; lower model.max_seq_length or use " \
                  "a larger GPU)"
    return reason


def _gc_reason(cfg: JobConfig, setting: Setting) -> str:
    gc = setting.gradient_checkpointing
    if cfg.train.gradient_checkpointing != "auto":
        return f"{_gc_label(gc)}: as configured"
    why = ("it fits without" if gc is False else
           "no micro-batch fits without it; offloading keeps one layer's activations on the GPU")
    return f"{_gc_label(gc)}: {why}"


def _four_bit_reason(cfg: JobConfig, setting: Setting, sixteen_bit_need: int) -> str:
    """Why the weights are (not) 4-bit; ``sixteen_bit_need`` is the same setting's peak with 16-bit weights."""
    four_bit_setting = cfg.model.load_in_4bit
    if is_prequantized(cfg.model.base):
        return f"True: {cfg.model.base} is pre-quantized"
    if setting.load_in_4bit and four_bit_setting is not True:
        how = " (auto)" if four_bit_setting == "auto" else ", although model.load_in_4bit is false"
        return f"True{how}: 16-bit weights would need ~{sixteen_bit_need / GIB:.1f} GiB here, over the budget"
    if not setting.load_in_4bit:
        return ("False (auto): 16-bit LoRA fits; it skips dequantizing and trains against the exact weights the "
                "adapter is merged into" if four_bit_setting == "auto" else "False: as configured")
    return "True: as configured"


def _optim_reason(cfg: JobConfig, setting: Setting) -> str:
    optim = setting.optim
    if cfg.train.optim != "auto":
        return f"{optim}: as configured"
    if optim == FUSED_ADAMW:
        return (f"{optim} (auto): float32 moments fit, and one fused kernel updates every LoRA tensor instead of a "
                "Python loop over them")
    return f"{optim} (auto): float32 moments would not fit the budget"


def compile_setting(cfg: JobConfig) -> tuple[bool, str]:
    """Whether to compile the decoder blocks (``train.compile``), and why."""
    setting, steps = cfg.train.compile, cfg.train.max_steps
    if setting != "auto":
        return setting, f"{'on' if setting else 'off'} (train.compile)"
    if steps == -1:
        return True, "on (auto): trains by epochs, long enough for compiling to pay back"
    if steps >= COMPILE_MIN_STEPS:
        return True, f"on (auto): {steps} steps, at least {COMPILE_MIN_STEPS}, long enough to pay back compiling"
    return False, (f"off (auto): {steps} steps, under {COMPILE_MIN_STEPS}: compiling would take longer than it "
                   "saves")


def _sized_reasons(cfg: JobConfig, space: SearchSpace, chosen: Setting, grad_accum: int,
                   peak: Callable[[Setting], int], budget: int, fits: bool) -> dict[str, str]:
    """Why each setting was chosen by the search over the model's shape."""
    return {
        "batch_size": _batch_reason(cfg, chosen, grad_accum, space.rows_per_step, peak(chosen), budget, fits),
        "gradient_checkpointing": _gc_reason(cfg, chosen),
        "load_in_4bit": _four_bit_reason(cfg, chosen, peak(chosen._replace(load_in_4bit=False))),
        "optim": _optim_reason(cfg, chosen),
    }


def plan_for(cfg: JobConfig, gpu: GpuFacts, shape: Architecture | None) -> TrainPlan:
    """Resolve the ``auto`` settings for ``gpu`` and the model ``shape``; pure, so it can be tested anywhere.

    Micro-batch (``train.batch_size: auto``): the recipe's optimizer step is ``2 x train.grad_accum`` rows
    (2 x 4 = 8 rows, about 5,800 tokens of this data); the plan keeps exactly that many rows per optimizer
    step, so the learning-rate schedule, the number of steps and the data seen per step stay the recipe's,
    and moves them from accumulation into the micro-batch. Every ``auto`` setting is chosen from the
    estimated peak memory of the *worst case* (every row ``max_seq_length`` tokens), which bounds real rows
    too, so a plan that fits does not run out of memory later in the run. The first combination that fits
    wins, searched in the order of what each was measured to give on an H200 (``docs/benchmarks.md``):

    1. no activation checkpointing (checkpointing recomputes the forward pass: x1.58 on 8B when off);
    2. the largest micro-batch (8 x 1 over 2 x 4: x1.37 on 8B);
    3. 16-bit LoRA over 4-bit (``model.load_in_4bit: auto``), which also trains against the exact weights
       the adapter is merged into;
    4. fused torch AdamW over 8-bit AdamW (``train.optim: auto``): float32 moments cost 6 more bytes per
       LoRA parameter (about 0.25 GiB on 8B) and save a Python loop over every LoRA tensor each step.
    """
    reasons = _hardware_reasons(cfg, gpu)
    space = search_space(cfg)
    if shape is None:
        # Nothing to size against: the recipe's own settings, which ran on 16 GB cards.
        chosen = recipe_setting(cfg)
        grad_accum = _grad_accum(cfg, space, chosen)
        reasons.update(_unknown_shape_reasons(cfg, chosen, grad_accum))
    else:
        budget = _budget(gpu)
        peak = functools.partial(setting_peak, cfg, shape)
        chosen, fits = first_fit(space.candidates(), peak, budget)
        grad_accum = _grad_accum(cfg, space, chosen)
        reasons.update(_sized_reasons(cfg, space, chosen, grad_accum, peak, budget, fits))
    compile_blocks, reasons["compile"] = compile_setting(cfg)
    return TrainPlan(batch_size=chosen.micro_batch, grad_accum=grad_accum, packing=cfg.train.packing is True,
                     gradient_checkpointing=chosen.gradient_checkpointing, load_in_4bit=chosen.load_in_4bit,
                     precision="bf16" if gpu.bf16 else "fp16", optim=chosen.optim, compile=compile_blocks,
                     reasons=reasons)
