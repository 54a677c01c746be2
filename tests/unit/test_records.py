"""The typed run record (registry.records): old records read back, bad ones are refused, a dump round-trips."""

from __future__ import annotations

import copy
import json
import math

import pytest

from job.backends import TrainPlan
from job.inference import Version
from registry.errors import DataError
from registry.records import RunRecord, dump, parse_record
from registry.runs import manifest_record, parse_manifest
from registry.versions import ModelVersion
from tests.conftest import SAMPLE_RECORD

WHERE = "s3://bucket/runs/run-1/MANIFEST.json"
PLAN = TrainPlan(batch_size=2, grad_accum=4, packing=False, gradient_checkpointing="unsloth", load_in_4bit=True,
                 precision="bf16", optim="adamw_8bit", reasons={"load_in_4bit": "over the budget"})


def _manifest(record: dict) -> bytes:
    """MANIFEST.json bytes as write_manifest lays them out, around ``record``."""
    doc = {"format": 1, "run_id": "run-1", "created_at": "2025-01-01T00:00:00.000Z",
           "files": {"merged/model.safetensors": {"size": 3, "sha256": "c" * 64}}, **record}
    return json.dumps(doc).encode()


def _pipeline_record() -> RunRecord:
    """A record shaped as job.pipeline builds it: every field set."""
    return RunRecord(
        artifacts={"adapter": "adapter", "merged": "merged"},
        lineage={"base_model": {"uri": "hf://org/tiny", "revision": "0" * 40, "sha256": {"m.safetensors": "a" * 64}},
                 "dataset": {"source": "hf://org/data", "revision": None, "subset": "en", "split": "train",
                             "rows": 9, "content_sha256": "b" * 64, "loaded_rows": 10, "loaded_sha256": "d" * 64}},
        metrics={"train_loss": 1.75, "eval_loss_before": 2.0, "eval_loss_after": 1.5, "steps": 3,
                 "tokens_per_s": 900, "trained_tokens": 1200, "peak_gpu_mem_gib": None, "peak_host_mem_gib": 1.25,
                 "resumed_from_step": None, "merge_check": None, "stage_seconds": {"pull": 0.5, "train": 3},
                 "loss_history": [{"step": 1, "loss": 2.5}], "backend": "unsloth", "plan": PLAN.record()},
        data_report={"source": "hf://org/data", "rows_read": 10}, answers={"before": [], "after": []},
        environment={"python": "3.11.9", "gpu": None}, config={"model": {"base": "hf://org/tiny"}},
    )


def test_a_record_written_before_the_typed_record_reads_back_unchanged() -> None:
    record = manifest_record(parse_manifest(_manifest(SAMPLE_RECORD), WHERE), WHERE)
    assert record.base_model_lineage.revision == "0" * 40
    assert record.base_model_lineage.sha256 == {"model.safetensors": "a" * 64}
    assert record.dataset_lineage.rows == 10 and record.metrics.eval_loss_after == 1.2
    assert record.metrics.plan is None and record.config["train"] == {"max_steps": 1}
    assert dump(record) == SAMPLE_RECORD  # nothing added: registration copies it on as it was


def test_records_from_before_lineage_and_from_newer_medft_versions_still_load() -> None:
    old = {"base_model": {"uri": "hf://org/old", "revision": "main"}, "dataset": {"rows": 3},
           "config": {"model": {"load_in_4bit": True}}}
    record = manifest_record(parse_manifest(_manifest(old), WHERE), WHERE)
    assert (record.base_model_lineage.uri, record.dataset_lineage.rows) == ("hf://org/old", 3)
    version = Version.from_record("run-1", {}, record)
    assert version.base_uri() == ("hf://org/old", "main") and version.trained_in_4bit  # the config's, no plan

    newer = copy.deepcopy(SAMPLE_RECORD)
    newer["metrics"]["plan"] = {"load_in_4bit": False, "attention": "flash"}
    newer["metrics"]["future_metric"] = [1, 2]
    newer["provenance"] = {"signed_by": "ci"}
    record = parse_record(RunRecord, newer, WHERE)
    assert dump(record) == newer and record.metrics.plan.model_extra == {"attention": "flash"}
    assert not Version.from_record("run-1", {}, record).trained_in_4bit  # the plan's choice over the config's


@pytest.mark.parametrize(("edit", "field", "what"), [
    (lambda r: r["metrics"].update(plan={"load_in_4bit": "maybe"}), "metrics.plan.load_in_4bit", "is invalid"),
    (lambda r: r["metrics"].update(plan=["bf16"]), "metrics.plan", "must be an object"),
    (lambda r: r["lineage"]["base_model"].update(revision=7), "lineage.base_model.revision", "is invalid"),
    (lambda r: r["lineage"]["base_model"].update(sha256=["a"]), "lineage.base_model.sha256", "must be an object"),
    (lambda r: r["metrics"].update(steps="many"), "metrics.steps", "is invalid"),
    (lambda r: r.update(config=[1]), "config", "must be an object"),
])
def test_a_stored_record_with_a_wrong_typed_field_is_data_error_naming_it(edit, field: str, what: str) -> None:
    record = copy.deepcopy(SAMPLE_RECORD)
    edit(record)
    with pytest.raises(DataError) as manifest_error:
        parse_manifest(_manifest(record), WHERE)
    assert manifest_error.value.exit_code == 3
    assert manifest_error.value.message.startswith(f"{WHERE}: field '{field}' {what}")
    assert manifest_error.value.message.endswith("; the run is corrupt")


def test_a_registry_record_with_a_wrong_typed_field_is_data_error_naming_it() -> None:
    registered = {"name": "med", "version": 1, "created_at": "t", "run_id": "run-1", "run_uri": "s3://b/runs/run-1",
                  "artifacts": {}, "base_model": {"uri": "hf://org/tiny"},
                  "metrics": {"eval_loss_after": 1.2, "plan": {"load_in_4bit": True}}}
    mv = ModelVersion.from_dict(registered, source="models/med/versions/1.json")
    assert mv.run_record().metrics.plan.load_in_4bit is True and mv.metrics == registered["metrics"]
    registered["metrics"]["plan"]["batch_size"] = "two"
    with pytest.raises(DataError, match=r"^models/med/versions/1\.json: field 'metrics\.plan\.batch_size' is "
                                        r"invalid.*; the registry record is corrupt$"):
        ModelVersion.from_dict(registered, source="models/med/versions/1.json")


def test_a_record_round_trips_through_its_json_form() -> None:
    record = _pipeline_record()
    written = json.loads(json.dumps(dump(record)))  # as publish writes MANIFEST.json and inference reads it
    back = parse_record(RunRecord, written, WHERE)
    assert back == record and dump(back) == dump(record) == written
    assert isinstance(written["metrics"]["tokens_per_s"], int)  # an int stays an int, as json.dumps wrote it
    diverged = record.model_copy(update={"metrics": record.metrics.model_copy(update={"eval_loss_after": math.nan})})
    assert "NaN" in json.dumps(dump(diverged))  # written as json.dumps writes a NaN loss, not dropped to null


def test_the_stored_plan_has_the_train_plans_keys_and_values() -> None:
    """metrics.plan holds exactly what the pipeline stored before the record was typed (the plan's fields)."""
    assert dump(PLAN.record()) == PLAN.__dict__
    assert list(dump(PLAN.record())) == list(PLAN.__dict__)
    version = Version.from_record("m:1", {}, parse_record(RunRecord, dump(_pipeline_record()), WHERE))
    assert version.plan == PLAN.record() and version.trained_in_4bit


def test_a_plan_stored_before_train_compile_reads_back_without_it() -> None:
    written = dump(_pipeline_record())
    del written["metrics"]["plan"]["compile"]
    back = parse_record(RunRecord, written, WHERE)
    assert back.metrics.plan.compile is None and dump(back) == written  # nothing added on the way back


# --- benchmark scores ---------------------------------------------------------------------------------------


def test_benchmark_scores_are_typed_and_records_without_them_still_read() -> None:
    score = {"benchmark": "medqa", "accuracy": 0.6, "interval": [0.53, 0.66], "correct": 120, "scored": 200,
             "no_answer_share": 0.05, "hit_limit_share": 0.01, "median_reasoning_tokens": 380.5,
             "content_sha256": "c" * 64, "a_later_field": 1}
    record = parse_record(RunRecord, {**SAMPLE_RECORD, "metrics": {**SAMPLE_RECORD["metrics"],
                                                                   "benchmarks_after": {"medqa": score}}}, "m")
    medqa = record.metrics.benchmarks_after["medqa"]
    assert (medqa.accuracy, medqa.interval, medqa.scored) == (0.6, [0.53, 0.66], 200)
    assert dump(record)["metrics"]["benchmarks_after"]["medqa"] == score  # unknown keys kept, nothing added
    old = parse_record(RunRecord, SAMPLE_RECORD, "m")
    assert old.metrics.benchmarks_after is None and "benchmarks_after" not in dump(old)["metrics"]
    bad = {**SAMPLE_RECORD, "metrics": {"benchmarks_after": {"medqa": {**score, "accuracy": "high"}}}}
    with pytest.raises(DataError, match=r"m: field 'metrics.benchmarks_after.medqa.accuracy' must be a number \(got 'high'\)"):
        parse_record(RunRecord, bad, "m")
