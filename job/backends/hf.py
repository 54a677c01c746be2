"""The ``hf`` backend: transformers + peft (+ bitsandbytes 4-bit on CUDA). Runs anywhere, CPU included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from job.backends import TrainPlan
from job.config import JobConfig
from registry.logs import get_logger

log = get_logger(__name__)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _precision() -> tuple[str, str]:
    if not torch.cuda.is_available():
        return "fp32", "no CUDA: CPU training runs in float32"
    if torch.cuda.is_bf16_supported():
        return "bf16", "GPU supports bfloat16"
    return "fp16", "GPU lacks bfloat16; mixed precision in float16"


def portable_sft_trainer() -> type:
    """TRL's SFTTrainer, with the plain transformers loss where TRL's fused LM head cannot run.

    TRL computes the loss through a Triton kernel, which needs CUDA; CPU builds of torch ship no Triton at
    all. Without them the loss is the model's own cross-entropy on the same labels, so the CPU path trains
    the same objective (minus TRL's entropy/accuracy metrics).
    """
    import importlib.util

    from transformers import Trainer
    from trl import SFTTrainer

    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        return SFTTrainer

    class PortableSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PortableSFTTrainer


class HFBackend:
    name = "hf"

    def plan(self, cfg: JobConfig) -> TrainPlan:
        cuda = torch.cuda.is_available()
        precision, why_precision = _precision()
        reasons = {"precision": why_precision}
        batch_size = 2 if cfg.train.batch_size == "auto" else cfg.train.batch_size
        if cfg.train.batch_size == "auto":
            reasons["batch_size"] = "auto resolves to the reference micro-batch of 2 on the hf backend"
        wants_4bit = cfg.model.load_in_4bit is not False  # auto is QLoRA here: no memory model to size 16-bit
        load_in_4bit = wants_4bit and cuda
        if wants_4bit and not cuda:
            reasons["load_in_4bit"] = "bitsandbytes 4-bit needs CUDA: training the 16-bit weights instead"
        optim = cfg.train.optim
        if optim == "auto":
            optim = "adamw_torch_fused" if cuda else "adamw_torch"
            reasons["optim"] = f"auto -> {optim}"
        elif "8bit" in optim and not cuda:
            optim = "adamw_torch"
            reasons["optim"] = f"{cfg.train.optim} needs bitsandbytes on CUDA: using adamw_torch"
        checkpointing: bool | str = cfg.train.gradient_checkpointing in ("on", "unsloth") or (
            cfg.train.gradient_checkpointing == "auto" and cuda)
        reasons["gradient_checkpointing"] = (
            f"{cfg.train.gradient_checkpointing} -> {'on' if checkpointing else 'off'} "
            "(on by default on GPU to save memory, off on CPU where memory is not the limit)")
        packing = cfg.train.packing is True
        reasons["packing"] = "packing only when train.packing is true on the hf backend (SDPA without varlen)"
        if cfg.train.compile is True:
            reasons["compile"] = "train.compile is unsloth's block compile: the hf backend runs eager"
        return TrainPlan(batch_size=batch_size, grad_accum=cfg.train.grad_accum, packing=packing,
                         gradient_checkpointing=checkpointing, load_in_4bit=load_in_4bit,
                         precision=precision, optim=optim, reasons=reasons)

    def load(self, weights_dir: Path, cfg: JobConfig, plan: TrainPlan) -> tuple[Any, Any]:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        from job.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(weights_dir, trust_remote_code=cfg.model.trust_remote_code)
        dtype = _DTYPES[plan.precision]
        # safetensors only: the pull stage refused pickles, and this keeps any loader from preferring one.
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.model.trust_remote_code,
                                  "attn_implementation": "sdpa", "use_safetensors": True}
        if plan.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype)
            kwargs["device_map"] = {"": 0}
        model = AutoModelForCausalLM.from_pretrained(weights_dir, **kwargs)
        if plan.load_in_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=bool(plan.gradient_checkpointing))
        elif torch.cuda.is_available():
            model = model.to("cuda")
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if plan.gradient_checkpointing:
            model.enable_input_require_grads()
        return model, tokenizer

    def trainer_class(self) -> type:
        return portable_sft_trainer()

    def sft_args(self, cfg: JobConfig, plan: TrainPlan) -> dict[str, Any]:
        return {
            "bf16": plan.precision == "bf16",
            "fp16": plan.precision == "fp16",
            "use_cpu": not torch.cuda.is_available(),
            "optim": plan.optim,
            "gradient_checkpointing": bool(plan.gradient_checkpointing),
            "gradient_checkpointing_kwargs": {"use_reentrant": False} if plan.gradient_checkpointing else None,
        }

    def for_inference(self, model: Any) -> Any:
        model.eval()
        return model

    def for_training(self, model: Any) -> Any:
        model.train()  # checkpointing stays as load set it: eval() does not touch it
        return model

    def load_for_inference(self, weights_dir: Path, *, max_seq_length: int, load_in_4bit: bool = False,
                           trust_remote_code: bool = False) -> Any:
        # Unquantized weights whatever load_in_4bit says (float32 on CPU, bf16 or fp16 on CUDA): an adapter
        # trained against 4-bit ones applies to them too.
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=_DTYPES[_precision()[0]], use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
        if torch.cuda.is_available():
            model = model.to("cuda")
        return model.eval()
