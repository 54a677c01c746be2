"""The train stage: LoRA fine-tuning through TRL's SFTTrainer, resumable and preemption-safe.

Checkpoints go to the store every ``train.checkpoint_every`` steps and at the last step. On SIGTERM the current
step finishes, a checkpoint is saved and uploaded, and :class:`Preempted` (exit 143) is raised. A restarted job
with the same run id resumes from the latest complete checkpoint with the same number of optimizer steps.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from job.backends import TrainingBackend, TrainPlan
from job.checkpoints import Checkpointer
from job.config import JobConfig
from job.data import PreparedData
from job.distributed import Ranks
from job.lifecycle import Lease, Preemption, disk_full_is_transient
from registry import progress
from registry.errors import DataError
from registry.logs import get_logger

log = get_logger(__name__)

KEEP_LOCAL = 2  # trainer checkpoints kept on local disk; the store keeps its own


@dataclass
class TrainResult:
    steps: int
    train_loss: float | None
    trained_tokens: int  # non-padding tokens fed to the model in this life of the run, on every rank
    tokens_per_s: float
    seconds_per_step: float
    peak_gpu_mem_gib: float | None
    peak_host_mem_gib: float
    wall_s: float
    resumed_from_step: int | None
    loss_history: list[dict[str, float]] = field(default_factory=list)


def to_trainer_rows(rows: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """Pre-tokenized rows with ``labels`` (-100 on the prompt) that TRL uses as they are."""
    return [{"input_ids": r["input_ids"],
             "labels": [t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])]}
            for r in rows]


class TrainCollator:
    """TRL's collator, counting the real (non-padding) tokens of each batch and leaving out the attention mask.

    TRL pads rows on the right. In a causal model a real token never attends to a later position, so on
    right-padded rows the mask only hides padding from padding, whose outputs the loss ignores (labels
    -100): the loss and gradients are the same without it. Without a mask, attention runs as plain causal
    attention (the flash kernel, which skips the masked-out half) rather than a kernel that reads a mask for
    every pair of positions. Padding-free batches carry no mask either way.
    """

    def __init__(self, pad_token_id: int, padding_free: bool) -> None:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.inner = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=padding_free)
        self.tokens = 0

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        self.tokens += sum(len(e["input_ids"]) for e in examples)
        batch = self.inner(examples)
        batch.pop("attention_mask", None)
        return batch


def _callbacks(preemption: Preemption, checkpointer: Checkpointer | None, lease: Lease | None = None,
               collator: TrainCollator | None = None, ranks: Ranks | None = None) -> list[Any]:
    from transformers import TrainerCallback

    ranks = ranks or Ranks()

    class _ProgressBar(TrainerCallback):
        """Step, loss, tokens/s and ETA as a bar (:mod:`registry.progress`: on a terminal only). A resumed run's
        bar starts at its checkpoint's step, and the rate and ETA count this process's steps alone."""

        def __init__(self) -> None:
            self.task: progress.Task | None = None
            self.step, self.tokens, self.start = 0, 0, 0.0
            self.fields: dict[str, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.step, self.start = state.global_step, time.perf_counter()
            self.tokens = collator.tokens if collator is not None else 0
            self.task = progress.current().task("train", total=state.max_steps, unit="step", done=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.task is None:
                return
            self.task.advance(state.global_step - self.step)
            self.step = state.global_step
            elapsed = time.perf_counter() - self.start
            if collator is not None and elapsed > 0:
                self.fields["tokens_per_s"] = (collator.tokens - self.tokens) / elapsed
            self.task.set_fields(**self.fields)

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if self.task is not None and logs and "loss" in logs:
                self.fields = {"loss": float(logs["loss"]), **{k: v for k, v in self.fields.items() if k != "loss"}}
                self.task.set_fields(**self.fields)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if self.task is not None:
                self.task.close()
                self.task = None

    class _Checkpointing(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            ranks.step = state.global_step + 1  # named by a crash on this rank (job.rank_watch)
            return control

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001
            ranks.step = None
            return control

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            # Every rank's SIGTERM flag and rank 0's lease, agreed by all ranks: a lost lease stops here without
            # saving anything (another job owns the run now); a SIGTERM anywhere saves, then stops everywhere.
            ranks.agree_stop(preemption, lease, f"at step {state.global_step}")
            if preemption.requested or state.global_step >= state.max_steps:
                control.should_save = True  # the last step is saved so a later crash never retrains
            if preemption.requested:
                if not control.should_training_stop:
                    log.warning("sigterm.received", step=state.global_step, action="saving a checkpoint, then stopping")
                control.should_training_stop = True
            return control

        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
            if checkpointer is not None:  # rank 0 uploads while the other ranks wait for it
                local = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                ranks.writer_does(lambda: checkpointer.upload(local, state.global_step),
                                  f"uploading the checkpoint of step {state.global_step}")
                ranks.checkpoint = state.global_step  # agreed: every rank knows it is in the store
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                log.info("train.progress", step=state.global_step, max_steps=state.max_steps,
                         loss=round(float(logs["loss"]), 4), lr=logs.get("learning_rate"))

    return [_Checkpointing(), _ProgressBar()]


def _already_finished(model: Any, resume_dir: Path, step: int) -> TrainResult | None:
    """The result of a run whose checkpoint holds its last step, with that adapter loaded into ``model``.

    None when steps remain. Resumed at its last step, the trainer would take one step more than max_steps.
    """
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(resume_dir / "trainer_state.json"))
    if state.max_steps <= 0 or state.global_step < state.max_steps:
        return None
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = set_peft_model_state_dict(model, load_file(resume_dir / "adapter_model.safetensors"))
    if loaded.unexpected_keys:
        raise DataError(f"{resume_dir}: the adapter does not fit the model (e.g. {loaded.unexpected_keys[0]}); "
                        "delete this checkpoint to start over")
    history = [{"step": e["step"], "loss": e["loss"]} for e in state.log_history if "loss" in e]
    log.info("train.already_done", step=state.global_step, action="loaded the last checkpoint's adapter")
    return TrainResult(
        steps=state.global_step,
        train_loss=sum(h["loss"] for h in history) / len(history) if history else None,
        trained_tokens=0, tokens_per_s=0.0, seconds_per_step=0.0,
        peak_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        peak_host_mem_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        wall_s=0.0, resumed_from_step=step, loss_history=history,
    )


def fit(cfg: JobConfig, backend: TrainingBackend, plan: TrainPlan, model: Any, tokenizer: Any,
        data: PreparedData, *, work_dir: Path, checkpointer: Checkpointer | None = None,
        preemption: Preemption | None = None, lease: Lease | None = None,
        report_to: list[str] | None = None, ranks: Ranks | None = None) -> TrainResult:
    """Train ``model`` (a PeftModel) in place on ``data.train``.

    ``ranks`` (under torchrun, :mod:`job.distributed`): every rank calls this with the same data and ``plan``
    (already per rank: :func:`job.distributed.plan_for_ranks`); each restores the checkpoint into a work dir
    of its own, rank 0 alone uploads checkpoints, and stops are agreed at every step boundary.

    ``report_to``: the trackers whose transformers integrations log the curves (their runs are already open,
    :class:`job.trackers.Trackers`).

    Resumes from ``checkpointer``'s latest complete checkpoint when there is one. Raises Preempted (exit 143)
    after saving a checkpoint when SIGTERM arrives, LeaseLost (exit 75) without saving at the first step
    boundary after ``lease`` was lost, ConfigError/DataError when a checkpoint cannot be resumed.
    """
    import datasets

    preemption = preemption or Preemption()
    ranks = ranks or Ranks()
    if ranks.rank:  # the trainer saves each rank's RNG state in its own output dir; rank 0's is the one uploaded
        work_dir = work_dir.with_name(f"{work_dir.name}-rank{ranks.rank}")
    work_dir.mkdir(parents=True, exist_ok=True)
    resume_dir, resumed_from = None, None
    if checkpointer is not None and (ref := checkpointer.latest()) is not None:
        resume_dir = checkpointer.restore(ref, work_dir)
        resumed_from = ranks.checkpoint = ref.step
        if (finished := _already_finished(model, resume_dir, ref.step)) is not None:
            log.info("train.start", steps=cfg.train.max_steps, resume_from_step=resumed_from, plan=plan.__dict__)
            return finished
    args = _sft_config(cfg, backend, plan, work_dir, report_to or [], distributed=ranks.distributed)
    collator = TrainCollator(tokenizer.pad_token_id, padding_free=plan.packing)
    trainer = backend.trainer_class()(
        model=model, args=args, processing_class=tokenizer, data_collator=collator,
        train_dataset=datasets.Dataset.from_list(to_trainer_rows(data.train)),
        callbacks=_callbacks(preemption, checkpointer, lease, collator, ranks))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw dicts to stdout; train.progress logs instead
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    log.info("train.start", steps=cfg.train.max_steps, resume_from_step=resumed_from, plan=plan.__dict__)
    start = time.perf_counter()
    with preemption, disk_full_is_transient(work_dir, "saving a checkpoint"):
        output = trainer.train(resume_from_checkpoint=str(resume_dir) if resume_dir else None)
    collator.tokens = ranks.total(collator.tokens)  # every rank's tokens: the job's throughput
    result = _result(trainer, output, collator, time.perf_counter() - start, resumed_from)
    log.info("train.done", steps=result.steps, loss=result.train_loss, tokens_per_s=round(result.tokens_per_s, 1))
    preemption.check(f"at step {result.steps} (checkpoint saved)")
    return result


def _sft_config(cfg: JobConfig, backend: TrainingBackend, plan: TrainPlan, work_dir: Path,
                report_to: list[str] | None = None, *, distributed: bool = False) -> Any:
    """TRL's ``SFTConfig`` for this run: the config's schedule, the plan's batch shape, the backend's extras.

    ``distributed`` (torchrun): ``plan`` is one rank's share; transformers wraps the model in DDP, and every LoRA
    weight takes part in every step, so DDP need not search for unused parameters (which also breaks
    activation checkpointing).
    """
    from trl import SFTConfig

    ddp = {"ddp_find_unused_parameters": False} if distributed else {}
    return SFTConfig(
        output_dir=str(work_dir),
        per_device_train_batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.grad_accum,
        max_steps=cfg.train.max_steps,
        num_train_epochs=cfg.train.epochs,
        learning_rate=cfg.train.learning_rate,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
        lr_scheduler_type=cfg.train.scheduler,
        seed=cfg.train.seed,
        data_seed=cfg.train.seed,
        logging_steps=cfg.train.logging_steps,
        # The filter tests every micro-batch's loss for NaN on the host, a GPU synchronization each time; a NaN
        # loss is better logged as NaN than replaced by an average.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=cfg.train.checkpoint_every,
        save_total_limit=KEEP_LOCAL,
        report_to=report_to or "none",
        disable_tqdm=True,
        max_length=cfg.model.max_seq_length,
        packing=False,  # TRL's packing bin-packs rows up to max_length, which would change what batch_size means
        padding_free=plan.packing,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **ddp,
        **backend.sft_args(cfg, plan),
    )


def _result(trainer: Any, output: Any, collator: TrainCollator, wall: float, resumed_from: int | None
            ) -> TrainResult:
    """What a finished ``trainer.train`` call did: steps, loss, throughput over ``wall`` seconds, peak memory."""
    steps_here = max(trainer.state.global_step - (resumed_from or 0), 1)
    return TrainResult(
        steps=trainer.state.global_step,
        train_loss=float(output.training_loss) if output.training_loss is not None else None,
        trained_tokens=collator.tokens,
        tokens_per_s=collator.tokens / wall if wall > 0 else 0.0,
        seconds_per_step=wall / steps_here,
        peak_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        peak_host_mem_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        wall_s=wall,
        resumed_from_step=resumed_from,
        loss_history=[{"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e],
    )

