"""train.report_to: the config key, the tracker record, and what medft hands a tracker (no tracker runs here)."""

from __future__ import annotations

import pytest

from job.config import load_config
from job.trackers import flat_numbers
from registry.errors import ConfigError, DataError
from registry.records import RunRecord, TrackerRun, dump, parse_record


def test_report_to_is_off_by_default_and_takes_one_name_or_a_list():
    assert load_config().train.report_to == ()
    assert load_config(overrides=["train.report_to=[wandb,mlflow,tensorboard]"]).train.report_to == (
        "wandb", "mlflow", "tensorboard")
    assert load_config(overrides=["train.report_to=mlflow"]).train.report_to == ("mlflow",)
    assert load_config(env={"MEDFT_TRAIN__REPORT_TO": "tensorboard"}).train.report_to == ("tensorboard",)
    assert load_config(overrides=["train.report_to=none"]).train.report_to == ()


@pytest.mark.parametrize("value, says", [("[wandb,comet]", "train.report_to.1"), ("[mlflow,mlflow]", "twice"),
                                         ("5", "train.report_to")])
def test_an_unknown_or_repeated_tracker_is_exit_2_naming_the_key(value, says):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[f"train.report_to={value}"])
    assert e.value.exit_code == 2
    assert str(e.value).startswith("--set train.report_to: train.report_to") and says in str(e.value)


def test_tracker_runs_are_typed_in_the_metrics_and_round_trip():
    record = RunRecord.model_validate({"metrics": {"trackers": {
        "mlflow": {"status": "logged", "run_id": "abc123", "url": "http://mlflow/#/experiments/1/runs/abc123"},
        "wandb": {"status": "skipped", "reason": "CommError: timed out"}}}})
    assert record.metrics.trackers["mlflow"] == TrackerRun(status="logged", run_id="abc123",
                                                           url="http://mlflow/#/experiments/1/runs/abc123")
    assert dump(record)["metrics"]["trackers"]["wandb"] == {"status": "skipped", "reason": "CommError: timed out"}
    with pytest.raises(DataError, match="metrics.trackers.mlflow.run_id"):
        parse_record(RunRecord, {"metrics": {"trackers": {"mlflow": {"run_id": ["not", "text"]}}}}, "MANIFEST.json")


def test_flat_numbers_keeps_finite_numbers_only():
    got = flat_numbers("medft/m", {"a": 1, "b": {"c": 2.5, "d": "text", "e": True, "f": float("nan")}, "g": None})
    assert got == {"medft/m/a": 1.0, "medft/m/b/c": 2.5}
