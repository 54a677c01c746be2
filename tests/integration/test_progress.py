"""Progress a person can watch: the tiny-model job under a pseudo-terminal shows bars and rounded numbers; the
same job with stderr on a pipe writes JSON lines only, and publishes its loss curve; S3 transfers report bytes."""

from __future__ import annotations

import fcntl
import json
import os
import re
import struct
import subprocess
import termios
import threading
from pathlib import Path

from registry.runs import read_manifest
from registry.store import MiB, S3Store, TransferSettings, open_store
from tests.integration.conftest import ROOT, job_args, medft_cmd, run_medft
from tests.progress_recorder import RecordingProgress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _env(job_env: dict[str, str]) -> dict[str, str]:
    """The job's environment with the log format left to detection and nothing switching bars off."""
    return {k: v for k, v in job_env.items()
            if k != "MEDFT_LOG_FORMAT" and not k.startswith("TQDM_") and "PROGRESS_BARS" not in k}


def _run_on_terminal(args: list[str], env: dict[str, str], timeout: float = 300) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (160 columns); (exit code, stdout, what the terminal got)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(medft_cmd(*args), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, out.decode(), ANSI.sub("", b"".join(chunks).decode(errors="replace"))


def test_a_terminal_shows_bars_for_every_stage_and_rounded_numbers(tiny_model_dir, job_env, tmp_path):
    store = str(tmp_path / "store")
    code, out, terminal = _run_on_terminal(job_args(tiny_model_dir, store, "run-tty"), _env(job_env))
    assert code == 0, terminal[-3000:]
    screens = re.split(r"[\r\n]+", terminal)
    # training: the step counter reaches the last step, with loss, tokens/s and the ETA column
    assert any(re.match(r"train: 100%\|.*\| 6/6 \[\d\d:\d\d<\d\d:\d\d, .*loss=\d+\.\d{1,3}\b.*tokens_per_s=\d+", s)
               for s in screens), terminal[-3000:]
    assert any(re.match(r"train:\s+\d+%\|.*\| [1-5]/6 ", s) for s in screens)  # and was seen on its way there
    for bar in (r"eval loss before: 100%\|.*\| 4/4 ", r"eval loss after: 100%\|.*\| 4/4 ", r"merge: 100%\|.*\| 1/1 "):
        assert any(re.match(bar, s) for s in screens), bar
    # uploads: bytes done of bytes in all, and a rate
    uploads = [s for s in screens if re.match(r"upload (adapter|merged): 100%\|.*\| ([\d.]+[kMG]?)/\2 \[.*B/s\]", s)]
    assert {u.split(":")[0] for u in uploads} == {"upload adapter", "upload merged"}, terminal[-3000:]
    # readable log lines instead of JSON, their numbers rounded; the summary too
    assert not any(s.startswith("{") for s in screens)
    metrics = json.loads((tmp_path / "store" / "runs" / "run-tty" / "metrics.json").read_text())
    before, after = metrics["eval_loss_before"], metrics["eval_loss_after"]
    assert f"eval_loss={float(f'{before:.4g}')}" in terminal and repr(before) not in terminal
    assert f"eval loss {before:.3f} -> {after:.3f}\n" in out


def test_off_a_terminal_only_json_and_the_run_publishes_its_loss_curve(tiny_model_dir, s3_bucket, job_env, tmp_path):
    proc = run_medft(*job_args(tiny_model_dir, s3_bucket, "run-pipe"), env=_env(job_env))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "%|" not in proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is a JSON event
    manifest = read_manifest(open_store(s3_bucket), "run-pipe")
    metrics = manifest["metrics"]
    before, after = metrics["eval_loss_before"], metrics["eval_loss_after"]
    # JSON keeps every digit; the summary for people is rounded
    assert [e["eval_loss"] for e in events if e["event"] == "eval.done"] == [before, after]
    assert f"eval loss {before:.3f} -> {after:.3f}\n" in proc.stdout
    assert repr(before) not in proc.stdout

    store = open_store(s3_bucket).child("runs/run-pipe")
    for artifact in ("adapter", "merged"):
        for name in ("loss.png", "loss.json", "README.md"):
            assert f"{artifact}/{name}" in manifest["files"], (artifact, name)
        png = tmp_path / artifact / "loss.png"
        store.get_file(f"{artifact}/loss.png", png, sha256=manifest["files"][f"{artifact}/loss.png"]["sha256"])
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (640, 360)
        assert 5_000 < len(data) < 300_000
        card, _ = store.get_bytes(f"{artifact}/README.md")
        assert "![Train and eval loss per step](loss.png)" in card.decode()
        curve = json.loads(store.get_bytes(f"{artifact}/loss.json")[0])
        assert curve["train"] == [{"step": h["step"], "loss": h["loss"]} for h in metrics["loss_history"]]
        assert [p["step"] for p in curve["train"]] == [1, 2, 3, 4, 5, 6]
        assert curve["eval"] == [{"step": 0, "loss": before}, {"step": 6, "loss": after}]


def test_s3_multipart_upload_and_ranged_download_report_every_byte(s3_bucket: str, tmp_path: Path) -> None:
    recorder = RecordingProgress()
    bucket, prefix = s3_bucket.removeprefix("s3://").split("/", 1)
    store = S3Store(bucket, prefix, transfer=TransferSettings(part_size=5 * MiB, concurrency=3),
                    progress=recorder)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 * MiB + 3))
    store.put_file("big.bin", src)  # three parts
    store.get_file("big.bin", tmp_path / "back.bin")  # three ranges
    up, down = recorder.tasks
    assert (up.description, down.description) == ("upload big.bin", "download big.bin")
    assert up.total == up.done == down.total == down.done == src.stat().st_size
    assert sorted(up.advances) == sorted(down.advances) == [2 * MiB + 3, 5 * MiB, 5 * MiB]

    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "small.json").write_text("{}")
    store.child("runs").put_dir("adapter", tmp_path / "dir")
    store.get_dir("runs/adapter", tmp_path / "dir-back")
    assert [(t.description, t.total, t.done) for t in recorder.tasks[2:]] == [
        ("upload adapter", 2, 2), ("download runs/adapter", 2, 2)]
