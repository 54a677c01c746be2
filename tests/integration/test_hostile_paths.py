"""Paths that cannot be written, and values typed on the command line, give one line and the documented exit code
before anything is read, drawn, downloaded or trained (issue 23: the class, not one example).

Every command that writes a local path is tried with a folder under ``/proc`` (no folder can be made there:
exit 2), an existing directory where a file goes, and a file where a folder goes; ``medft eval --base`` with a
URI or revision no source could mean is a usage error (exit 2) that says what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from registry.registry import Registry
from tests.cli import error_lines, run_main
from tests.integration.conftest import job_args


@pytest.fixture
def two_versions(tmp_path: Path, publish_sample_run: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> str:
    store = str(tmp_path / "store")
    run_uri = publish_sample_run(store, "run-1")
    registry = Registry.open(store + "/registry")
    registry.register("med", run_uri)
    registry.register("med", run_uri)
    monkeypatch.setenv("MEDFT_STORE", store)
    return store


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code, _, err = run_main(argv, capsys)
    assert "Traceback" not in err and len(error_lines(err)) == 1, err
    return code, error_lines(err)[0]


def test_registry_download_to_a_path_that_cannot_hold_files(two_versions: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("x")
    for dest, says in (("/proc/medft-download", "no folder can be made in /proc"),
                       ("/proc/self/medft", "no folder can be made in /proc/self"),
                       (str(tmp_path / "a-file" / "sub"), "which is a file, not a directory")):
        code, line = _one_line(capsys, ["registry", "download", "med:1", dest])
        assert code == 2 and dest in line and says in line, line
    assert not Path("/proc/medft-download").exists()


def test_compare_image_that_cannot_be_written_is_refused_before_drawing(two_versions: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "scores.png").mkdir()
    for image, says in (("/proc/medft-scores.png", "no folder can be made in /proc"),
                        (str(tmp_path / "scores.png"), "is a directory; give the path of a file")):
        code, line = _one_line(capsys, ["registry", "compare", "med:1", "med:2", "--image", image])
        assert code == 2 and says in line and image in line, line


def test_train_with_a_store_that_cannot_hold_files_stops_before_any_stage(tiny_model_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDFT_STORE", raising=False)
    (tmp_path / "a-file").write_text("x")
    for store, says in (("/proc/medft-store", "output.store /proc/medft-store: no folder can be made in /proc"),
                        (str(tmp_path / "a-file"), "is a file, not a directory")):
        for extra in (["--dry-run"], []):
            code, line = _one_line(capsys, [*job_args(tiny_model_dir, store, "run-x"), *extra])
            assert code == 2 and says in line, line
    assert not (tmp_path / "cache" / "work").exists()


@pytest.mark.parametrize("args, says", [
    (["--base", "hf://org/../../root"], "--base must not contain '.' or '..' path segments"),
    (["--base", "ms://only-one-part"], "--base: 'ms://only-one-part' is not ms://owner/name"),
    (["--base", "hf://org/na me"], "--base 'hf://org/na me' is not hf://org/name"),
    (["--base", "hf://org/name", "--base-revision", "../main"], "--base-revision '../main' is not a commit sha"),
])
def test_a_malformed_base_typed_on_the_command_line_is_a_usage_error(args: list[str], says: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, line = _one_line(capsys, ["eval", *args, "--benchmarks", "medqa"])
    assert code == 2 and says in line and "give --base as hf://org/name" in line, line
