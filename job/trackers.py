"""Experiment trackers (``train.report_to``: wandb, mlflow, tensorboard): one tracker run per training run.

transformers' own integrations log the training curves (``report_to`` goes into the SFTConfig); medft opens
each tracker's run first, so those integrations attach to it, and adds what only medft knows to the same run:
the resolved config (secrets redacted), the data report, eval loss and benchmark scores before and after, the
merge check, the plan, stage times, and the registry version and run URI, which link the tracker run back to
the registry (the registry version records the tracker run's id and URL in turn: ``metrics.trackers``).

Settings come from each tool's own environment variables (``WANDB_PROJECT``, ``WANDB_MODE``, ``WANDB_API_KEY``,
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``, ``MLFLOW_TRACKING_PASSWORD``...), never from the job config,
so no secret reaches the stored config; TensorBoard writes under the run's work dir and its files are uploaded
to ``runs/<run_id>/tensorboard/``.

A tracker must never fail or slow the training run: network calls are bounded (``WANDB_INIT_TIMEOUT``, default
30 s; ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 1, ``..._BACKOFF_FACTOR`` 1, ``..._TIMEOUT`` 10 s unless set), and a
tracker that fails is warned about once (``tracker.skipped``), left alone for the rest of the run, and recorded
as skipped. The tracker run ids are kept in ``runs/<run_id>/trackers.json`` (written through the fenced run
store), so a job resumed after preemption continues the same tracker runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Protocol

from job.config import JobConfig
from job.lifecycle import Run
from registry.errors import DataError, MedftError, Preempted
from registry.logs import get_logger, route_stdlib_logger
from registry.records import RunRecord, TrackerRun, dotted, dump
from registry.redact import redact, redact_text, redact_url
from registry.store import Store
from registry.versions import ModelVersion

log = get_logger(__name__)

TRACKERS = ("wandb", "mlflow", "tensorboard")
IDS_FILE = "trackers.json"
_PACKAGE = {"wandb": "wandb", "mlflow": "mlflow", "tensorboard": "tensorboard"}
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,255}")
#: Bounds on network calls, used unless the tool's own variable is set.
_BOUNDS = {"WANDB_INIT_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class Tracker(Protocol):
    """One tracker's run. Any method may raise; :class:`Trackers` turns that into one warning and a skip."""

    name: str

    def start(self, resume_id: str | None) -> TrackerRun:
        """Open (or, with ``resume_id``, continue) the run so transformers' integration attaches to it."""

    def log_config(self, config: dict[str, Any]) -> None:
        """The resolved, redacted job config."""

    def log_results(self, numbers: dict[str, float], documents: dict[str, Any], tags: dict[str, str]) -> None:
        """medft's results: flat numbers, JSON documents (data report, plan...) and link tags."""

    def check(self) -> None:
        """Send what training logged and raise if the tracker cannot be reached now (called after training)."""

    def close(self, status: str) -> None:
        """End the run: ``finished``, ``preempted`` (to be resumed) or ``failed``."""


def flat_numbers(prefix: str, value: Any) -> dict[str, float]:
    """Every finite number under ``value``, keyed ``prefix/a/b``; booleans and text are left out."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out.update(flat_numbers(f"{prefix}/{k}", v))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix: float(value)}
    return {}


def _without_userinfo(uri: str | None) -> str | None:
    """``uri`` without its credentials (userinfo, secret query parameters), for logs and records."""
    return redact_url(uri) if uri else uri


class WandbTracker:
    name = "wandb"

    def __init__(self) -> None:
        import wandb

        self.wandb = wandb
        self.run: Any = None

    def start(self, resume_id: str | None) -> TrackerRun:
        # The id and resume mode WandbCallback's wandb.init would take from WANDB_RUN_ID / WANDB_RESUME.
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "medft"),
                                   id=resume_id or os.environ.get("WANDB_RUN_ID"), resume="allow")
        return TrackerRun(status="logged", run_id=self.run.id, url=self.run.url)

    def log_config(self, config: dict[str, Any]) -> None:
        self.run.config.update({"medft": config}, allow_val_change=True)

    def check(self) -> None:
        pass  # W&B's own service process buffers and retries the run's data; nothing to ask it here

    def log_results(self, numbers: dict[str, float], documents: dict[str, Any], tags: dict[str, str]) -> None:
        self.run.summary.update({**numbers, **{f"medft/{k}": v for k, v in documents.items()}, **tags})

    def close(self, status: str) -> None:
        self.run.finish(exit_code={"finished": 0, "preempted": 143}.get(status, 1))


class MlflowTracker:
    name = "mlflow"

    def __init__(self) -> None:
        import mlflow

        route_stdlib_logger("mlflow")  # its own stderr handler would put plain text between the JSON lines
        self.mlflow = mlflow
        self.run_id: str | None = None

    def start(self, resume_id: str | None) -> TrackerRun:
        mlflow = self.mlflow
        if uri := os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(uri)
        if resume_id is None and (name := os.environ.get("MLFLOW_EXPERIMENT_NAME")):
            mlflow.set_experiment(name)
        # With run_id set, start_run reopens that run; MLflowCallback then logs into the active run (it starts
        # its own only when none is active), and leaves ending it to us.
        run = mlflow.start_run(run_id=resume_id)
        self.run_id = run.info.run_id
        uri = _without_userinfo(mlflow.get_tracking_uri())
        url = (f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{self.run_id}"
               if uri and uri.startswith("http") else uri)
        return TrackerRun(status="logged", run_id=self.run_id, url=url)

    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = [Param(f"medft.{k}", (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM_VAL_LENGTH])
                  for k, v in dotted(config).items()]
        client = self.mlflow.MlflowClient()
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        client.log_text(self.run_id, json.dumps(config, indent=2), "medft/config.json")

    def log_results(self, numbers: dict[str, float], documents: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Metric, RunTag

        client = self.mlflow.MlflowClient()
        metrics = [Metric(re.sub(r"[^0-9A-Za-z_\-. :/]", "_", k), v, 0, 0) for k, v in numbers.items()]
        for i in range(0, len(metrics), 500):
            client.log_batch(self.run_id, metrics=metrics[i:i + 500])
        client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for name, doc in documents.items():
            client.log_text(self.run_id, json.dumps(doc, indent=2), f"medft/{name}.json")

    def check(self) -> None:
        # transformers' MLflowCallback logs asynchronously: a server that went away during training shows only
        # in mlflow's own log. Flush the queue, then ask the server for the run (bounded retries, _BOUNDS).
        self.mlflow.flush_async_logging()
        self.mlflow.MlflowClient().get_run(self.run_id)

    def close(self, status: str) -> None:
        self.mlflow.end_run({"finished": "FINISHED", "preempted": "KILLED"}.get(status, "FAILED"))


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, store_url: str) -> None:
        self.log_dir = log_dir
        self.store_url = store_url
        self.writer: Any = None

    def start(self, resume_id: str | None) -> TrackerRun:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.log_dir)  # TensorBoardCallback's curves, same dir
        self.writer = SummaryWriter(log_dir=str(self.log_dir), filename_suffix=".medft")
        return TrackerRun(status="logged", run_id="tensorboard", url=self.store_url)

    def log_config(self, config: dict[str, Any]) -> None:
        self.writer.add_text("medft/config", _markdown_json(config), 0)
        self.writer.flush()

    def check(self) -> None:
        self.writer.flush()  # a full or vanished log dir shows here

    def log_results(self, numbers: dict[str, float], documents: dict[str, Any], tags: dict[str, str]) -> None:
        for k, v in numbers.items():
            self.writer.add_scalar(k, v, 0)
        for name, doc in {**documents, "links": tags}.items():
            self.writer.add_text(f"medft/{name}", _markdown_json(doc), 0)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def _markdown_json(doc: Any) -> str:
    # TensorBoard renders text as markdown: indented four spaces, JSON stays a readable code block.
    return "\n".join("    " + line for line in json.dumps(doc, indent=2).splitlines())


def check_installed(cfg: JobConfig) -> None:
    """ConfigError (exit 2) naming ``train.report_to`` when a chosen tracker's package is not installed."""
    for name in cfg.train.report_to:
        if find_spec(_PACKAGE[name]) is None:
            raise cfg.error("train.report_to", f"{name} is not installed; install medft[tracking] "
                            "(pip install 'medft[tracking]') or remove it from the list")


class Trackers:
    """The run's trackers, as one object the pipeline calls at a few points.

    Created after ``open_run`` (it checks the packages: ConfigError), entered as a context manager around the
    job (on the way out it ends every tracker run as finished, preempted or failed), started once the run's
    store is fenced (:meth:`start`), handed to training (:attr:`report_to`), and given the record and the
    registry version at the end (:meth:`finish`). No method raises for a tracker's own failure.
    """

    def __init__(self, cfg: JobConfig, run: Run) -> None:
        check_installed(cfg)
        self.cfg = cfg
        self.run = run
        self.names = tuple(cfg.train.report_to)
        self.live: dict[str, Tracker] = {}
        self.runs: dict[str, TrackerRun] = {}
        self.store: Store | None = None
        self.tensorboard_dir = run.work_dir / "tensorboard"

    @property
    def report_to(self) -> list[str]:
        """The integrations transformers should log the training curves to: the trackers that started."""
        return [name for name in self.names if name in self.live]

    def records(self) -> dict[str, TrackerRun] | None:
        """Each chosen tracker's run (id, URL) or why it was skipped, for ``RunMetrics.trackers``."""
        return dict(self.runs) if self.names else None

    def start(self, store: Store) -> None:
        """Open each tracker's run, continuing the ones in ``trackers.json``, and record their ids there.

        ``store`` is the run's fenced store. Raises DataError (exit 3) when trackers.json is not what medft
        writes; a tracker that fails to start is skipped with one warning.
        """
        if not self.names:
            return
        self.store = store
        for name, value in _BOUNDS.items():
            os.environ.setdefault(name, value)
        previous = self._read_ids(store)
        self._restore_tensorboard(store)
        for name in self.names:
            tracker = self._make(name)
            resume_id = previous.get(name)
            clock = time.perf_counter()
            try:
                started = tracker.start(resume_id)
                tracker.log_config(redact(self.cfg.to_dict()))
            except Exception as e:  # noqa: BLE001 - a tracker that is down must not stop training
                self._skip(name, e, seconds=time.perf_counter() - clock)
                self._close(tracker, "failed")
                continue
            self.live[name] = tracker
            self.runs[name] = started
            log.info("tracker.started", tracker=name, run_id=started.run_id, url=_without_userinfo(started.url),
                     resumed=resume_id is not None and resume_id == started.run_id,
                     seconds=round(time.perf_counter() - clock, 3))
        ids = {name: r.run_id for name, r in self.runs.items() if r.run_id}
        if ids and ids != previous:
            store.put_bytes(IDS_FILE, json.dumps(ids, indent=2, sort_keys=True).encode())

    def check(self) -> None:
        """After training: a tracker that went down meanwhile is skipped now (one warning), so the record the
        run publishes says so. Never raises."""
        for name, tracker in list(self.live.items()):
            clock = time.perf_counter()
            try:
                tracker.check()
            except Exception as e:  # noqa: BLE001 - a tracker that is down must not stop the run
                self._skip(name, e, seconds=time.perf_counter() - clock)
                self._close(tracker, "failed")

    def finish(self, record: RunRecord, version: ModelVersion) -> None:
        """Log medft's results and the registry links into every live tracker run, then end them as finished."""
        if not self.live:
            return
        metrics = dump(record.metrics)
        numbers: dict[str, float] = {}
        for key in ("eval_loss_before", "eval_loss_after", "train_loss", "steps", "tokens_per_s", "trained_tokens",
                    "peak_gpu_mem_gib", "peak_host_mem_gib", "resumed_from_step", "stage_seconds", "merge_check",
                    "benchmarks_before", "benchmarks_after"):
            numbers.update(flat_numbers(f"medft/{key}", metrics.get(key)))
        numbers.update(flat_numbers("medft/data_report", record.data_report or {}))
        documents = {key: metrics[key] for key in ("plan", "merge_check", "stage_seconds", "benchmarks_before",
                                                   "benchmarks_after") if metrics.get(key) is not None}
        documents["data_report"] = record.data_report or {}
        tags = {"medft.run_id": self.run.run_id, "medft.run_uri": self.run.uri,
                "medft.registry": _without_userinfo(self.cfg.registry_uri) or "",
                "medft.registry_version": f"{version.name}:{version.version}"}
        for name, tracker in list(self.live.items()):
            try:
                tracker.log_results(numbers, documents, tags)
            except Exception as e:  # noqa: BLE001
                self._skip(name, e)
        self.close("finished")

    def close(self, status: str) -> None:
        """End every live tracker run with ``status`` and upload the TensorBoard files; never raises."""
        for name, tracker in list(self.live.items()):
            self._close(tracker, status)
            del self.live[name]
        if self.store is not None and "tensorboard" in self.runs and self.tensorboard_dir.is_dir():
            try:
                self.store.put_dir("tensorboard", self.tensorboard_dir)
            except Exception as e:  # noqa: BLE001 - the curves are a convenience; the run's outcome stands
                log.warning("tracker.upload_failed", tracker="tensorboard", error=redact_text(str(e))[:300])

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.live:
            self.close("preempted" if isinstance(exc, Preempted) else "failed" if exc_type else "finished")

    def _make(self, name: str) -> Tracker:
        if name == "wandb":
            return WandbTracker()
        if name == "mlflow":
            return MlflowTracker()
        return TensorBoardTracker(self.tensorboard_dir, self.run.run_store.url("tensorboard"))

    def _skip(self, name: str, error: BaseException, seconds: float | None = None) -> None:
        """Warn once, stop calling the tracker, record it as skipped."""
        self.live.pop(name, None)
        # Redacted before it is cut short: a cut inside "user:password@" would hide the "@" that marks it.
        text = redact(str(error))
        reason = f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"
        known = self.runs.get(name)
        self.runs[name] = TrackerRun(status="skipped", run_id=known.run_id if known else None,
                                     url=known.url if known else None, reason=reason)
        log.warning("tracker.skipped", tracker=name, reason=reason, action="training continues without it",
                    seconds=None if seconds is None else round(seconds, 3))

    @staticmethod
    def _close(tracker: Tracker, status: str) -> None:
        try:
            tracker.close(status)
        except Exception as e:  # noqa: BLE001
            log.info("tracker.close_failed", tracker=tracker.name, error=redact_text(str(e))[:300])

    def _read_ids(self, store: Store) -> dict[str, str]:
        """``trackers.json`` as an earlier life of this run wrote it; {} when there is none."""
        if not store.exists(IDS_FILE):
            return {}
        raw, _ = store.get_bytes(IDS_FILE)
        try:
            ids = json.loads(raw)
            if not isinstance(ids, dict) or not all(
                    k in TRACKERS and isinstance(v, str) and _SAFE_ID.fullmatch(v) for k, v in ids.items()):
                raise ValueError("expected {tracker: run id}")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{store.url(IDS_FILE)} is corrupt ({str(e).splitlines()[0][:80]}); delete it to "
                            "start new tracker runs") from None
        return ids

    def _restore_tensorboard(self, store: Store) -> None:
        """Bring back the event files an earlier life uploaded, so the same TensorBoard dir continues."""
        if "tensorboard" not in self.names or self.tensorboard_dir.is_dir():
            return
        try:
            if store.list("tensorboard/"):
                store.get_dir("tensorboard", self.tensorboard_dir)
        except MedftError as e:
            log.info("tracker.restore_failed", tracker="tensorboard", error=redact_text(str(e))[:300])

