"""Running ``medft`` in-process through its real entry point, for tests that need no subprocess."""

from __future__ import annotations

import pytest

from job.cli import main


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``medft ARGV`` through ``job.cli.main``: (exit code, stdout, stderr)."""
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr: str) -> list[str]:
    """The one-line ``medft: error: ...`` messages in ``stderr``."""
    return [line for line in stderr.splitlines() if line.startswith("medft: error:")]
