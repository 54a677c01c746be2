"""``medft registry ...`` through the real entry point (``job.cli.main``) and as a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from registry.registry import Registry
from registry.store import open_store
from tests import cli

ROOT = Path(__file__).resolve().parents[2]


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``medft ARGV`` in-process; return (exit code, stdout, the ``medft: error`` line or '')."""
    code, out, err = cli.run_main(argv, capsys)
    errors = cli.error_lines(err)
    return code, out, errors[0] if errors else ""


def medft(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``medft ARGS`` as a subprocess of this interpreter (the same code as .venv/bin/medft)."""
    return subprocess.run([sys.executable, "-m", "job.cli", *args], cwd=cwd or ROOT, capture_output=True,
                          check=False, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


@pytest.fixture
def local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = str(tmp_path / "store")
    monkeypatch.setenv("MEDFT_STORE", uri)
    monkeypatch.delenv("MEDFT_REGISTRY", raising=False)
    return uri


def test_register_list_show_resolve_alias_download(local_store: str, publish_sample_run: Callable[..., str],
                                                   sample_run_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_uri = publish_sample_run(local_store, "run-1")

    code, out, err = run_main(["registry", "register", "med", "run-1", "--alias", "prod", "--tag", "k=v"], capsys)
    assert (code, err) == (0, "")
    assert out.strip() == f"registered med:1 (@prod) from {run_uri}"
    code, out, _ = run_main(["registry", "register", "med", run_uri, "--json"], capsys)
    assert code == 0 and json.loads(out)["version"] == 2

    code, out, _ = run_main(["registry", "list"], capsys)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["NAME", "VERSION", "ALIASES"]
    assert lines[1].split()[:3] == ["med", "1", "prod"] and lines[2].split()[:3] == ["med", "2", "-"]
    code, out, _ = run_main(["registry", "list", "--name", "med", "--json"], capsys)
    records = json.loads(out)
    assert [r["version"] for r in records] == [1, 2] and records[0]["tags"] == {"k": "v"}
    assert records[0]["artifacts"]["merged"]["uri"] == run_uri + "/merged"

    code, out, _ = run_main(["registry", "show", "med@prod", "--json"], capsys)
    assert json.loads(out)["version"] == 1 and json.loads(out)["aliases"] == ["prod"]
    code, out, _ = run_main(["registry", "show", "med"], capsys)
    assert out.startswith("med:2") and "eval loss    2.000 -> 1.200 (before -> after training)" in out

    code, out, _ = run_main(["registry", "resolve", "med:1", "--artifact", "adapter"], capsys)
    assert out.strip() == run_uri + "/adapter"
    code, out, _ = run_main(["registry", "resolve", "med"], capsys)
    assert out.strip() == run_uri + "/merged"

    assert run_main(["registry", "alias", "med", "2", "prod"], capsys)[:2] == (0, "med@prod -> med:2\n")
    code, _, err = run_main(["registry", "alias", "med", "1", "prod", "--delete"], capsys)
    assert code == 2 and "points at version 2" in err
    assert run_main(["registry", "alias", "med", "2", "prod", "--delete"], capsys)[0] == 0
    code, _, err = run_main(["registry", "alias", "med", "prod", "latest"], capsys)  # latest as the VERSION
    assert code == 2 and "'latest' is not an alias to set: NAME@latest always means the highest version" in err
    code, _, err = run_main(["registry", "alias", "med", "\u00b2", "prod"], capsys)  # a digit to str.isdigit only
    assert code == 2 and "give a version number (1, 2, ...) and an alias name" in err
    code, _, err = run_main(["registry", "resolve", "med@prod"], capsys)
    assert code == 4 and "'med@prod'" in err

    dest = tmp_path / "downloaded"
    code, out, _ = run_main(["registry", "download", "med:1", str(dest)], capsys)
    assert code == 0 and out.strip() == str(dest)
    for p in (sample_run_dir / "merged").iterdir():
        assert (dest / p.name).read_bytes() == p.read_bytes()


def test_registry_option_overrides_store_registry(local_store: str, publish_sample_run: Callable[..., str],
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    publish_sample_run(local_store, "run-1")
    other = str(tmp_path / "elsewhere")
    assert run_main(["registry", "register", "m", "run-1", "--registry", other], capsys)[0] == 0
    assert [mv.ref for mv in Registry.open(other).list()] == ["m:1"]
    assert not Path(local_store, "registry").exists()
    _, out, _ = run_main(["registry", "list", "--registry", other, "--json"], capsys)
    assert [r["name"] for r in json.loads(out)] == ["m"]


def test_default_store_is_medft_store_in_cwd(tmp_path: Path, publish_sample_run: Callable[..., str],
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MEDFT_STORE", raising=False)
    monkeypatch.delenv("MEDFT_REGISTRY", raising=False)
    monkeypatch.chdir(tmp_path)
    publish_sample_run(str(tmp_path / "medft-store"), "run-1")
    assert run_main(["registry", "register", "m", "run-1"], capsys)[0] == 0
    assert (tmp_path / "medft-store" / "registry" / "models" / "m" / "versions" / "1.json").is_file()


@pytest.mark.parametrize("argv", [["show", "ghost"], ["show", "ghost:3"], ["resolve", "ghost@prod"],
                                  ["download", "ghost", "/tmp/never"], ["show", "../etc"]])
def test_unknown_ref_exits_4_and_names_it(local_store: str, argv: list[str],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["registry", *argv], capsys)
    assert code == 4 and out == ""
    assert repr(argv[1]) in err


def test_unknown_ref_as_a_subprocess(tmp_path: Path) -> None:
    p = medft("registry", "show", "nobody:1", "--store", str(tmp_path / "store"))
    assert p.returncode == 4
    assert "medft: error: model ref 'nobody:1' not found" in p.stderr


def test_register_refuses_unpublished_run(local_store: str, sample_run_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    open_store(local_store).put_dir("runs/half", sample_run_dir)
    code, _, err = run_main(["registry", "register", "m", "half"], capsys)
    assert code == 4 and "runs/half is not published" in err and "MANIFEST.json" in err
    assert Registry.open(local_store + "/registry").list() == []


def test_corrupted_download_exits_3(local_store: str, publish_sample_run: Callable[..., str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_uri = publish_sample_run(local_store)
    run_main(["registry", "register", "m", run_uri], capsys)
    (Path(run_uri) / "merged" / "tokenizer.json").write_text("{}")
    code, _, err = run_main(["registry", "download", "m", str(tmp_path / "dl")], capsys)
    assert code == 3 and "checksum mismatch" in err and "tokenizer.json" in err


def test_s3_end_to_end(s3_bucket: str, publish_sample_run: Callable[..., str], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDFT_STORE", s3_bucket)
    run_uri = publish_sample_run(s3_bucket, "run-s3")
    code, out, err = run_main(["registry", "register", "med", run_uri, "--alias", "prod"], capsys)
    assert code == 0, err
    code, out, _ = run_main(["registry", "resolve", "med@prod"], capsys)
    assert out.strip() == f"{s3_bucket}/runs/run-s3/merged"
    assert run_main(["registry", "download", "med@prod", str(tmp_path / "dl"), "--artifact", "adapter"],
                    capsys)[0] == 0
    assert (tmp_path / "dl" / "adapter_config.json").is_file()


def test_missing_bucket_exits_4(s3_server: str, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", s3_server)
    code, _, err = run_main(["registry", "list", "--store", "s3://medft-missing-bucket/x"], capsys)
    assert code == 4 and "bucket 'medft-missing-bucket' does not exist" in err


def test_403_exits_5(s3_serial_server: Any, s3_serial_bucket: str) -> None:
    s3_serial_server.faults.add(status=403, code="AccessDenied", times=None)
    p = medft("registry", "list", "--store", s3_serial_bucket)
    assert p.returncode == 5, p.stderr
    assert "medft: error: access denied by S3" in p.stderr
    assert len(s3_serial_server.faults.injected) == 1  # not retried


def test_503s_are_retried_by_the_cli(s3_serial_server: Any, s3_serial_bucket: str,
                                     publish_sample_run: Callable[..., str]) -> None:
    run_uri = publish_sample_run(s3_serial_bucket)
    s3_serial_server.faults.add(status=503, code="SlowDown", times=3)
    p = medft("registry", "register", "m", run_uri, "--store", s3_serial_bucket)
    assert p.returncode == 0, p.stderr
    assert len(s3_serial_server.faults.injected) == 3
    s3_serial_server.faults.add(status=503, code="SlowDown", times=None)
    p = medft("registry", "list", "--store", s3_serial_bucket, env={"MEDFT_S3_MAX_ATTEMPTS": "2"})
    assert p.returncode == 75 and "gave up after 2 attempts" in p.stderr


def test_list_shows_every_readable_version_then_names_the_corrupt_record(
        local_store: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    """One hand-broken record in a shared registry: the others are still listed, and the broken one is named
    (exit 3) rather than hiding every model."""
    run_uri = publish_sample_run(local_store, "run-1")
    for name in ("alpha", "beta", "gamma"):
        assert run_main(["registry", "register", name, run_uri], capsys)[0] == 0
    broken = Path(local_store) / "registry/models/beta/versions/1.json"
    broken.write_text("{not json")
    (Path(local_store) / "registry/models/gamma/aliases.json").write_text("[]")
    code, out, err = run_main(["registry", "list"], capsys)
    assert code == 3
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["alpha"]
    [line] = cli.error_lines(err)  # the first corrupt record, and how many more
    assert line.endswith("(and 1 more corrupt record(s))")
    assert (str(broken) in line and "is not valid JSON" in line) or "gamma/aliases.json is corrupt (not a JSON " \
        "object); fix it by hand (deleting it drops every alias of gamma, its protected aliases, archive marks and " \
        "change history)" in line
    code, out, err = run_main(["registry", "list", "--json"], capsys)
    assert code == 3 and [r["name"] for r in json.loads(out)] == ["alpha"]


def _long_record() -> dict[str, Any]:
    """The sample record with 16-digit figures, a plan, a merge check and eval answers before and after."""
    from tests.conftest import SAMPLE_RECORD

    record = json.loads(json.dumps(SAMPLE_RECORD))
    record["metrics"].update(
        train_loss=1.4987654321987654, eval_loss_before=2.0123456789012345, eval_loss_after=1.2345678901234567,
        tokens_per_s=2435.0549565466167, peak_host_mem_gib=0.6296615600585938, peak_gpu_mem_gib=None, steps=60,
        merge_check={"max_abs_logit_diff": 0.0003038942813873291, "relative_diff": 0.0004277086051515125,
                     "tolerance": 0.02, "compare_dtype": "float32", "device": "cpu"},
        backend="hf", plan={"batch_size": 2, "grad_accum": 4, "packing": False, "gradient_checkpointing": False,
                            "load_in_4bit": False, "precision": "fp32", "optim": "adamw_torch",
                            "reasons": {"precision": "no CUDA: CPU training runs in float32"}},
        benchmarks_before={"medqa": {"accuracy": 0.5012345, "interval": [0.43, 0.57], "scored": 200}},
        benchmarks_after={"medqa": {"accuracy": 0.6123456, "interval": [0.54, 0.68], "scored": 200}})
    record["answers"] = {"before": [{"question": "What causes anemia?", "output": "<think>\nno idea</think> Blood."}],
                         "after": [{"question": "What causes anemia?",
                                    "output": "<think>\nIron deficiency is common.</think> Iron deficiency.\x1b[2J"}]}
    return record


def test_show_is_rounded_sections_with_the_answers_and_json_keeps_every_digit(
        local_store: str, publish_sample_run: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    run_uri = publish_sample_run(local_store, "run-1", _long_record())
    assert run_main(["registry", "register", "med", run_uri, "--alias", "prod"], capsys)[0] == 0
    code, out, err = run_main(["registry", "show", "med@prod"], capsys)
    assert (code, err) == (0, "")
    for section in ("Base model", "Data", "Results", "Answers to eval.questions, before -> after training",
                    "Training plan", "Environment"):
        assert f"\n\n{section}\n" in out, section
    assert "eval loss    2.012 -> 1.235 (before -> after training)" in out
    assert "medqa        50.1% [43.0%, 57.0%] -> 61.2% [54.0%, 68.0%] (200 questions)" in out
    assert "throughput   2,435 tokens/s" in out and "peak memory  host 0.63 GiB" in out
    assert "merge check  logits differ by 0.00043 of their scale, within tolerance 0.02 (float32 on cpu)" in out
    assert "Q1  What causes anemia?" in out
    assert "before  <think> no idea</think> Blood." in out and "after   <think> Iron deficiency is common.</think>" in out
    assert "precision               fp32  (no CUDA: CPU training runs in float32)" in out
    assert "None" not in out and "{" not in out  # no Python None, no inline JSON
    assert "\x1b" not in out  # a record's text cannot clear the screen
    assert not re.search(r"\d\.\d{6,}", out)  # no 16-digit floats
    code, out, _ = run_main(["registry", "show", "med@prod", "--json"], capsys)
    metrics = json.loads(out)["metrics"]
    assert metrics["eval_loss_after"] == 1.2345678901234567 and metrics["tokens_per_s"] == 2435.0549565466167


def test_list_fits_100_columns_and_wide_shows_more(local_store: str, publish_sample_run: Callable[..., str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    name = "r1-qwen-1.5b-medical-sweep-with-a-long-name"
    run_uri = publish_sample_run(local_store, "r1-qwen-1-5b-en-sweep-20261206-035447-a1b2c3-lr-0.0004")
    for _ in range(2):
        assert run_main(["registry", "register", name, run_uri, "--alias", "candidate-for-production"], capsys)[0] == 0
    code, out, _ = run_main(["registry", "list"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "VERSION", "ALIASES", "CREATED", "EVAL", "LOSS", "RUN"]
    assert max(len(line) for line in lines) <= 100, out
    assert "2.000 -> 1.200" in lines[1] and "…" in lines[1]  # the run id is cut in the middle to fit
    code, out, _ = run_main(["registry", "list", "--wide"], capsys)
    assert "BASE MODEL" in out.splitlines()[0] and "hf://org/tiny" in out and "adapter,merged" in out
    assert "r1-qwen-1-5b-en-sweep-20261206-035447-a1b2c3-lr-0.0004" in out and max(map(len, out.splitlines())) > 100
    code, out, _ = run_main(["registry", "list", "--json"], capsys)
    assert json.loads(out)[0]["run_id"] == "r1-qwen-1-5b-en-sweep-20261206-035447-a1b2c3-lr-0.0004"


def test_a_store_or_model_that_does_not_exist_exits_4_an_empty_registry_lists_nothing(
        tmp_path: Path, local_store: str, publish_sample_run: Callable[..., str],
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "sotre")
    code, out, err = run_main(["registry", "list", "--store", missing], capsys)
    assert code == 4 and out == "" and err == f"medft: error: store {missing} does not exist; check --store (or MEDFT_STORE)"
    code, _, err = run_main(["registry", "list", "--registry", missing], capsys)
    assert code == 4 and f"registry {missing} does not exist" in err
    code, _, err = run_main(["registry", "show", "med:1", "--store", missing], capsys)
    assert code == 4 and err.startswith("medft: error: model ref 'med:1' not found") and f"store {missing} does" in err
    for command in (["runs"], ["verify", "--all"], ["history", "med"], ["webhooks", "list"]):  # every read
        code, out, err = run_main(["registry", *command, "--store", missing], capsys)
        assert (code, out) == (4, "") and f"store {missing} does not exist" in err, command

    Path(local_store).mkdir()
    code, out, err = run_main(["registry", "list"], capsys)  # exists, nothing registered yet: empty, not missing
    assert (code, err) == (0, "") and out.startswith("no model versions in ")
    code, _, err = run_main(["registry", "list", "--name", "med"], capsys)
    assert code == 4 and "no model named 'med'" in err and "holds no models yet" in err

    run_uri = publish_sample_run(local_store, "run-1")
    for name in ("med", "radiology"):
        assert run_main(["registry", "register", name, run_uri], capsys)[0] == 0
    code, out, err = run_main(["registry", "list", "--name", "mde"], capsys)
    assert code == 4 and out == ""
    assert err.endswith("no model named 'mde' in registry " + local_store + "/registry; did you mean med? it holds "
                        "med, radiology")
    code, out, _ = run_main(["registry", "list", "--name", "med"], capsys)
    assert code == 0 and out.splitlines()[1].split()[:2] == ["med", "1"]
