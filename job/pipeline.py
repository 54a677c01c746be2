"""``medft train``: resolve, pull, train, evaluate, export, publish, register. The whole job on one screen."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click

from job import data, evaluate, export, model, publish, train
from job.backends import select_backend
from job.checkpoints import Checkpointer
from job.config import load_config
from job.lifecycle import Lease, Preemption, disk_full_is_transient
from job.resolve import open_run, record_config
from registry.logs import get_logger
from registry.records import Lineage, RunMetrics, RunRecord, dump

log = get_logger("medft.train")


class StageClock:
    """Wall time per stage, for the run's metrics; logs each stage's start and end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        log.info("stage.start", stage=stage)
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 3)
        log.info("stage.end", stage=stage, seconds=self.seconds[stage])


def run(config_path: str | None, overrides: tuple[str, ...], *, dry_run: bool = False) -> None:
    cfg = load_config(config_path, overrides)
    log.info("config.resolved", config=cfg.to_dict())
    run = open_run(cfg)
    model.check_weights_plan(cfg)
    if dry_run:
        click.echo(cfg.to_yaml() + "\n" + run.plan())
        return
    stage, stop = StageClock(), Preemption()
    with stop, Lease(run):
        if run.published():
            version = publish.register(run)
            click.echo(f"run {run.run_id} was already published at {run.uri}; registered as "
                       f"{version.name}:{version.version}. Nothing new to do.")
            return
        record_config(run)
        with stage("pull"):
            rows, identity, data_report = data.load_rows(cfg)  # bad data fails here, before any weights move
            weights = model.pull_weights(cfg.model.base, cfg.model.revision)
            merge_weights = model.pull_weights(cfg.model.merge_base, None) if cfg.model.merge_base else weights
        stop.check("after pulling")
        with stage("load"):
            backend = select_backend(cfg)
            plan = backend.plan(cfg)
            log.info("backend.plan", backend=backend.name, **plan.__dict__)
            peft_model, tokenizer = backend.load(weights.path, cfg, plan)
            prepared = data.prepare(rows, tokenizer, cfg, report=data_report)
        with stage("eval_before"):
            before = evaluate.evaluate(peft_model, tokenizer, prepared.eval, cfg, "before")
        with stage("train"):
            result = train.fit(cfg, backend, plan, peft_model, tokenizer, prepared, work_dir=run.work_dir / "trainer",
                               checkpointer=Checkpointer(run.run_store), preemption=stop)
        with stage("eval_after"):
            after = evaluate.evaluate(backend.for_inference(peft_model), tokenizer, prepared.eval, cfg, "after")
        stop.check("after training (the last checkpoint holds the trained adapter)")
        out = run.work_dir / "export"
        shutil.rmtree(out, ignore_errors=True)
        outputs = {"adapter": out / "adapter"}
        with stage("export"), disk_full_is_transient(out, "writing the adapter and merged weights"):
            peft_model.save_pretrained(outputs["adapter"])
            tokenizer.save_pretrained(outputs["adapter"])
            del peft_model
            if cfg.export.merge:
                outputs["merged"] = out / "merged"
                export.merge(merge_weights.path, outputs["adapter"], outputs["merged"], cfg)
                merge_check = export.check_merge(merge_weights.path, outputs["adapter"], outputs["merged"],
                                                 tokenizer, list(cfg.eval.questions[:2]) or ["Hello"],
                                                 cfg.export.merge_tolerance)
        metrics = RunMetrics(
            train_loss=result.train_loss, eval_loss_before=before["eval_loss"],
            eval_loss_after=after["eval_loss"], steps=result.steps, tokens_per_s=result.tokens_per_s,
            trained_tokens=result.trained_tokens, peak_gpu_mem_gib=result.peak_gpu_mem_gib,
            peak_host_mem_gib=result.peak_host_mem_gib, resumed_from_step=result.resumed_from_step,
            merge_check=merge_check if cfg.export.merge else None, stage_seconds=stage.seconds,
            loss_history=result.loss_history, backend=backend.name, plan=plan.record(),
        )
        lineage = Lineage(base_model=weights.lineage(), dataset=data.used_identity(identity, prepared).to_dict())
        answers = {"before": before["answers"], "after": after["answers"]}
        card = export.model_card(cfg, dump(lineage), dump(metrics), answers)
        with disk_full_is_transient(out, "writing the model card"):
            for local in outputs.values():
                (local / "README.md").write_text(card)
        stop.check("before publishing")
        with stage("publish"):
            record = RunRecord(artifacts={k: k for k in outputs}, lineage=lineage, metrics=metrics,
                               data_report=prepared.report.to_dict(), answers=answers,
                               environment=publish.environment(), config=cfg.to_dict())
            publish.publish(run, outputs, record)
            version = publish.register(run)
    log.info("run.done", run_id=run.run_id, uri=run.uri, version=version.version, stage_seconds=stage.seconds)
    click.echo(f"\nPublished run {run.run_id} to {run.uri}\n"
               f"eval loss {before['eval_loss']} -> {after['eval_loss']}\n"
               f"Registered {version.name}:{version.version}. Look it up with:\n"
               f"  medft registry show {version.name}:{version.version} --store {cfg.output.store}")
