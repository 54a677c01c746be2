"""Hostile input through the ``medft`` command line: configs, data files, weights, checkpoints, registry records.

Each case goes through the real entry point (``job.cli.main`` in-process, or ``python -m job.cli`` where a
process boundary matters: memory, signals, code that must never run) and asserts the exit code, exactly one
``medft: error:`` line naming what is wrong, and no traceback. Config values and the store's own key checks
are proven by tests/unit/test_config.py and tests/unit/test_store_local.py; these extend them to whole files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from job.checkpoints import COMPLETE, Checkpointer, screen_pickle
from registry.errors import DataError
from registry.registry import Registry
from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.conftest import make_s3_client
from tests.faults import Job
from tests.integration.conftest import ROOT, job_args, medft_cmd, run_medft

FAST = ("--set", "model.max_seq_length=384", "--set", "data.too_long=truncate", "--set", "eval.enabled=false")


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, list[str]]:
    """``medft ARGV`` in-process: (exit code, stdout, the ``medft: error:`` lines); stderr must hold no traceback."""
    code, out, err = run_main(argv, capsys)
    assert "Traceback" not in err, err[-3000:]
    return code, out, error_lines(err)


# ------------------------------------------------------------------------------------------------- configs

def _bomb(levels: int, indent: str = "  ") -> str:
    lines = [f'{indent}l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{indent}l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines)


CONFIG_FILES = {
    "unknown nested key": ("train:\n  max_steps: 3\n  max_stepz: 4\n", "train.max_stepz"),
    "wrong type (a list for an int)": ("lora:\n  r: [16]\n", "lora.r"),
    "negative size": ("train:\n  grad_accum: -2\n", "train.grad_accum"),
    "zero size": ("model:\n  max_seq_length: 0\n", "model.max_seq_length"),
    "trust_remote_code without a pinned revision": ("model:\n  trust_remote_code: true\n  revision: main\n",
                                                    "model.trust_remote_code"),
    "base URI with .. segments": ("model:\n  base: hf://org/../../root/.ssh\n", "model.base"),
    "store URI with .. segments": ("output:\n  store: s3://bucket/../other-team\n", "output.store"),
    "YAML tag that would run code": ('model:\n  base: !!python/object/apply:os.system ["touch MARKER"]\n',
                                     "invalid YAML"),
    "top level is a list": ("- train\n- max_steps\n", "config"),
}


@pytest.mark.parametrize("case", list(CONFIG_FILES))
def test_hostile_config_files_exit_2_naming_the_key(case, tmp_path, capsys):
    text, key = CONFIG_FILES[case]
    marker = tmp_path / "pwned"
    path = tmp_path / "job.yaml"
    path.write_text(text.replace("MARKER", str(marker)))
    code, _, errors = cli(["train", "--config", str(path), "--dry-run"], capsys)
    assert code == 2 and len(errors) == 1 and key in errors[0] and str(path) in errors[0], errors
    assert not marker.exists()


def test_yaml_alias_bomb_is_refused_with_a_short_line(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"  # 7 levels: 9**7 = 4.8 million references to one 3-character string
    path.write_text("x:\n" + _bomb(7) + "\nmodel:\n  base: *l6\n")
    code, _, errors = cli(["train", "--config", str(path), "--dry-run"], capsys)
    assert code == 2 and len(errors) == 1 and "model.base" in errors[0]
    assert len(errors[0]) < 1000, f"the error line is {len(errors[0])} characters long"


# ---------------------------------------------------------------------------------------------------- data

ROW = {"Question": "A 40-year-old with fever?", "Complex_CoT": "Consider infection first.", "Response": "Sepsis."}


def _rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{k: f"{v} ({i})" for k, v in ROW.items()} for i in range(start, start + n)]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows: list[dict], *, extra: str = "") -> bytes:
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return (buf.getvalue() + extra).encode()


_PEAK = ("import resource, sys\nfrom job.cli import main\ntry:\n    main(sys.argv[1:])\nfinally:\n"
         "    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")


def _validate_peak(path: Path) -> tuple[int, int, str]:
    proc = subprocess.run([sys.executable, "-c", _PEAK, "data", "validate", "--no-tokenizer",
                           "--set", f"data.source={path}", "--set", "data.subset=null", "--set", "data.split=train"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEDFT_LOG_FORMAT": "json"})
    peak = int(proc.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])
    return proc.returncode, peak * 1024, proc.stderr


@pytest.mark.parametrize("name, head, row, words", [
    ("huge.jsonl", _jsonl(_rows(3)) + b'{"Question": "', "row 4", "longer than 8 MiB"),
    ("huge.csv", _csv(_rows(3)) + b'"', "row 4", "longer than 8 MiB"),
    ("huge.json", b"[" + json.dumps(ROW).encode() + b', {"Question": "', "row 2", "NUL bytes"),
])
def test_multi_gigabyte_file_is_refused_in_bounded_memory(name, head, row, words, tmp_path):
    path = tmp_path / name
    with path.open("wb") as f:  # 4 GiB as far as any reader can tell (sparse on disk: the rest reads as zeros)
        f.write(head)
        f.truncate(4 * 2**30)
    baseline_code, baseline, _ = _validate_peak(ROOT / "data" / "sample.jsonl")
    code, peak, stderr = _validate_peak(path)
    assert baseline_code == 0 and code == 3, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("medft: error:")]
    assert len(errors) == 1 and str(path) in errors[0] and row in errors[0] and words in errors[0], errors
    assert peak < baseline + 128 * 2**20, f"peak RSS {peak >> 20} MiB vs {baseline >> 20} MiB for the sample"


# ------------------------------------------------------------------------------------------------- weights

class _Payload:
    """Pickles as ``exec(code)`` where code creates ``marker``: proof that it ran if the file appears."""

    def __init__(self, marker: Path, via: object = exec) -> None:
        self.marker, self.via = marker, via

    def __reduce__(self):
        code = f"open({str(self.marker)!r}, 'w').write('pwned')"
        return (self.via, (code,) if self.via is exec else (code, {}))


def _pickle_only_model(src: Path, dest: Path, marker: Path) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dest / f.name).write_bytes(f.read_bytes())
    torch.save({"model.embed_tokens.weight": _Payload(marker)}, dest / "pytorch_model.bin")
    return dest


def test_pickle_only_weights_are_refused_before_anything_loads(tiny_model_dir, tmp_path):
    marker = tmp_path / "pwned"
    model = _pickle_only_model(tiny_model_dir, tmp_path / "model", marker)
    env = {**os.environ, "MEDFT_CACHE": str(tmp_path / "cache"), "MEDFT_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1"}
    proc = run_medft(*job_args(model, str(tmp_path / "store"), "run-pickle", *FAST), env=env, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("medft: error:")]
    assert len(errors) == 1 and "only pickle weights (pytorch_model.bin)" in errors[0] and str(model) in errors[0]
    assert "Traceback" not in proc.stderr and '"stage": "load"' not in proc.stderr  # refused in pull
    assert not marker.exists()


def _lie(path: Path, how: str) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    if how == "header length past the end of the file":
        path.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
        return
    if how == "shape larger than its bytes":
        header[name]["shape"] = [4096, 4096]
    elif how == "offsets past the end of the data":
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start + len(raw), end + len(raw)]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("how", ["shape larger than its bytes", "offsets past the end of the data",
                                 "header length past the end of the file"])
def test_safetensors_whose_header_lies_is_refused(how, tiny_model_dir, tmp_path, capsys, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    _lie(model / "model.safetensors", how)
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, errors = cli(job_args(model, str(tmp_path / "store"), "run-lie", *FAST), capsys)
    assert code == 3 and len(errors) == 1, errors
    assert str(model / "model.safetensors") in errors[0], errors
    assert "corrupt" in errors[0] or "lies about sizes" in errors[0], errors


# ---------------------------------------------------------------------------------------------- checkpoints

def _tamper(run_store, ckpt_key: str, rel: str, data: bytes, *, fix_sha: bool) -> None:
    run_store.put_bytes(f"{ckpt_key}/{rel}", data)
    if fix_sha:  # so that only the pickle screen can catch it
        doc = json.loads(run_store.get_bytes(f"{ckpt_key}/{COMPLETE}")[0])
        doc["files"][rel] = hashlib.sha256(data).hexdigest()
        run_store.delete(f"{ckpt_key}/{COMPLETE}")
        run_store.put_bytes(f"{ckpt_key}/{COMPLETE}", json.dumps(doc).encode())


def test_checkpoint_with_a_crafted_rng_pickle_is_refused_before_it_runs(tiny_model_dir, tmp_path, job_env):
    store_uri = str(tmp_path / "store")
    args = job_args(tiny_model_dir, store_uri, "run-rng", *FAST, "--set", "train.max_steps=30",
                    "--set", "train.checkpoint_every=100", "--set", "export.merge=false")
    job = Job(medft_cmd(*args), cwd=ROOT, env=job_env)
    job.wait_for("train.progress", step=lambda s: s >= 2)
    job.kill(signal.SIGTERM)
    assert job.wait() == 143, job.stderr[-3000:]
    run = open_store(store_uri).child("runs/run-rng")
    ref = Checkpointer(run).latest()
    assert ref is not None and "rng_state.pth" in ref.files
    # A gadget under a module a checkpoint legitimately names (numpy): it runs code when unpickled, and the
    # screen used to let it through because it checked the top-level module only.
    import numpy.testing._private.utils as numpy_utils

    marker = tmp_path / "pwned"
    path = tmp_path / "rng_state.pth"
    torch.save({"cpu": torch.get_rng_state(), "python": _Payload(marker, numpy_utils.runstring)}, path)
    _tamper(run, ref.key, "rng_state.pth", path.read_bytes(), fix_sha=True)
    restart = run_medft(*args, env=job_env, timeout=180)
    assert restart.returncode == 3, restart.stderr[-3000:]
    errors = [line for line in restart.stderr.splitlines() if line.startswith("medft: error:")]
    assert len(errors) == 1 and "rng_state.pth" in errors[0], errors
    assert "'numpy.testing._private.utils.runstring'" in errors[0], errors
    assert "Traceback" not in restart.stderr and '"train.progress"' not in restart.stderr
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: loaded without the screen, it runs
    assert marker.exists()


def test_pickle_screen_sees_through_memo_tricks_polyglots_and_tampering(tmp_path):
    marker = tmp_path / "pwned"
    # os.system hidden behind memoized strings, with harmless names pushed last
    memo = (b"\x80\x04\x8c\x02os\x940\x8c\x06system\x940\x8c\x0bcollections\x8c\x0bOrderedDict00"
            b"h\x00h\x01\x93\x8c\x04true\x85R.")
    (tmp_path / "memo.pth").write_bytes(memo)
    legit = tmp_path / "legit.pth"
    torch.save({"cpu": torch.get_rng_state()}, legit)
    # a pickle that torch.load reads (it does not start with PK) followed by a harmless zip archive
    (tmp_path / "polyglot.pth").write_bytes(pickle.dumps(_Payload(marker)) + legit.read_bytes())
    for name, needle in (("memo.pth", "'os.system'"), ("polyglot.pth", "'builtins.exec'")):
        with pytest.raises(DataError) as e:
            screen_pickle(tmp_path / name)
        assert needle in e.value.message and "\n" not in e.value.message
    screen_pickle(legit)
    # a changed byte without a matching COMPLETE.json fails its checksum before any pickle is looked at
    store = open_store(str(tmp_path / "store"))
    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "rng_state.pth").write_bytes(legit.read_bytes())
    ref = Checkpointer(store).upload(local, 1)
    store.put_bytes(f"{ref.key}/rng_state.pth", memo)
    with pytest.raises(DataError, match="checksum mismatch"):
        Checkpointer(store).restore(ref, tmp_path / "restore")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ registry

def _all_keys(endpoint: str, store_uri: str) -> dict[str, str]:
    bucket = store_uri.removeprefix("s3://").split("/")[0]
    pages = make_s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}


RECORD_EDITS = {
    "a required field removed": (lambda d: d.pop("run_uri"), "lacks the required field 'run_uri'"),
    "version as a string": (lambda d: d.update(version="1"), "field 'version' must be a positive integer"),
    "artifacts as a list": (lambda d: d.update(artifacts=["merged"]), "field 'artifacts' must be an object"),
    "record for another model": (lambda d: d.update(name="other"), "misplaced"),
}


def test_hand_edited_registry_records_and_path_refs_exit_3_or_4_and_write_nothing(
        s3_server, s3_bucket, publish_sample_run, tmp_path, capsys, monkeypatch):
    import logging

    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)  # moto's access log, not medft's output
    run_uri = publish_sample_run(s3_bucket, "run-1")
    registry = Registry.open(s3_bucket + "/registry")
    registry.register("med", run_uri, aliases=["prod"])
    versions = registry.store  # models/med/versions/1.json lives here
    good = versions.get_bytes("models/med/versions/1.json")[0]
    outcomes = []
    for case, (edit, needle) in RECORD_EDITS.items():
        doc = json.loads(good)
        edit(doc)
        versions.put_bytes("models/med/versions/1.json", json.dumps(doc).encode())
        before = _all_keys(s3_server, s3_bucket)
        for argv in (["registry", "show", "med:1"], ["registry", "show", "med@prod"], ["registry", "list"],
                     ["registry", "download", "med:1", str(tmp_path / "dl")]):
            code, _, errors = cli([*argv, "--store", s3_bucket], capsys)
            outcomes.append((case, argv[1], code))
            assert code == 3 and len(errors) == 1 and needle in errors[0], (case, argv, errors)
            assert "models/med/versions/1.json" in errors[0]
        assert _all_keys(s3_server, s3_bucket) == before and not (tmp_path / "dl").exists()
    versions.put_bytes("models/med/versions/1.json", good)
    versions.put_bytes("models/med/aliases.json", json.dumps({"aliases": {"prod": "../../../etc"}}).encode())
    code, _, errors = cli(["registry", "show", "med@prod", "--store", s3_bucket], capsys)
    assert code == 3 and "aliases.json is corrupt" in errors[0]
    versions.put_bytes("models/med/aliases.json", json.dumps({"aliases": {"prod": 1}}).encode())

    before = _all_keys(s3_server, s3_bucket)
    for ref in ("../../etc/passwd", "med/../../other:1", "..\\..\\med", "med:1/../2", "/med", "med@../../x",
                "med:../1"):
        for argv in (["registry", "show", ref], ["registry", "resolve", ref],
                     ["registry", "download", ref, "/nonexistent-dest"]):
            code, _, errors = cli([*argv, "--store", s3_bucket], capsys)
            assert code == 4 and len(errors) == 1 and repr(ref) in errors[0], (argv, errors)
    for argv in (["registry", "alias", "../../evil", "1", "prod"], ["registry", "alias", "med", "1", "a/b"],
                 ["registry", "register", "x/../../y", run_uri]):
        code, _, errors = cli([*argv, "--store", s3_bucket], capsys)
        assert code == 2 and len(errors) == 1, (argv, errors)  # a bad name is a usage error
    assert _all_keys(s3_server, s3_bucket) == before  # nothing written anywhere, inside the prefix or out
    assert not Path("/nonexistent-dest").exists()

    # and once as a real process: a corrupt record is one line and exit 3, no traceback
    doc = json.loads(good)
    del doc["artifacts"]
    versions.put_bytes("models/med/versions/1.json", json.dumps(doc).encode())
    proc = subprocess.run(medft_cmd("registry", "show", "med:1", "--store", s3_bucket), check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("medft: error:") and "'artifacts'" in proc.stderr
