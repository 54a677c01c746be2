"""Alias history, ``show --at``, protected aliases, archive and delete, on a local store and the moto S3 server.

Versions come from sample runs whose records carry ``metrics.benchmarks_after`` (medqa) as the job writes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry import model_state
from registry.errors import ConfigError, DataError, NotFoundError
from registry.registry import Registry
from tests.cli import error_lines, run_main
from tests.integration.test_registry_gate import scored_run


@pytest.fixture
def store_uri(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def _model(store_uri: str, publish: Callable[..., str], scores: list[float | None]) -> tuple[Registry, list[str]]:
    """Model ``m`` with one version per medqa score, none aliased; also returns the run URIs."""
    reg = Registry.open(store_uri + "/registry")
    runs = []
    for n, medqa in enumerate(scores, start=1):
        runs.append(publish(store_uri, run_id=f"run-{n}", **scored_run(medqa, lr=n * 1e-4)))
        reg.register("m", runs[-1])
    return reg, runs


def _doc(reg: Registry) -> dict[str, Any]:
    return json.loads(reg.store.get_bytes("models/m/aliases.json")[0])


def test_every_alias_change_is_in_the_history_and_show_at_answers_which_version_held_it(
        store_uri: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    reg, _ = _model(store_uri, publish_sample_run, [0.50, 0.55, 0.60])
    args = ["--store", store_uri]
    assert run_main(["registry", "alias", "m", "1", "production", *args], capsys)[0] == 0
    time.sleep(0.01)
    between = model_state.parse_time(reg.history("m", "production")[0].at, "at").timestamp()
    time.sleep(0.01)
    code, out, _ = run_main(["registry", "alias", "m", "production", "3", "--require", "medqa", *args], capsys)
    assert code == 0, out
    assert run_main(["registry", "alias", "m", "3", "production", "--delete", "--reason", "rollback", *args],
                    capsys)[0] == 0

    # Each change and its history entry were one write: the document holds both.
    doc = _doc(reg)
    assert doc["aliases"] == {} and [e["action"] for e in doc["history"]] == [
        "register", "register", "register", "set", "move", "delete"]
    code, out, _ = run_main(["registry", "history", "m@production", "--json", *args], capsys)
    entries = json.loads(out)
    assert code == 0 and [(e["action"], e.get("before"), e.get("after")) for e in entries] == [
        ("delete", 3, None), ("move", 1, 3), ("set", None, 1)]  # newest first, this alias only
    assert entries[1]["gate"]["verdict"] == "passed" and entries[1]["gate"]["require"] == ["medqa"]
    assert entries[0]["reason"] == "rollback" and all(e["by"] and e["via"] == "cli" for e in entries)
    code, out, _ = run_main(["registry", "history", "m", *args], capsys)
    lines = out.splitlines()
    assert code == 0 and len(lines) == 6 and "delete" in lines[0] and "reason: rollback" in lines[0]
    assert "register" in lines[-1]

    # Which version was production then?
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(between)) + f".{int(between * 1000) % 1000:03d}999Z"
    code, out, err = run_main(["registry", "show", "m@production", "--at", when, "--json", *args], capsys)
    assert code == 0 and json.loads(out)["version"] == 1 and "m@production at" in err
    code, _, err = run_main(["registry", "show", "m@production", "--at", "2000-01-01", *args], capsys)
    assert code == 4 and "pointed at no version at 2000-01-01" in error_lines(err)[0]
    code, _, err = run_main(["registry", "show", "m@production", "--at", "yesterday", *args], capsys)
    assert code == 2 and "--at 'yesterday' is not an ISO 8601 time" in error_lines(err)[0]


def test_a_protected_alias_is_gated_whoever_moves_it(
        store_uri: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    reg, runs = _model(store_uri, publish_sample_run, [0.55, 0.50])
    reg.set_alias("m", 1, "production")
    args = ["--store", store_uri]
    assert run_main(["registry", "protect", "m", "production", "--require", "medqa", *args], capsys)[0] == 0
    before = _doc(reg)

    # The CLI, without any --require of its own, is refused; nothing written.
    code, out, err = run_main(["registry", "alias", "m", "2", "production", *args], capsys)
    assert code == 2 and out == "" and "m:2 scores 50.0%" in error_lines(err)[0]
    assert _doc(reg) == before

    # A training job (output.aliases) registers and publishes, but the alias stays, with the reason recorded.
    third = publish_sample_run(store_uri, run_id="run-3", **scored_run(0.45, lr=3e-4))
    mv = reg.register("m", third, aliases=["production", "candidate"], via="job run-3",
                      reason="output.aliases of run run-3")
    assert mv.version == 3 and mv.aliases == ("candidate",)
    [refusal] = mv.alias_refusals
    assert refusal["alias"] == "production" and refusal["stays_at"] == 1 and "lower than m:1" in refusal["refusal"]
    assert reg.get("m@production").version == 1
    refused = reg.history("m", "production")[0]
    assert (refused.action, refused.before, refused.after, refused.via) == ("refused", 1, 1, "job run-3")
    assert refused.gate is not None and refused.gate["verdict"] == "refused"
    code, out, _ = run_main(["registry", "show", "m:3", *args], capsys)
    assert "not @production  the gate refused it at registration" in out

    # --force only with a reason, and recorded.
    code, _, err = run_main(["registry", "alias", "m", "2", "production", "--force", *args], capsys)
    assert code == 2 and "--force needs --reason" in error_lines(err)[0]
    code, out, _ = run_main(["registry", "alias", "m", "2", "production", "--force", "--reason", "hotfix", *args],
                            capsys)
    assert code == 0 and "forced past" in out and reg.get("m@production").version == 2
    forced = reg.history("m", "production")[0]
    assert forced.gate is not None and forced.gate["verdict"] == "forced" and forced.reason == "hotfix"
    assert run_main(["registry", "unprotect", "m", "production", *args], capsys)[0] == 0
    assert reg.set_alias("m", 3, "production").aliases == ("candidate", "production")
    with pytest.raises(ConfigError, match="has no gate"):
        reg.set_alias("m", 1, "production", force=True, reason="x")


def test_archive_and_delete_are_refused_while_an_alias_points_at_the_version(
        store_uri: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    reg, runs = _model(store_uri, publish_sample_run, [0.5, 0.5, 0.5])
    reg.set_alias("m", 2, "production")
    args = ["--store", store_uri]
    for verb in ("archive", "delete"):
        code, out, err = run_main(["registry", verb, "m", "2", *args], capsys)
        assert code == 2 and f"refused to {verb} m:2: @production points at it" in error_lines(err)[0]
    assert run_main(["registry", "archive", "m", "3", "--reason", "superseded", *args], capsys)[0] == 0
    code, out, _ = run_main(["registry", "list", "--json", *args], capsys)
    assert [v["version"] for v in json.loads(out)] == [1, 2]
    code, out, _ = run_main(["registry", "list", "--all", "--json", *args], capsys)
    assert [(v["version"], v["archived"]) for v in json.loads(out)] == [(1, False), (2, False), (3, True)]
    with pytest.raises(ConfigError, match="m:3 is archived"):
        reg.set_alias("m", 3, "staging")
    code, out, _ = run_main(["registry", "delete", "m", "1", "--reason", "bad data", *args], capsys)
    assert code == 0 and f"its run's files stay at {runs[0]}" in out
    with pytest.raises(NotFoundError):
        reg.get("m:1")
    assert reg.store.exists("models/m/versions/2.json") and not reg.store.exists("models/m/versions/1.json")
    from registry.store import open_store
    assert open_store(runs[0]).exists("MANIFEST.json")  # the run's files are not the registry's to delete
    # The highest number deleted is never reused.
    assert run_main(["registry", "unarchive", "m", "3", *args], capsys)[0] == 0
    assert run_main(["registry", "delete", "m", "3", *args], capsys)[0] == 0
    assert reg.register("m", runs[2]).version == 4
    assert [(e.action, e.after) for e in reg.history("m")[:4]] == [
        ("register", 4), ("delete-version", 3), ("unarchive", 3), ("delete-version", 1)]
    # Tags and description, set later.
    assert run_main(["registry", "tag", "m", "2", "team=cardio", "stage=qa", *args], capsys)[0] == 0
    assert run_main(["registry", "describe", "m", "2", "the cardiology run", *args], capsys)[0] == 0
    mv = reg.get("m:2")
    assert mv.tags == {"team": "cardio", "stage": "qa"} and mv.description == "the cardiology run"
    code, _, err = run_main(["registry", "tag", "m", "2", "--remove", "nope", *args], capsys)
    assert code == 4 and "has no tag 'nope'" in error_lines(err)[0]


def test_history_is_paged_bounded_and_a_corrupt_entry_is_named(
        tmp_path: Path, publish_sample_run: Callable[..., str], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(model_state, "HISTORY_KEPT", 6)
    monkeypatch.setattr(model_state, "HISTORY_PAGE", 4)
    store_uri = str(tmp_path / "store")
    reg, _ = _model(store_uri, publish_sample_run, [0.5, 0.5])
    first = None
    for i in range(10):
        reg.set_alias("m", 1 + i % 2, "production")
        first = first or reg.history("m", "production")[0].at
    doc = _doc(reg)
    assert len(doc["history"]) <= 6 and doc["history_paged"] == 8 and doc["history_seq"] == 12
    assert sorted(p.name for p in (tmp_path / "store/registry/models/m/history").iterdir()) == [
        "000000001.json", "000000005.json"]
    assert [e.seq for e in reg.history("m")] == list(range(12, 0, -1))
    assert reg.holder_at("m", "production", first)[0] == 1  # answered from a page
    # A page written by an attempt whose swap then lost: its entries are read once.
    page = tmp_path / "store/registry/models/m/history/000000009.json"
    page.write_text(json.dumps({"format": 1, "name": "m", "first": 9, "entries": doc["history"][:4]}))
    assert [e.seq for e in reg.history("m")] == list(range(12, 0, -1))
    page.unlink()
    # A corrupt entry: every read of the history names it (exit 3); the aliases still work.
    aliases_file = tmp_path / "store/registry/models/m/aliases.json"
    doc["history"][1]["after"] = "two"
    aliases_file.write_text(json.dumps(doc))
    code, _, err = run_main(["registry", "history", "m", "--store", store_uri], capsys)
    assert code == 3 and "aliases.json: history entry 10 (seq 10) is corrupt ('after' must be a version number" in (
        error_lines(err)[0])
    assert reg.get("m@production").version == 2
    reg.set_alias("m", 1, "production")  # a move appends after it, untouched
    with pytest.raises(DataError, match="history entry 10"):
        reg.history("m")
    # A gate whose benchmarks are not a list of names is named too, not a traceback in the history's text.
    doc["history"][1]["after"] = 2
    doc["history"][1]["gate"] = {"require": 7, "verdict": "passed"}
    aliases_file.write_text(json.dumps(doc))
    code, _, err = run_main(["registry", "history", "m", "--store", store_uri], capsys)
    assert code == 3 and "'gate.require' must be a list of benchmark names" in error_lines(err)[0], err


def test_history_protection_and_delete_on_s3(s3_bucket: str, publish_sample_run: Callable[..., str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The same compare-and-swap paths on S3 (conditional writes on the moto server)."""
    reg, _ = _model(s3_bucket, publish_sample_run, [0.55, 0.50])
    args = ["--store", s3_bucket]
    reg.set_alias("m", 1, "production")
    reg.protect("m", "production", ["medqa"])
    code, _, err = run_main(["registry", "alias", "m", "2", "production", *args], capsys)
    assert code == 2 and "m:2 scores 50.0%" in error_lines(err)[0] and reg.get("m@production").version == 1
    code, _, err = run_main(["registry", "delete", "m", "1", *args], capsys)
    assert code == 2 and "@production points at it" in error_lines(err)[0]
    assert run_main(["registry", "alias", "m", "2", "production", "--force", "--reason", "hotfix", *args],
                    capsys)[0] == 0
    assert run_main(["registry", "delete", "m", "1", *args], capsys)[0] == 0
    code, out, _ = run_main(["registry", "history", "m", "--json", *args], capsys)
    assert [(e["action"], e.get("before"), e.get("after")) for e in json.loads(out)] == [
        ("delete-version", None, 1), ("move", 1, 2), ("protect", None, None), ("set", None, 1),
        ("register", None, 2), ("register", None, 1)]
    moved_at = json.loads(out)[1]["at"]
    code, out, _ = run_main(["registry", "show", "m@production", "--at", moved_at, "--json", *args], capsys)
    assert code == 0 and json.loads(out)["version"] == 2
    with pytest.raises(NotFoundError):
        reg.get("m:1")


def test_the_jobs_registration_keeps_a_protected_alias_and_carries_tags_and_description(
        store_uri: str, publish_sample_run: Callable[..., str], tmp_path: Path) -> None:
    """``job.publish.register`` (what ``medft train`` runs after publishing) with ``output.aliases``,
    ``output.tags`` and ``output.description``: the second demo run must not take a protected @demo."""
    from job import publish
    from job.config import load_config
    from job.lifecycle import Run
    from registry.store import open_store

    reg, _ = _model(store_uri, publish_sample_run, [0.60])
    reg.set_alias("m", 1, "demo")
    reg.protect("m", "demo", ["medqa"])
    publish_sample_run(store_uri, run_id="run-2", **scored_run(0.40, lr=2e-4))
    config = tmp_path / "job.yaml"
    config.write_text(f"output:\n  store: {store_uri}\n  model_name: m\n  aliases: [demo, nightly]\n"
                      "  tags: {team: cardio}\n  description: second demo run\n")
    store = open_store(store_uri)
    run = Run(cfg=load_config(str(config), []), run_id="run-2", store=store, run_store=store.child("runs/run-2"),
              work_dir=tmp_path)
    mv = publish.register(run)
    assert mv.version == 2 and mv.aliases == ("nightly",) and reg.get("m@demo").version == 1
    assert mv.tags == {"team": "cardio"} and mv.description == "second demo run"
    assert [r["alias"] for r in mv.alias_refusals] == ["demo"]
    refused = reg.history("m", "demo")[0]
    assert (refused.action, refused.via, refused.reason) == ("refused", "job run-2", "output.aliases of run run-2")
    assert publish.register(run).version == 2  # a rerun registers nothing new


def test_the_precheck_runs_the_registrations_gate_before_the_run_is_registered(
        store_uri: str, publish_sample_run: Callable[..., str]) -> None:
    """``registry.precheck.expected_aliases`` (what a job's model card says) judges a run from its scores as
    registration then does; it names the unnumbered version ``m:VERSION``, and it is only what was expected."""
    from job.model_card import alias_section
    from registry.precheck import expected_aliases
    from registry.records import RunMetrics

    reg, _ = _model(store_uri, publish_sample_run, [0.55])
    reg.set_alias("m", 1, "production")
    reg.protect("m", "production", ["medqa"])
    lower, higher = (scored_run(medqa, lr=lr) for medqa, lr in ((0.50, 2e-4), (0.60, 3e-4)))
    aliases = ["production", "nightly"]

    [refused, nightly] = expected_aliases(reg.uri, "m", aliases, RunMetrics.model_validate(lower["record"]["metrics"]))
    assert (refused.alias, refused.holder, refused.require, refused.moves) == ("production", 1, ("medqa",), False)
    assert refused.refusal is not None and refused.refusal.startswith(
        "m:VERSION scores 50.0% [") and "lower than m:1 (@production now) at 55.0%" in refused.refusal
    assert (nightly.holder, nightly.require, nightly.moves) == (None, (), True)
    [passed, _] = expected_aliases(reg.uri, "m", aliases, RunMetrics.model_validate(higher["record"]["metrics"]))
    assert passed.moves and passed.refusal is None and passed.holder == 1
    section = "\n".join(alias_section("m", [refused, nightly]))
    assert "Expected at the time the card was written" in section
    assert f"- `m@production` (protected: medqa): stays at version 1; the gate refuses this version: {refused.refusal}" \
        in section and "- `m@nightly`: expected to move to this version (it is unset now)" in section

    # Registration then refuses with the same reason, naming the version it gave the run.
    mv = reg.register("m", publish_sample_run(store_uri, run_id="run-2", **lower), aliases=aliases)
    [refusal] = mv.alias_refusals
    assert refusal["refusal"] == refused.refusal.replace("m:VERSION", "m:2") and mv.aliases == ("nightly",)

    # Expected is not decided: a better version taking @production meanwhile refuses a run judged to pass.
    reg.register("m", publish_sample_run(store_uri, run_id="run-3", **scored_run(0.65, lr=4e-4)),
                 aliases=["production"])
    mv = reg.register("m", publish_sample_run(store_uri, run_id="run-4", **higher), aliases=["production"])
    assert reg.get("m@production").version == 3 and "lower than m:3" in mv.alias_refusals[0]["refusal"]

    # A registry that cannot be read now leaves every alias unchecked, saying why; the job goes on.
    aliases_file = Path(store_uri) / "registry/models/m/aliases.json"
    aliases_file.write_text("[]")
    [unchecked] = expected_aliases(reg.uri, "m", ["production"], RunMetrics.model_validate(higher["record"]["metrics"]))
    assert not unchecked.moves and unchecked.unchecked is not None and "aliases.json" in unchecked.unchecked
    assert "the gate could not be checked before publishing: " in "\n".join(alias_section("m", [unchecked]))


def test_a_jobs_model_card_says_which_aliases_the_gate_keeps_and_why(
        store_uri: str, publish_sample_run: Callable[..., str], tiny_model_dir: Path, job_env: dict[str, str],
        tmp_path: Path) -> None:
    """Issue 26: a training job whose version fails the gate for a protected alias publishes and registers,
    the alias stays, and the published model card says so and why; an alias it passes the gate for is expected
    to move, and an unprotected one too."""
    from registry.redact import printable
    from registry.store import open_store
    from tests.eval_factory import write_benchmark
    from tests.integration.conftest import job_args, run_medft

    reg = Registry.open(store_uri + "/registry")
    # tiny:1 holds @production, scored on other questions (and protocol) than the job's: the gate refuses.
    reg.register("tiny", publish_sample_run(store_uri, run_id="run-1", **scored_run(0.60)),
                 aliases=["production"])
    # tiny:2 holds @staging without a medqa score: a holder without one does not block a run that has one.
    reg.register("tiny", publish_sample_run(store_uri, run_id="run-2", **scored_run(None)), aliases=["staging"])
    for alias in ("production", "staging"):
        reg.protect("tiny", alias, ["medqa"])
    medqa = write_benchmark(tmp_path, "medqa")
    proc = run_medft(*job_args(tiny_model_dir, store_uri, "run-card", "--set", "eval.benchmarks=medqa",
                               "--set", f"eval.benchmark_sources={{medqa: {{file: '{medqa}'}}}}",
                               "--set", "eval.benchmark_limit=4", "--set", "eval.benchmark_max_new_tokens=6",
                               "--set", "output.aliases=[production, staging, candidate]"), env=job_env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # Published and registered; @production stayed, the others moved; the output says why.
    mv = reg.get("tiny:3")
    assert mv.run_id == "run-card" and mv.aliases == ("candidate", "staging")
    assert reg.get("tiny@production").version == 1
    [refusal] = mv.alias_refusals
    assert refusal["alias"] == "production" and "were scored on medqa with different questions" in refusal["refusal"]
    assert f"@production stays at version 1: {refusal['refusal']}" in proc.stdout

    # Both cards, read back from the store, said so before registration, with the reason registration gave.
    run_store = open_store(store_uri).child("runs/run-card")
    for artifact in ("merged", "adapter"):
        run_store.get_file(f"{artifact}/README.md", tmp_path / artifact / "README.md")
        card = (tmp_path / artifact / "README.md").read_text()
        section = card[card.index("\n## Aliases\n"):].split("\n## ")[1]
        lines = [line for line in section.splitlines() if line.startswith("- ")]
        expected_reason = printable(refusal["refusal"]).replace("tiny:3", "tiny:VERSION")
        assert lines == [
            f"- `tiny@production` (protected: medqa): stays at version 1; the gate refuses this version: "
            f"{expected_reason}",
            "- `tiny@staging` (protected: medqa): expected to move to this version (it is at version 2 now); it "
            "passes the gate",
            "- `tiny@candidate`: expected to move to this version (it is unset now)",
        ], section
        assert "Expected at the time the card was written" in section and "authoritative" in section


def test_stored_text_reaches_the_terminal_without_control_characters(
        store_uri: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    """A reason is stored text anyone with write access could have written: an ESC sequence in it must not
    clear or recolour the terminal of whoever reads the history or compares versions."""
    reg, _ = _model(store_uri, publish_sample_run, [0.5, 0.6])
    reg.set_alias("m", 1, "staging")
    reg.delete_alias("m", "staging", reason="\x1b[2J\x1b[31mwiped\x1b[0m by hand")
    for command in (["history", "m"], ["compare", "m:1", "m:2"], ["runs"]):
        code, out, err = run_main(["registry", *command, "--store", store_uri], capsys)
        assert code == 0 and "\x1b" not in out, (command, err)
    assert "reason: [2J [31mwiped [0m by hand" in run_main(["registry", "history", "m", "--store", store_uri], capsys)[1]
