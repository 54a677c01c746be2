"""``medft train``: resolve, pull, train, evaluate, export, publish, register. The whole job on one screen."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import click

from job import data, distributed, evaluate, export, gguf_export, loss_curve, model, model_card, preflight, publish, train
from job.backends import select_backend, unsloth_available
from job.checkpoints import Checkpointer
from job.config import JobConfig, load_config
from job.evals.in_job import RUN_FOLDER as ANSWERS_FOLDER
from job.evals.in_job import load_job_benchmarks, score_job_benchmarks
from job.lifecycle import FencedStore, Preemption, disk_full_is_transient
from job.resolve import check_local_inputs, open_run, record_config
from job.tokenizer import guard_texts, save_tokenizer
from job.trackers import Trackers
from registry.logs import JsonOnly, get_logger
from registry.precheck import expected_aliases
from registry.records import Lineage, RunMetrics, RunRecord, dump

log = get_logger("medft.train")


class StageClock:
    """Wall time per stage, for the run's metrics; logs each stage's start and end. Tells ``ranks`` the stage
    under way (a failure on one rank names it; left set when the stage fails)."""

    def __init__(self, ranks: distributed.Ranks | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.ranks = ranks

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        log.info("stage.start", stage=stage)
        if self.ranks is not None:
            self.ranks.stage = stage
        start = time.perf_counter()
        yield
        self.seconds[stage] = round(time.perf_counter() - start, 3)
        if self.ranks is not None:
            self.ranks.stage = None
        log.info("stage.end", stage=stage, seconds=self.seconds[stage])


def _rounded(loss: float | None) -> str:
    """A loss for people: three decimals (the logs and metrics keep every digit)."""
    return "n/a" if loss is None else f"{loss:.3f}"


def _config_summary(cfg: JobConfig) -> dict[str, object]:
    """What a person checks first in a resolved config; the event keeps the whole config in JSON logs."""
    return {"base": cfg.model.base, "data": cfg.data.source, "max_steps": cfg.train.max_steps,
            "store": cfg.output.store, "model_name": cfg.output.model_name}


def run(config_path: str | None, overrides: tuple[str, ...], *, dry_run: bool = False) -> None:
    cfg = load_config(config_path, overrides)
    ranks = distributed.Ranks.from_env()  # under torchrun: rank 0 alone writes (job/distributed.py)
    distributed.check_config(cfg, ranks.world_size)  # rows per step that do not split over the ranks: exit 2
    log.info("config.resolved", **_config_summary(cfg),
             config=JsonOnly(cfg.to_dict(), "(all keys: --dry-run)"))
    run = open_run(cfg)
    data.check_source(cfg)  # local paths (relative to the current directory) fail here, in --dry-run too
    check_local_inputs(cfg)
    trackers = Trackers(cfg, run)  # train.report_to: refuses a tracker that is not installed (exit 2)
    model.check_weights_plan(cfg)
    gguf_export.check_plan(cfg)  # a k-quant without llama-quantize: exit 2 now, not after training
    if dry_run:
        if not unsloth_available():
            select_backend(cfg)  # refuses model.backend=unsloth here as the real run does (nothing imported)
        preflight.check(cfg)  # the same errors as the real run below
        click.echo(cfg.to_yaml() + "\n" + run.describe())
        return
    # The backend before the checks: unsloth patches transformers when imported, and the checks import it.
    backend = select_backend(cfg)
    targets_checked = preflight.check(cfg)
    stage, stop = StageClock(ranks), Preemption()
    # EarlyUploads: merged shards go up to S3 as the export writes them; leaving waits for (or drops) what is left.
    with stop, ranks.group(), ranks.lease(run) as lease, trackers, publish.EarlyUploads(run, lease) as early_uploads:
        run_store = FencedStore(run.run_store, lease)  # every write into the run: lease confirmed, create-only

        def boundary(where: str) -> None:
            ranks.agree_stop(stop, lease, where)  # under torchrun: a SIGTERM on any rank stops every rank here
            stop.check(where)
            lease.check(where)

        if run.published():
            if not ranks.writer:
                return  # rank 0 registers it
            version = publish.register(run, lease)
            click.echo(f"run {run.run_id} was already published at {run.uri}; registered as "
                       f"{version.name}:{version.version}. Nothing new to do.")
            return
        if ranks.writer:
            record_config(run, run_store)
            trackers.start(run_store)  # continues the tracker runs of an earlier life of this run
        with stage("pull"), ranks.writer_first():  # the other ranks find rank 0's downloads in the cache
            rows, identity, data_report = data.load_rows(cfg)  # bad data fails here, before any weights move
            model.check_base_tokenizer(cfg, rows)  # so does a tokenizer that loses text: its files alone are fetched
            benchmark_suite = load_job_benchmarks(cfg)  # so do the benchmarks' questions (eval.benchmarks)
            weights = model.pull_weights(cfg.model.base, cfg.model.revision)
            merge_weights = (model.pull_weights(cfg.model.merge_base, cfg.model.merge_revision)
                             if cfg.model.merge_base else weights)
            if not targets_checked:
                preflight.check_target_modules(cfg, weights.path / "config.json")
            if cfg.export.gguf:
                gguf_export.check_model(merge_weights.path)  # architecture and tokenizer llama.cpp can take
        boundary("after pulling")
        with stage("load"):
            plan = distributed.plan_for_ranks(backend.plan(cfg), cfg, ranks.world_size)
            log.info("backend.plan", backend=backend.name, **plan.__dict__)
            peft_model, tokenizer = backend.load(weights.path, cfg, plan)
            prepared = data.prepare(rows, tokenizer, cfg, report=data_report)
        answers_dir = run.work_dir / "benchmark-answers"  # published as benchmarks/ (job.evals.in_job)
        shutil.rmtree(answers_dir, ignore_errors=True)
        with stage("eval_before"):
            if ranks.writer:  # the other ranks only train
                # The inference path the evaluation after training takes: the two are comparable.
                inference_model = backend.for_inference(peft_model)
                before = evaluate.evaluate(inference_model, tokenizer, prepared.eval, cfg, "before")
                benchmarks_before = score_job_benchmarks(inference_model, tokenizer, cfg, benchmark_suite, "before",
                                                         answers_dir)
                backend.for_training(peft_model)
        with stage("train"):
            result = train.fit(cfg, backend, plan, peft_model, tokenizer, prepared, work_dir=run.work_dir / "trainer",
                               checkpointer=Checkpointer(run_store), preemption=stop, lease=lease,
                               report_to=trackers.report_to, ranks=ranks)
        ranks.leave()  # rank 0 goes on alone from here
        if not ranks.writer:
            log.info("run.rank_done", run_id=run.run_id, steps=result.steps)
            return
        with stage("eval_after"):
            inference_model = backend.for_inference(peft_model)
            after = evaluate.evaluate(inference_model, tokenizer, prepared.eval, cfg, "after")
            benchmarks_after = score_job_benchmarks(inference_model, tokenizer, cfg, benchmark_suite, "after",
                                                    answers_dir)
        trackers.check()  # one that went down while training is skipped now, and the record says so
        boundary("after training (the last checkpoint holds the trained adapter)")
        out = run.work_dir / "export"
        shutil.rmtree(out, ignore_errors=True)
        outputs = {"adapter": out / "adapter"}
        with stage("export"), disk_full_is_transient(out, "writing the adapter and merged weights"):
            peft_model.save_pretrained(outputs["adapter"])
            export.make_adapter_portable(outputs["adapter"], cfg.model.base, cfg.model.revision)  # names the base, not our cache
            # Written so that plain AutoTokenizer (transformers, vLLM) rebuilds the ids training used.
            probe = [text for _, text in guard_texts(prepared.used_rows[:2], cfg.data.template, tokenizer)]
            save_tokenizer(tokenizer, outputs["adapter"], probe)
            del peft_model
            if cfg.export.merge:
                outputs["merged"] = out / "merged"
                export.merge(merge_weights.path, outputs["adapter"], outputs["merged"], cfg,
                             on_written=partial(early_uploads.submit, "merged", outputs["merged"]))
                save_tokenizer(tokenizer, outputs["merged"], probe)  # over the base's copied tokenizer files
                merge_check = export.check_merge(merge_weights.path, outputs["adapter"], outputs["merged"],
                                                 tokenizer, list(cfg.eval.questions[:2]) or ["Hello"],
                                                 cfg.export.merge_tolerance, layers=cfg.export.merge_check_layers)
                if cfg.export.gguf:
                    outputs["gguf"] = out / "gguf"
                    gguf_export.export(cfg, outputs["merged"], outputs["gguf"], tokenizer)
        metrics = RunMetrics(
            train_loss=result.train_loss, eval_loss_before=before["eval_loss"],
            eval_loss_after=after["eval_loss"], steps=result.steps, tokens_per_s=result.tokens_per_s,
            trained_tokens=result.trained_tokens, peak_gpu_mem_gib=result.peak_gpu_mem_gib,
            peak_host_mem_gib=result.peak_host_mem_gib, resumed_from_step=result.resumed_from_step,
            merge_check=merge_check if cfg.export.merge else None, stage_seconds=stage.seconds,
            loss_history=result.loss_history, backend=backend.name, plan=plan.record(),
            trackers=trackers.records(),
            benchmarks_before=benchmarks_before, benchmarks_after=benchmarks_after,
        )
        lineage = Lineage(base_model=weights.lineage(), dataset=data.used_identity(identity, prepared).to_dict(),
                          merge_base=merge_weights.lineage() if cfg.model.merge_base else None)
        answers = {"before": before["answers"], "after": after["answers"]}
        # The card is written before registration: it says where the alias gate is expected to leave each alias.
        aliases = expected_aliases(cfg.registry_uri, cfg.output.model_name, cfg.output.aliases, metrics)
        with disk_full_is_transient(out, "writing the model card"):
            loss_curve.write(loss_curve.series(result.loss_history, before["eval_loss"], after["eval_loss"],
                                               result.steps), outputs.values())
            for artifact, local in outputs.items():
                (local / "README.md").write_text(model_card.model_card(
                    cfg, dump(lineage), dump(metrics), answers, loss_image=loss_curve.IMAGE,
                    loss_series=loss_curve.SERIES, artifact=artifact, aliases=aliases))
        boundary("before publishing")
        with stage("publish"):
            record = RunRecord(artifacts={k: k for k in outputs}, lineage=lineage, metrics=metrics,
                               data_report=prepared.report.to_dict(), answers=answers,
                               environment=publish.environment(), config=cfg.to_dict())
            answer_files = {ANSWERS_FOLDER: answers_dir} if answers_dir.is_dir() else {}  # files, not an artifact
            publish.publish(run, {**outputs, **answer_files}, record, lease, uploaded=early_uploads.uploaded())
            version = publish.register(run, lease)
        trackers.finish(record, version)
    log.info("run.done", run_id=run.run_id, uri=run.uri, version=version.version, stage_seconds=stage.seconds)
    click.echo(f"\nPublished run {run.run_id} to {run.uri}\n"
               f"eval loss {_rounded(before['eval_loss'])} -> {_rounded(after['eval_loss'])}\n"
               f"Registered {version.name}:{version.version}. Look it up with:\n"
               f"  medft registry show {version.name}:{version.version} --store {cfg.output.store}")
    for refusal in version.alias_refusals:  # a protected alias the gate kept where it was
        where = "unset" if refusal["stays_at"] is None else f"at version {refusal['stays_at']}"
        click.echo(f"@{refusal['alias']} stays {where}: {refusal['refusal']}")
