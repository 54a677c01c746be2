"""Running ``medft`` in a real terminal (a pseudo-terminal from Python's ``pty``: nothing to install) and reading
back what a person would see, as text: a screenshot-like capture.

The command's stdout and stderr are both the terminal, as in an interactive shell, so the capture shows the
order in which a person reads them. Colours are removed and each carriage return rewinds its line (progress
bars redraw in place), so the capture holds each line's final state.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]")
_CLOCK = re.compile(r"^\d\d:\d\d:\d\d ", re.M)


def render(raw: str) -> str:
    """What the terminal shows for ``raw`` output: escape codes dropped, ``\\r`` rewinding its line."""
    lines = []
    for line in _ANSI.sub("", raw).replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):  # each carriage return writes over the start of the line
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return "\n".join(lines).strip("\n")


def without_clock(screen: str) -> str:
    """``screen`` with each log line's ``HH:MM:SS`` replaced by ``hh:mm:ss``, for comparing whole captures."""
    return _CLOCK.sub("hh:mm:ss ", screen)


def run_in_terminal(*args: str, env: dict[str, str], columns: int = 100, rows: int = 40,
                    timeout: float = 120) -> tuple[int, str]:
    """``medft ARGS`` with a terminal as its stdin, stdout and stderr: (exit code, the rendered screen)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {**env, "COLUMNS": str(columns), "LINES": str(rows), "TERM": "xterm-256color"}
    # The terminal decides, as it does for a person; bar switches an in-process CLI call of the test session
    # may have left in os.environ (JSON logs set them) would hide what is being checked.
    for name in ("MEDFT_LOG_FORMAT", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "job.cli", *args], cwd=ROOT, env=env, stdin=child,
                            stdout=child, stderr=child, close_fds=True)
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    data = os.read(main, 65536)
                except OSError:  # the child closed the terminal (EIO on Linux)
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    return code, render(b"".join(chunks).decode("utf-8", errors="replace"))
