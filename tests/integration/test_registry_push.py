"""``medft registry push``: the real ``huggingface_hub`` client against the fake Hub in tests/fake_hub.py.

The client is forced onto the Git LFS path (``HF_HUB_DISABLE_XET``): the fake Hub speaks LFS, not Xet (see
docs/sharing.md for what that leaves unproven).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from registry.records import EvaluationRecord
from registry.registry import Registry
from registry.store import open_store
from registry.versions import HubPush
from tests import cli
from tests.fake_hub import FakeHub, running_hub

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_fakeWriteToken_7f3a9c21d4e8b6"
CARD = ("---\nlicense: apache-2.0\nbase_model: org/tiny\ntags: [medical, reasoning, lora, medft]\n---\n\n"
        "# med\n\nA LoRA fine-tune of `hf://org/tiny`.\n")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    # 300,000 bytes > 250,000: the first merged shard goes through LFS multipart (5 parts of 64 KiB).
    with running_hub(TOKEN, multipart_threshold=250_000, chunk_size=64 * 1024) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)  # read at import time
        yield h


@pytest.fixture
def registered(tmp_path: Path, sample_run_dir: Path, publish_sample_run: Callable[..., str],
               monkeypatch: pytest.MonkeyPatch) -> Registry:
    """med:1 registered from a sample run whose merged/ and adapter/ carry a model card."""
    store = str(tmp_path / "store")
    monkeypatch.setenv("MEDFT_STORE", store)
    monkeypatch.delenv("MEDFT_REGISTRY", raising=False)
    (sample_run_dir / "merged" / "README.md").write_text(CARD)
    (sample_run_dir / "adapter" / "README.md").write_text(CARD)
    publish_sample_run(store, "run-1")
    reg = Registry.open(store + "/registry")
    reg.register("med", "run-1", store=open_store(store))
    return reg


def push(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return cli.run_main(["registry", "push", *argv], capsys)


def test_push_merged_sends_every_file_in_one_commit_and_records_it(
        hub: FakeHub, registered: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    files = registered.get("med:1").artifacts["merged"]["files"]
    assert "README.md" in files and len(files) == 6

    code, out, err = push(["med:1", "hf://org/med-r1", "--create"], capsys)

    assert (code, cli.error_lines(err)) == (0, [])
    [commit] = hub.commits("org/med-r1")
    assert commit.added == files  # every file, each with the sha256 the registry recorded
    assert commit.branch == "main" and commit.summary == "medft: med:1 (merged)"
    for rel, sha in files.items():  # and the bytes that arrived hash to it
        if rel.endswith(".safetensors"):
            assert hashlib.sha256(hub.lfs[sha]).hexdigest() == sha
    assert hub.count("PUT", "/part/") == 5  # the 300,000-byte shard went multipart
    assert hub.count("POST", "/commit/") == 1
    assert hub.repos["org/med-r1"].private is False

    mv = registered.get("med:1")
    assert mv.pushes == (HubPush(repo="org/med-r1", revision="main", commit=commit.oid,
                                 url=f"{hub.endpoint}/org/med-r1/commit/{commit.oid}", artifact="merged",
                                 pushed_at=mv.pushes[0].pushed_at),)
    assert out.strip() == f"pushed med:1 (merged) to hf://org/med-r1@main: commit {commit.oid} {mv.pushes[0].url}"
    record = Path(registered.store.url("models/med/versions/1.json")).read_text()
    assert json.loads(record)["pushes"][0]["commit"] == commit.oid
    for text in (out, err, record):
        assert TOKEN not in text
    assert all(r.authorization in (None, f"Bearer {TOKEN}") for r in hub.requests)
    code, out, _ = cli.run_main(["registry", "show", "med:1"], capsys)
    assert f"pushed       hf://org/med-r1@main  commit {commit.oid}" in out


def test_push_adapter_to_a_new_branch_of_a_new_private_repo_then_main(
        hub: FakeHub, registered: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = push(["med", "hf://org/med-adapter", "--artifact", "adapter", "--create", "--private",
                           "--revision", "exp/lr-2e-4", "--json"], capsys)
    assert (code, cli.error_lines(err)) == (0, [])
    repo = hub.repos["org/med-adapter"]
    assert repo.private is True
    [commit] = hub.commits("org/med-adapter")
    assert commit.branch == "exp/lr-2e-4" and repo.branches["exp/lr-2e-4"] == commit.oid
    assert repo.tree("main") == {".gitattributes": repo.tree("main")[".gitattributes"]}  # main untouched
    assert commit.added == registered.get("med:1").artifacts["adapter"]["files"]
    assert json.loads(out)["commit"] == commit.oid and json.loads(out)["revision"] == "exp/lr-2e-4"

    # The same version again, to main of the (now existing) repo: a second commit, a second record.
    code, _, err = push(["med:1", "hf://org/med-adapter", "--artifact", "adapter"], capsys)
    assert (code, cli.error_lines(err)) == (0, [])
    assert [c.branch for c in hub.commits("org/med-adapter")] == ["exp/lr-2e-4", "main"]
    assert [(p.revision, p.artifact) for p in registered.get("med:1").pushes] == [("exp/lr-2e-4", "adapter"),
                                                                                 ("main", "adapter")]


def test_push_gguf_sends_the_gguf_files_modelfiles_and_card(
        hub: FakeHub, tmp_path: Path, sample_run_dir: Path, publish_sample_run: Callable[..., str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import SAMPLE_RECORD

    store = str(tmp_path / "store")
    monkeypatch.setenv("MEDFT_STORE", store)
    (sample_run_dir / "gguf").mkdir()
    gguf_bytes = b"GGUF" + os.urandom(300_000)  # over the LFS threshold, as a real GGUF is
    (sample_run_dir / "gguf" / "med-q8_0.gguf").write_bytes(gguf_bytes)
    (sample_run_dir / "gguf" / "med-q8_0.Modelfile").write_text("FROM ./med-q8_0.gguf\n")
    (sample_run_dir / "gguf" / "README.md").write_text(CARD)
    publish_sample_run(store, "run-1", {**SAMPLE_RECORD, "artifacts": {**SAMPLE_RECORD["artifacts"], "gguf": "gguf"}})
    reg = Registry.open(store + "/registry")
    reg.register("med", "run-1", store=open_store(store))

    code, _, err = push(["med:1", "hf://org/med-gguf", "--artifact", "gguf", "--create"], capsys)
    assert (code, cli.error_lines(err)) == (0, [])
    [commit] = hub.commits("org/med-gguf")
    assert sorted(commit.added) == ["README.md", "med-q8_0.Modelfile", "med-q8_0.gguf"]
    assert commit.added == reg.get("med:1").artifacts["gguf"]["files"]
    assert hub.lfs[commit.added["med-q8_0.gguf"]] == gguf_bytes
    assert [(p.repo, p.artifact) for p in reg.get("med:1").pushes] == [("org/med-gguf", "gguf")]


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["med:1", "s3://bucket/med"], 2, "must be hf://org/name"),
    (["med:1", "hf://med"], 2, "must be hf://org/name"),
    (["med:1", "hf://org/med@dev"], 2, "--revision"),
    (["med:1", "hf://org/med", "--private"], 2, "--private applies only with --create"),
    (["med:1", "hf://org/med", "--revision", "a..b"], 2, "not a branch name"),
    (["ghost:1", "hf://org/med"], 4, "'ghost:1' not found"),
])
def test_bad_input_stops_before_the_hub(hub: FakeHub, registered: Registry, argv: list[str], code: int, says: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("org/med")
    got, out, err = push(argv, capsys)
    assert got == code and out == ""
    [line] = cli.error_lines(err)
    assert says in line
    assert hub.requests == []


def test_no_token_exits_5_before_any_request(hub: FakeHub, registered: Registry,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = push(["med:1", "hf://org/med", "--create"], capsys)
    assert code == 5
    assert cli.error_lines(err) == ["medft: error: HF_TOKEN is not set: export HF_TOKEN with a Hugging Face token "
                                    "that can write to the target repo (https://huggingface.co/settings/tokens)"]
    assert hub.requests == []


def test_wrong_token_exits_5(hub: FakeHub, registered: Registry, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("org/med")
    monkeypatch.setenv("HF_TOKEN", "hf_someoneElsesToken_0000000")
    code, _, err = push(["med:1", "hf://org/med"], capsys)
    assert code == 5
    [line] = cli.error_lines(err)
    assert "the Hub refused HF_TOKEN (HTTP 401" in line and "hf_someoneElsesToken" not in err
    assert hub.commits("org/med") == [] and registered.get("med:1").pushes == ()


def test_write_denied_exits_5_and_records_nothing(hub: FakeHub, registered: Registry,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("org/med")
    hub.deny("org/med")
    code, _, err = push(["med:1", "hf://org/med"], capsys)
    assert code == 5
    [line] = cli.error_lines(err)
    assert "hf://org/med: the Hub refused HF_TOKEN (HTTP 403" in line
    assert hub.commits("org/med") == [] and hub.count("POST", "/commit/") == 0
    assert registered.get("med:1").pushes == ()


def test_missing_repo_without_create_exits_4_before_downloading(hub: FakeHub, registered: Registry,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = push(["med:1", "hf://org/nowhere"], capsys)
    assert code == 4
    assert cli.error_lines(err) == ["medft: error: hf://org/nowhere: no such repo on the Hub, or HF_TOKEN cannot "
                                    "see it; pass --create to create it"]
    assert [(r.method, r.path.split("?")[0]) for r in hub.requests] == [("GET", "/api/models/org/nowhere")]
    assert "org/nowhere" not in hub.repos


def test_5xx_on_the_commit_exits_75_once_without_retrying(hub: FakeHub, registered: Registry,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("org/med")
    hub.fail("/commit/", 500, method="POST")
    code, _, err = push(["med:1", "hf://org/med"], capsys)
    assert code == 75
    [line] = cli.error_lines(err)
    assert "hf://org/med: the Hub answered HTTP 500 (injected failure); retry later" in line
    assert hub.count("POST", "/commit/") == 1  # a commit is never resent: a lost answer could mean two commits
    assert registered.get("med:1").pushes == ()


def test_5xx_on_repo_lookup_exits_75(hub: FakeHub, registered: Registry, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Also: the Hub's error quotes the URL it asked; the endpoint's credentials are cut out of it."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint.replace("http://", "http://medft:hub-secret-5e07@"))
    hub.add_repo("org/med")
    hub.fail("/api/models/org/med", 503, method="GET")
    code, _, err = push(["med:1", "hf://org/med"], capsys)
    assert code == 75 and "HTTP 503" in cli.error_lines(err)[0]
    assert len(hub.requests) == 1
    assert "hub-secret-5e07" not in err


def test_unreachable_hub_exits_75(hub: FakeHub, registered: Registry, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Credentials in the endpoint (userinfo, a token parameter) appear nowhere in what is printed or logged.
    monkeypatch.setenv("HF_ENDPOINT", f"http://medft:hub-secret-91f2@127.0.0.1:{port}/?token=hub-secret-91f2")
    code, _, err = push(["med:1", "hf://org/med"], capsys)
    assert code == 75
    [line] = cli.error_lines(err)
    assert "cannot reach the Hub for hf://org/med (ConnectError" in line
    assert "hub-secret-91f2" not in err


def test_concurrent_pushes_and_evaluations_are_all_recorded(registered: Registry) -> None:
    """Pushes and ``medft eval --record`` append to the same version record at once: none is lost."""
    def record(i: int) -> None:
        if i % 2:
            registered.record_evaluation("med", 1, EvaluationRecord(artifact="merged", evaluated_at=f"t{i}"))
            return
        registered.record_push("med", 1, HubPush(repo=f"org/m{i}", revision="main", commit=f"{i:040x}",
                                                 url=f"https://hub/org/m{i}", artifact="merged",
                                                 pushed_at="2026-01-01T00:00:00Z"))

    threads = [threading.Thread(target=record, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    version = registered.get("med:1")
    assert sorted(p.repo for p in version.pushes) == sorted(f"org/m{i}" for i in range(0, 12, 2))
    assert sorted(e.evaluated_at for e in version.evaluations) == sorted(f"t{i}" for i in range(1, 12, 2))


def test_a_record_written_before_pushes_existed_still_reads(registered: Registry) -> None:
    path = Path(registered.store.url("models/med/versions/1.json"))
    doc = json.loads(path.read_text())
    doc.pop("pushes")
    path.write_text(json.dumps(doc))
    assert registered.get("med:1").pushes == ()


def test_subprocess_push_logs_never_hold_the_token(hub: FakeHub, registered: Registry, tmp_path: Path) -> None:
    """The real entry point with JSON logs at DEBUG and huggingface_hub at debug verbosity (HF_DEBUG prints its
    requests as curl commands): the token appears nowhere in what the process writes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MEDFT_LOG_FORMAT": "json", "MEDFT_LOG_LEVEL": "DEBUG",
           "HF_HUB_VERBOSITY": "debug", "HF_DEBUG": "1"}
    p = subprocess.run([sys.executable, "-m", "job.cli", "registry", "push", "med:1", "hf://org/logged",
                        "--create"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    assert len(hub.commits("org/logged")) == 1
    assert '"event": "push.committed"' in p.stderr  # the logs were captured, and they are JSON lines
    assert TOKEN not in p.stdout and TOKEN not in p.stderr


@pytest.mark.parametrize(("status", "code"), [(401, 5), (403, 5)])
def test_xet_path_users_get_by_default_maps_a_refused_write_token(
        hub: FakeHub, registered: Registry, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        status: int, code: int) -> None:
    """hf_xet is installed, so without HF_HUB_DISABLE_XET large files go through Xet: the client asks the Hub
    for a Xet write token. The fake Hub has no Xet storage; it refuses the token, which is as far as this goes."""
    import hf_xet  # noqa: F401 - installed with transformers, as in the image: this is the path users get
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", False)
    hub.add_repo("org/med")
    hub.fail("/xet-write-token/", status)
    got, _, err = push(["med:1", "hf://org/med"], capsys)
    assert got == code
    [line] = cli.error_lines(err)
    assert "hf://org/med: the Hub refused HF_TOKEN for the Xet upload" in line and f"({status} " in line
    assert any("/api/models/org/med/xet-write-token/main" in r.path for r in hub.requests)
    assert hub.count("POST", "/commit/") == 0 and registered.get("med:1").pushes == ()
    assert TOKEN not in err


def test_a_corrupt_artifact_file_exits_3_and_commits_nothing(hub: FakeHub, registered: Registry,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("org/med")
    shard = Path(registered.get("med:1").artifacts["merged"]["uri"]) / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"\0" * shard.stat().st_size)  # same size, other bytes
    code, _, err = push(["med:1", "hf://org/med"], capsys)
    assert code == 3
    [line] = cli.error_lines(err)
    assert "checksum mismatch" in line and "model-00002-of-00002.safetensors" in line
    assert hub.commits("org/med") == [] and hub.count("POST", "/preupload/") == 0


def test_pushing_the_same_files_again_records_the_branch_head_without_a_new_commit(
        hub: FakeHub, registered: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    hub.add_repo("org/med")
    assert push(["med:1", "hf://org/med"], capsys)[0] == 0
    code, _, err = push(["med:1", "hf://org/med"], capsys)  # e.g. a rerun after the record could not be written
    assert (code, cli.error_lines(err)) == (0, [])
    [commit] = hub.commits("org/med")
    assert [p.commit for p in registered.get("med:1").pushes] == [commit.oid, commit.oid]
