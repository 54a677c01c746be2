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
* ``UNSLOTH_BLOCK_COMPILE`` is the exception: :meth:`UnslothBackend.load` sets it from the plan
  (``train.compile``) whatever it was.
* ``UNSLOTH_DECODE_CUDA_GRAPHS=1``, set by :meth:`UnslothBackend.load` (the training job) where unset: the
  evaluate stage's answers replay each one-token decode step as CUDA graphs, which unsloth computes bit for bit
  as its eager step (Llama and Qwen3 layers; others decode eagerly). The 8B job's two answers of 256 tokens
  took 5.5 and 6.3 s with it, 12.4 and 11.4 s without (docs/benchmarks.md, run 11). ``0`` turns it off.
* ``HF_HUB_OFFLINE`` is honoured as set; weights always load from the local directory the pull stage made
  (``local_files_only``), so nothing is downloaded here either way.

Planning (:meth:`UnslothBackend.plan`) sizes the run to the GPU it finds: :mod:`job.backends.memory_plan`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from job.backends import TrainPlan
from job.backends.memory_plan import GIB, gpu_facts, model_shape, plan_for
from job.config import JobConfig
from job.paths import cache_root
from registry.logs import get_logger

log = get_logger(__name__)


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
        # Unsloth's documented switch, read when it patches the model and again at every decoder-block call.
        os.environ["UNSLOTH_BLOCK_COMPILE"] = "1" if plan.compile else "0"
        # Read by unsloth's generate at every call; the graphs and their buffers go in for_training.
        os.environ.setdefault("UNSLOTH_DECODE_CUDA_GRAPHS", "1")
        model, unsloth_tokenizer = FastLanguageModel.from_pretrained(
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
        return model, self._same_tokenizer_as_hf(weights_dir, cfg, unsloth_tokenizer)

    @staticmethod
    def _same_tokenizer_as_hf(weights_dir: Path, cfg: JobConfig, unsloth_tokenizer: Any) -> Any:
        """medft's own tokenizer in place of the one unsloth built, so both backends train on the same ids.

        Unsloth resolves the class through transformers like anyone else; medft's loader reads tokenizer.json
        as written (:mod:`job.tokenizer`). Unsloth's padding side is kept; a difference in ids is logged.
        """
        from job.tokenizer import guard_texts, load_tokenizer

        tokenizer = load_tokenizer(weights_dir, trust_remote_code=cfg.model.trust_remote_code)
        tokenizer.padding_side = getattr(unsloth_tokenizer, "padding_side", tokenizer.padding_side)
        try:
            probe = guard_texts([], cfg.data.template, tokenizer)[0][1]
            theirs = list(unsloth_tokenizer(probe, add_special_tokens=False)["input_ids"])
        except Exception as e:  # noqa: BLE001 - only a comparison for the log; ours is used either way
            theirs, probe = [f"{e.__class__.__name__}: {e}"], ""
        if not probe or theirs != list(tokenizer(probe, add_special_tokens=False)["input_ids"]):
            log.warning("unsloth.tokenizer_replaced", loaded_as=type(tokenizer).__name__,
                        unsloth_class=type(unsloth_tokenizer).__name__,
                        reason="unsloth's tokenizer gives other ids than tokenizer.json defines; using medft's")
        return tokenizer

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
        return model.eval()

    def for_training(self, model: Any) -> Any:
        from unsloth import FastLanguageModel
        from unsloth.models import _decode_graphs

        # Unsloth frees the decode graphs and KV buffers only when its own generate restores training mode;
        # generate ran in inference mode here, so free them before training budgets the memory.
        _decode_graphs.release_for_training(model)
        # No use_gradient_checkpointing: unsloth then keeps the mode get_peft_model recorded (the plan's).
        FastLanguageModel.for_training(model)
        return model

    def load_for_inference(self, weights_dir: Path, *, max_seq_length: int, load_in_4bit: bool = False,
                           trust_remote_code: bool = False) -> Any:
        from unsloth import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(  # dtype=None: unsloth picks bf16 or fp16 for the GPU
            model_name=str(weights_dir), max_seq_length=max_seq_length, dtype=None, load_in_4bit=load_in_4bit,
            local_files_only=True, use_exact_model_name=True, trust_remote_code=trust_remote_code)
        return model
