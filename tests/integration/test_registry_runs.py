"""``medft registry runs``: every run in a store, with the state the store shows it was left in."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.registry import Registry
from tests.cli import error_lines, run_main


def test_runs_lists_published_registered_running_interrupted_failed_and_corrupt_runs(
        tmp_path: Path, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    Registry.open(str(store / "registry")).register("m", publish_sample_run(str(store), run_id="run-a"))
    publish_sample_run(str(store), run_id="run-b")
    runs = store / "runs"

    def write(run_id: str, rel: str, text: str) -> None:
        path = runs / run_id / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for run_id in ("run-c", "run-d", "run-e"):
        write(run_id, "config.yaml", "model: {}\n")
    for step in (10, 20):  # interrupted: two complete checkpoints, a lease its dead job left to expire
        write("run-c", f"checkpoints/checkpoint-{step}/COMPLETE.json", json.dumps({"step": step, "files": {}}))
    write("run-c", "checkpoints/checkpoint-30/model.safetensors", "partial")  # no COMPLETE.json: not counted
    write("run-c", "LEASE.json", json.dumps({"owner": "pod-1", "expires": time.time() - 60}))
    write("run-d", "LEASE.json", json.dumps({"owner": "pod-2", "expires": time.time() + 600}))
    write("run-f", "MANIFEST.json", "{not json")

    code, out, err = run_main(["registry", "runs", "--json", "--store", str(store)], capsys)
    got = {r["run_id"]: (r["state"], r["step"], r["versions"]) for r in json.loads(out)}
    assert got == {"run-a": ("registered", None, ["m:1"]), "run-b": ("published", None, []),
                   "run-c": ("interrupted", 20, []), "run-d": ("running", None, []), "run-e": ("failed", None, []),
                   "run-f": ("corrupt", None, [])}
    assert code == 3 and "run run-f:" in error_lines(err)[0] and "MANIFEST.json is not valid JSON" in err
    code, out, _ = run_main(["registry", "runs", "--store", str(store)], capsys)
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "checkpoint-20 (step 20); rerun with output.run_id=run-c to resume" in lines["run-c"]
    assert "lease held by pod-2 until" in lines["run-d"] and "before its first checkpoint" in lines["run-e"]
    (tmp_path / "empty").mkdir()
    code, out, _ = run_main(["registry", "runs", "--store", str(tmp_path / "empty")], capsys)
    assert code == 0 and out.startswith("no runs in")
