"""Every stage on a base whose tokenizer has the released DeepSeek-R1-Distill-Llama files' shape.

``tokenizer_config.json`` names ``LlamaTokenizerFast`` over a byte-level BPE ``tokenizer.json``: transformers
5 rebuilds that class with a SentencePiece pre-tokenizer and decoder, which loses every space and newline.
``medft data validate`` and ``medft train`` must tokenize it as the file defines, the tokenizer they publish
must reload with plain ``AutoTokenizer``, and a tokenizer that loses text must stop both with exit 2.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from job.data import Row
from job.templates import get_template
from job.tokenizer import PORTABLE_TOKENIZER_CLASS, load_tokenizer
from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.data_factory import sample_records, write_r1_distill_tokenizer
from tests.integration.conftest import job_args, run_medft

LOSSY = {"type": "Sequence", "pretokenizers": [
    {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": False}]}
BOUNDARY = "\n\n### Response:\n<think>\nOkay, let us see."


def _validate(capsys: pytest.CaptureFixture[str], base: str, *extra: str) -> tuple[int, str, list[str]]:
    code, out, err = run_main(["data", "validate", "--set", f"model.base={base}", "--set",
                               "data.source=data/sample.jsonl", "--set", "data.subset=null", "--set",
                               "data.split=train", "--set", "model.max_seq_length=4096", *extra], capsys)
    return code, out, error_lines(err)


def _raw_totals(path: Path) -> list[int]:
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok = load_tokenizer(path)
    template = get_template("r1-medical")
    rows = [Row(r["Question"], r["Complex_CoT"], r["Response"], i) for i, r in enumerate(sample_records())]
    return [len(raw.encode(template.text(r.question, r.reasoning, r.answer, tok)).ids) for r in rows]


def test_data_validate_measures_what_tokenizer_json_encodes(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    base = write_r1_distill_tokenizer(tmp_path / "r1-llama", "llama")
    code, out, errors = _validate(capsys, str(base), "--json")
    assert (code, errors) == (0, [])
    stats = json.loads(out)["token_stats"]["total"]
    totals = _raw_totals(base)
    assert stats["median"] == statistics.median(totals) and stats["max"] == max(totals)


def test_data_validate_stops_on_a_tokenizer_that_loses_text(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    base = write_r1_distill_tokenizer(tmp_path / "lossy", "llama", pre_tokenizer=LOSSY)
    code, out, errors = _validate(capsys, str(base))
    assert code == 2 and out == "" and len(errors) == 1
    assert errors[0].startswith(f"medft: error: model.base {base}: its tokenizer ({base}, loaded as ")
    assert "does not give the text back: the r1-medical template, character 5: expected 'Below is" in errors[0]
    # Statistics alone can be had with the check off (for synthetic tokenizers that cannot round-trip).
    code, _, errors = _validate(capsys, str(base), "--set", "model.tokenizer_check=false")
    assert (code, errors) == (0, [])


def test_data_validate_on_hf_fetches_config_json_with_the_tokenizer(capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    snapshot = write_r1_distill_tokenizer(tmp_path / "snapshot", "llama")
    asked: list[dict] = []

    def snapshot_download(repo_id: str, **kwargs):  # the hub is unreachable here: serve a local snapshot
        asked.append({"repo_id": repo_id, **kwargs})
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    code, out, errors = _validate(capsys, "hf://deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "--json")
    assert (code, errors) == (0, [])
    patterns = asked[0]["allow_patterns"]
    assert asked[0]["repo_id"] == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(patterns)
    assert not any("safetensors" in p for p in patterns)  # no weights for a data report
    assert json.loads(out)["token_stats"]["total"]["median"] == statistics.median(_raw_totals(snapshot))


def test_an_s3_base_lends_its_tokenizer_without_its_weights(s3_bucket: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from job.model import tokenizer_dir
    from tests.data_factory import config_for

    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    local = write_r1_distill_tokenizer(tmp_path / "base", "llama")
    (local / "model.safetensors").write_bytes(b"\0" * 4096)
    base = open_store(s3_bucket).child("bases/r1")
    base.put_dir("", local)
    path = tokenizer_dir(config_for("unused.jsonl", f"model.base={base.uri}"))
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == [
        "config.json", "tokenizer.json", "tokenizer_config.json"]
    tok = load_tokenizer(path)
    assert tok.decode(tok(BOUNDARY, add_special_tokens=False)["input_ids"]) == BOUNDARY


def test_an_interrupted_s3_tokenizer_fetch_leaves_nothing_in_the_cache(s3_bucket: str, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from job.model import tokenizer_dir
    from registry.errors import TransientError
    from registry.store import S3Store
    from tests.data_factory import config_for

    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    base = open_store(s3_bucket).child("bases/r1-cut")
    base.put_dir("", write_r1_distill_tokenizer(tmp_path / "base", "llama"))
    cfg = config_for("unused.jsonl", f"model.base={base.uri}")
    real_get_file = S3Store.get_file

    def cut_off(self: S3Store, key: str, dest: Path, **kw: object) -> object:
        if key.endswith("tokenizer_config.json"):
            raise TransientError(f"{key}: connection reset")
        return real_get_file(self, key, dest, **kw)

    monkeypatch.setattr(S3Store, "get_file", cut_off)
    with pytest.raises(TransientError):
        tokenizer_dir(cfg)
    assert list((tmp_path / "cache" / "s3-tokenizer").iterdir()) == []  # no half entry, no temp folder
    monkeypatch.setattr(S3Store, "get_file", real_get_file)
    assert (tokenizer_dir(cfg) / "tokenizer_config.json").is_file()  # the next run fetches it whole


def test_train_publishes_a_tokenizer_that_reloads_as_trained(tmp_path: Path, job_env: dict[str, str]) -> None:
    from transformers import AutoTokenizer

    base = write_r1_distill_tokenizer(tmp_path / "r1-llama", "llama", weights=True)
    store = str(tmp_path / "store")
    proc = run_medft(*job_args(base, store, "r1-run", "--set", "export.dtype=float32"), env=job_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert names.index("tokenizer.round_trip_ok") < names.index("weights.ready")  # checked before weights
    assert "tokenizer.reload_differs" not in names

    raw = Tokenizer.from_file(str(base / "tokenizer.json"))
    run = open_store(store).child("runs/r1-run")
    for artifact in ("adapter", "merged"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            run.get_file(f"{artifact}/{name}", tmp_path / "got" / artifact / name)
        if artifact == "merged":
            run.get_file("merged/config.json", tmp_path / "got" / "merged" / "config.json")
        got = tmp_path / "got" / artifact
        assert json.loads((got / "tokenizer_config.json").read_text())["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
        reloaded = AutoTokenizer.from_pretrained(got)
        assert reloaded(BOUNDARY)["input_ids"] == raw.encode(BOUNDARY).ids, artifact
        assert reloaded.decode(reloaded(BOUNDARY, add_special_tokens=False)["input_ids"]) == BOUNDARY


def test_train_stops_before_any_weights_move_on_a_tokenizer_that_loses_text(tmp_path: Path,
                                                                            job_env: dict[str, str]) -> None:
    base = write_r1_distill_tokenizer(tmp_path / "lossy", "llama", pre_tokenizer=LOSSY, weights=True)
    proc = run_medft(*job_args(base, str(tmp_path / "store"), "lossy-run"), env=job_env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and f"model.base {base}: its tokenizer" in errors[0]
    events = [json.loads(line)["event"] for line in proc.stderr.splitlines() if line.startswith("{")]
    assert "data.loaded" in events and "weights.ready" not in events
