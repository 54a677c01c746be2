"""The ``unsloth`` backend: Unsloth's patched kernels and trainer, CUDA only, sized to the GPU it finds.

Importing this module imports nothing that needs a GPU; constructing :class:`UnslothBackend` prepares the
environment (offline, no statistics, every cache under one writable directory) and then imports unsloth,
which must come before transformers, trl and peft so that its patches apply.
:func:`job.backends.select_backend` constructs it before the train stage imports any of them.

Environment, set only where the caller has not set it (``setdefault``):

* ``UNSLOTH_DISABLE_STATISTICS=1``: no call home.
* ``HF_HOME``, ``TRITON_CACHE_DIR``, ``TORCHINDUCTOR_CACHE_DIR``, ``UNSLOTH_COMPILE_LOCATION``,
  ``XDG_CACHE_HOME``, ``CUDA_CACHE_PATH`` under ``$MEDFT_CACHE`` (default ``~/.cache/medft``), so that a
  container can run with a read-only root and one writable volume.
* ``HF_HUB_OFFLINE`` is honoured as set; weights always load from the local directory the pull stage made
  (``local_files_only``), so nothing is downloaded here either way.

Planning (:meth:`UnslothBackend.plan`) reads the GPU's usable memory (its total, the per-process memory
fraction when one is set, and ``MEDFT_GPU_MEMORY_GIB`` when set, whichever is least) and the model's shape
(from ``config.json`` when ``model.base`` is a local directory, else from the known architectures in
:mod:`job.architectures`), and picks from an estimate of each setting's peak memory for the *worst case*
micro-batch: every row at ``model.max_seq_length`` tokens. So a plan that fits never runs out of memory on
longer rows later; the estimate's coefficients were measured on the GPU (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from job import architectures
from job.architectures import Architecture
from job.backends import TrainPlan
from job.config import JobConfig
from job.model import cache_root, is_prequantized
from registry.errors import ConfigError
from registry.logs import get_logger

log = get_logger(__name__)

GIB = 2**30

# --- the memory model -------------------------------------------------------------------------------------
# Calibrated on an H200 (docs/benchmarks.md): peak allocated memory of the full Llama-8B and Qwen-1.5B shapes
# training micro-batches of 1,800 to 7,200 tokens, and of 4-layer models of the same widths at 2,048 and 8,192
# tokens with and without checkpointing. Each constant sits about 10% above what was measured, so the
# estimate errs towards memory to spare.
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
    local = Path(base.removeprefix("file://")).expanduser()
    if "://" not in base or base.startswith("file://"):
        shape = architectures.from_pretrained_dir(local)
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
    t = cfg.train
    reasons: dict[str, str] = {"gpu": f"{gpu.name}, {gpu.usable_bytes / GIB:.1f} GiB usable "
                                      f"(limited by {gpu.limit}; {gpu.total_bytes / GIB:.1f} GiB total)"}
    if gpu.bf16:
        precision = "bf16"
        reasons["precision"] = "bf16: the GPU supports bfloat16"
    else:
        precision = "fp16"
        reasons["precision"] = "fp16: the GPU lacks bfloat16"

    packing = t.packing is True
    if t.packing == "auto":
        reasons["packing"] = (
            "padded (auto): padded micro-batches run Unsloth's compiled decoder blocks and were measured "
            "fastest on an H200, ahead of padding-free varlen batches (1.5B: 41.4k vs 20.6k tokens/s; 8B: "
            "13.8k vs 12.7k) and of steps grouped by length (1.5B: 41.9k vs 31.0k), see docs/benchmarks.md")
    elif packing:
        reasons["packing"] = ("padding-free (train.packing: true): rows are concatenated without padding and "
                              "attend only within themselves (varlen attention)")
    else:
        reasons["packing"] = "padded (train.packing: false)"

    seq = cfg.model.max_seq_length
    budget = _budget(gpu)
    prequantized = is_prequantized(cfg.model.base)
    four_bit_setting = cfg.model.load_in_4bit
    if prequantized or four_bit_setting is True:
        four_bit_tiers = [[True]]
    elif four_bit_setting == "auto":
        four_bit_tiers = [[False, True]]
    else:
        # An explicit false falls back to 4-bit only when 16-bit fits nowhere (said in the reasons).
        four_bit_tiers = [[False], [True]]
    optim_options = [FUSED_ADAMW, "adamw_8bit"] if t.optim == "auto" else [t.optim]
    gc_setting = t.gradient_checkpointing
    gc_options: list[bool | str] = [False, "unsloth"] if gc_setting == "auto" else [_gc_value(gc_setting)]
    rows_per_step = (2 if t.batch_size == "auto" else t.batch_size) * t.grad_accum
    if t.batch_size == "auto":
        micro_options = [m for m in range(rows_per_step, 0, -1) if rows_per_step % m == 0]
    else:
        micro_options = [t.batch_size]

    if shape is None:
        # Nothing to size against: the recipe's own settings, which ran on 16 GB cards.
        batch = 2 if t.batch_size == "auto" else t.batch_size
        gc: bool | str = "unsloth" if gc_setting == "auto" else _gc_value(gc_setting)
        accum = rows_per_step // batch if t.batch_size == "auto" else t.grad_accum
        unknown = f"the model's shape is unknown before its weights are pulled ({cfg.model.base})"
        reasons["batch_size"] = f"{batch} x {accum}: {unknown}, so the recipe's micro-batch is kept"
        reasons["gradient_checkpointing"] = f"{_gc_label(gc)}: model shape unknown, the recipe's setting"
        four_bit = four_bit_setting is not False
        reasons["load_in_4bit"] = f"{four_bit}: " + ("as configured" if four_bit_setting != "auto" else unknown)
        optim = "adamw_8bit" if t.optim == "auto" else t.optim
        reasons["optim"] = f"{optim}: " + ("as configured" if t.optim != "auto" else unknown)
        return TrainPlan(batch_size=batch, grad_accum=accum, packing=packing, gradient_checkpointing=gc,
                         load_in_4bit=four_bit, precision=precision, optim=optim, reasons=reasons)

    def peak(gc: bool | str, micro: int, four_bit: bool, optim: str) -> int:
        return estimate_peak_bytes(shape, tokens=micro * seq, load_in_4bit=four_bit, checkpointing=gc,
                                   lora_r=cfg.lora.r, target_modules=cfg.lora.target_modules, optim=optim)

    # The search order is the docstring's; itertools.product varies the last option fastest.
    candidates = [c for tier in four_bit_tiers
                  for c in itertools.product(gc_options, micro_options, tier, optim_options)]
    chosen = next((c for c in candidates if peak(*c) <= budget), None)
    fits = chosen is not None
    gc, micro, four_bit, optim = chosen or candidates[-1]
    need = peak(gc=gc, micro=micro, four_bit=four_bit, optim=optim)
    grad_accum = rows_per_step // micro if t.batch_size == "auto" else t.grad_accum
    worst = f"worst case {micro} x {seq} tokens needs ~{need / GIB:.1f} GiB of a {budget / GIB:.1f} GiB budget"
    if t.batch_size == "auto":
        reasons["batch_size"] = (f"{micro} rows x {grad_accum} accumulation = the recipe's {rows_per_step} "
                                 f"rows per optimizer step; {worst}")
    else:
        reasons["batch_size"] = f"{micro} x {grad_accum}: as configured; {worst}"
    if not fits:
        reasons["batch_size"] += " (does not fit: expect out-of-memory on the longest rows; lower " \
                                 "model.max_seq_length or use a larger GPU)"
    if gc_setting == "auto":
        why = ("it fits without" if gc is False else
               "no micro-batch fits without it; offloading keeps one layer's activations on the GPU")
        reasons["gradient_checkpointing"] = f"{_gc_label(gc)}: {why}"
    else:
        reasons["gradient_checkpointing"] = f"{_gc_label(gc)}: as configured"
    if prequantized:
        reasons["load_in_4bit"] = f"True: {cfg.model.base} is pre-quantized"
    elif four_bit and four_bit_setting is not True:
        sixteen = peak(gc=gc, micro=micro, four_bit=False, optim=optim)
        how = " (auto)" if four_bit_setting == "auto" else ", although model.load_in_4bit is false"
        reasons["load_in_4bit"] = (f"True{how}: 16-bit weights would need ~{sixteen / GIB:.1f} GiB here, over "
                                   "the budget")
    elif not four_bit:
        reasons["load_in_4bit"] = ("False (auto): 16-bit LoRA fits; it skips dequantizing and trains against the "
                                   "exact weights the adapter is merged into" if four_bit_setting == "auto"
                                   else "False: as configured")
    else:
        reasons["load_in_4bit"] = "True: as configured"
    if t.optim != "auto":
        reasons["optim"] = f"{optim}: as configured"
    elif optim == FUSED_ADAMW:
        reasons["optim"] = (f"{optim} (auto): float32 moments fit, and one fused kernel updates every LoRA "
                            "tensor instead of a Python loop over them")
    else:
        reasons["optim"] = f"{optim} (auto): float32 moments would not fit the budget"
    return TrainPlan(batch_size=micro, grad_accum=grad_accum, packing=packing, gradient_checkpointing=gc,
                     load_in_4bit=four_bit, precision=precision, optim=optim, reasons=reasons)


# --- environment and import -------------------------------------------------------------------------------

def prepare_environment() -> Path:
    """Set the offline, no-statistics and cache variables unsloth and its compilers read; returns the root.

    Must run before unsloth (or triton, inductor) is imported: they read these once, at import.
    """
    root = cache_root()
    dirs = {"HF_HOME": root / "hf", "TRITON_CACHE_DIR": root / "triton",
            "TORCHINDUCTOR_CACHE_DIR": root / "inductor",
            "UNSLOTH_COMPILE_LOCATION": root / "unsloth_compiled_cache",
            "XDG_CACHE_HOME": root / "xdg", "CUDA_CACHE_PATH": root / "nv"}
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    for name, path in dirs.items():
        os.environ.setdefault(name, str(path))
    for name in dirs:
        Path(os.environ[name]).mkdir(parents=True, exist_ok=True)
    return root


def import_unsloth() -> Any:
    """Import unsloth once, after :func:`prepare_environment`; warns when transformers came first."""
    if "unsloth" in sys.modules:
        return sys.modules["unsloth"]
    prepare_environment()
    early = [m for m in ("transformers", "trl", "peft") if m in sys.modules]
    if early:
        log.warning("unsloth.import_order", already_imported=early,
                    effect="unsloth patches them at import; some of its optimisations may not apply")
    import unsloth

    return unsloth


class UnslothBackend:
    """Unsloth's FastLanguageModel and patched SFTTrainer behind medft's backend interface."""

    name = "unsloth"

    def __init__(self) -> None:
        self._unsloth = import_unsloth()

    def plan(self, cfg: JobConfig) -> TrainPlan:
        gpu = gpu_facts()
        shape = model_shape(cfg)
        plan = plan_for(cfg, gpu, shape)
        log.info("unsloth.plan", gpu=gpu.name, usable_gib=round(gpu.usable_bytes / GIB, 2),
                 model_shape=shape.name if shape else None,
                 **{f"why_{k}": v for k, v in plan.reasons.items()})
        return plan

    def load(self, weights_dir: Path, cfg: JobConfig, plan: TrainPlan) -> tuple[Any, Any]:
        from unsloth import FastLanguageModel

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.precision]
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(weights_dir), max_seq_length=cfg.model.max_seq_length, dtype=dtype,
            load_in_4bit=plan.load_in_4bit, load_in_16bit=not plan.load_in_4bit, local_files_only=True,
            use_exact_model_name=True, trust_remote_code=cfg.model.trust_remote_code,
            use_gradient_checkpointing=plan.gradient_checkpointing, random_state=cfg.train.seed)
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), bias="none",
            use_gradient_checkpointing=plan.gradient_checkpointing, random_state=cfg.train.seed,
            temporary_location=str(cache_root() / "unsloth_tmp"))
        if plan.packing:
            # A padding-free micro-batch is several rows long, longer than max_seq_length by design; rows
            # themselves are capped by the data stage. Without the mark unsloth would cut the batch.
            from unsloth.utils.packing import mark_allow_overlength

            mark_allow_overlength(model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return model, tokenizer

    def trainer_class(self) -> type:
        from trl import SFTTrainer  # patched by the unsloth import in __init__

        return SFTTrainer

    def sft_args(self, cfg: JobConfig, plan: TrainPlan) -> dict[str, Any]:
        # gradient_checkpointing is passed explicitly: TRL's config defaults it to True, and unsloth keeps an
        # explicit False off. When on, the mode get_peft_model recorded ("unsloth": offloaded) is what runs.
        return {
            "bf16": plan.precision == "bf16",
            "fp16": plan.precision == "fp16",
            "optim": plan.optim,
            "gradient_checkpointing": bool(plan.gradient_checkpointing),
        }

    def for_inference(self, model: Any) -> Any:
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
        return model
