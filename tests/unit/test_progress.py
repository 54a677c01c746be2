"""Progress plumbing without a terminal: stores report bytes to the Progress passed down, the loss curve's
picture and numbers, rounded numbers for people."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from registry import progress
from registry.progress import NO_PROGRESS, Progress
from registry.store import LocalStore, MiB
from tests.progress_recorder import RecordingProgress


def _files(root: Path) -> dict[str, int]:
    sizes = {"a.bin": 3 * MiB + 7, "sub/b.txt": 1000, "sub/c.json": 10}
    for rel, size in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return sizes


def test_local_store_reports_every_byte_of_a_directory_to_one_task(tmp_path: Path) -> None:
    sizes = _files(tmp_path / "src")
    recorder = RecordingProgress()
    assert isinstance(recorder, Progress)
    store = LocalStore(tmp_path / "store", progress=recorder)
    store.child("runs").put_dir("adapter", tmp_path / "src")  # a child store reports to the same progress
    [up] = recorder.tasks
    assert up.description == "upload adapter" and up.in_bytes and up.closed
    assert up.total == up.done == sum(sizes.values())

    store.get_dir("runs/adapter", tmp_path / "back")
    [_, down] = recorder.tasks
    assert down.description == "download runs/adapter" and down.closed
    assert down.total == down.done == sum(sizes.values())


def test_single_files_get_a_bar_only_when_large(tmp_path: Path) -> None:
    sizes = _files(tmp_path / "src")
    recorder = RecordingProgress()
    store = LocalStore(tmp_path / "store", progress=recorder)
    store.put_file("small.txt", tmp_path / "src" / "sub" / "b.txt")
    store.put_bytes("LEASE.json", b"{}")
    assert recorder.tasks == []  # a lease or a config file is no progress worth a bar
    store.put_file("big.bin", tmp_path / "src" / "a.bin")
    store.get_file("big.bin", tmp_path / "big.bin")
    assert [(t.description, t.done, t.closed) for t in recorder.tasks] == [
        ("upload big.bin", sizes["a.bin"], True), ("download big.bin", sizes["a.bin"], True)]


def test_stores_use_the_process_progress_and_no_progress_shows_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    _files(tmp_path / "src")
    recorder = RecordingProgress()
    monkeypatch.setattr(progress, "_current", recorder)
    LocalStore(tmp_path / "store").put_dir("x", tmp_path / "src")
    assert len(recorder.tasks) == 1 and recorder.tasks[0].done == recorder.tasks[0].total
    monkeypatch.setattr(progress, "_current", NO_PROGRESS)
    LocalStore(tmp_path / "store2").put_dir("x", tmp_path / "src")
    assert capsys.readouterr() == ("", "")


def test_configure_shows_bars_only_on_a_terminal_with_readable_logs() -> None:
    code = ("import sys; from registry import logs, progress; logs.configure(json_logs={json}); "
            "print(type(progress.current()).__name__)")
    for json_logs in (None, True, False):  # stdout and stderr are pipes here: never a terminal
        proc = subprocess.run([sys.executable, "-c", code.format(json=json_logs)], capture_output=True, text=True)
        assert proc.stdout.strip() == "NoProgress", proc.stderr


def test_console_logs_round_numbers_and_json_logs_keep_every_digit() -> None:
    code = ("from registry import logs; logs.configure(json_logs={json}); "
            "logs.get_logger('t').info('eval.done', eval_loss=3.2141592653589793, nested={{'lr': 0.000123456}}, n=3)")
    console = subprocess.run([sys.executable, "-c", code.format(json=False)], capture_output=True, text=True)
    assert "eval_loss=3.214" in console.stderr and "3.21415" not in console.stderr
    assert "'lr': 0.0001235" in console.stderr and "n=3" in console.stderr
    raw = subprocess.run([sys.executable, "-c", code.format(json=True)], capture_output=True, text=True)
    event = json.loads(raw.stderr.strip().splitlines()[-1])
    assert event["eval_loss"] == 3.2141592653589793 and event["nested"]["lr"] == 0.000123456


def test_loss_curve_png_and_numbers(tmp_path: Path) -> None:
    from PIL import Image

    from job import loss_curve

    history = [{"step": 2, "loss": 6.5}, {"step": 4, "loss": float("nan")}, {"step": 6, "loss": 5.25}]
    curve = loss_curve.series(history, 6.75, 5.0, 6)
    assert curve["train"] == [{"step": 2, "loss": 6.5}, {"step": 4, "loss": None}, {"step": 6, "loss": 5.25}]
    assert curve["eval"] == [{"step": 0, "loss": 6.75}, {"step": 6, "loss": 5.0}]
    assert loss_curve.series(history, None, None, 6)["eval"] == []  # no eval rows: no points
    dirs = [tmp_path / "adapter", tmp_path / "merged"]
    for d in dirs:
        d.mkdir()
    loss_curve.write(curve, dirs)
    png = (tmp_path / "adapter" / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert struct.unpack(">II", png[16:24]) == (640, 360)
    assert 5_000 < len(png) < 300_000
    with Image.open(tmp_path / "adapter" / "loss.png") as image:
        image.verify()
    with Image.open(tmp_path / "adapter" / "loss.png") as image:
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20  # lines and text, not a blank canvas
    assert (tmp_path / "merged" / "loss.png").read_bytes() == png  # the same curve, the same file
    assert json.loads((tmp_path / "merged" / "loss.json").read_text()) == curve
    loss_curve.write(curve, [tmp_path / "merged"])
    assert (tmp_path / "merged" / "loss.png").read_bytes() == png  # no timestamp inside


def test_model_card_shows_the_loss_curve() -> None:
    from job.config import load_config
    from job.model_card import model_card

    cfg = load_config(None, ())
    lineage = {"base_model": {"uri": "hf://org/base", "revision": "abc"},
               "dataset": {"source": "data/sample.jsonl", "rows": 4, "content_sha256": "0" * 64}}
    card = model_card(cfg, lineage, {"eval_loss_before": 3.2141592}, {}, loss_image="loss.png",
                      loss_series="loss.json")
    assert "## Loss curve\n\n![Train and eval loss per step](loss.png)" in card
    assert "[`loss.json`](loss.json)" in card and "before training (step 0)" in card
    assert "| eval_loss_before | 3.214 |" in card
    assert "Loss curve" not in model_card(cfg, lineage, {}, {})
