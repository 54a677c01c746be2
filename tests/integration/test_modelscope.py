"""ms:// sources through the real modelscope client, against a ModelScope hub served on 127.0.0.1 by the test
(tests/ms_endpoint.py): downloads, pins, cache hits with the network gone, lineage, and every failure's exit code.

Every test routes any other host to a proxy that refuses and records it, and asserts nothing reached it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import socket
from pathlib import Path

import pytest

from job import model as model_stage
from job.data.sources import load_rows
from job.modelscope import OFFLINE_ENV
from registry.errors import AccessDeniedError, ConfigError, NotFoundError, TransientError
from registry.uris import ms_repo_id, parse_uri
from tests.cli import error_lines, run_main
from tests.data_factory import SAMPLE, config_for, records, write_json_list, write_r1_distill_tokenizer
from tests.ms_endpoint import MsEndpoint, local_modelscope

MODEL = "deepseek-ai/Tiny-R1-Distill"
DATASET = "FreedomIntelligence/medical-o1-reasoning-SFT"
PIN = "5f1c0e7a9b3d2c4e6f8a0b1c2d3e4f5a6b7c8d9e"
# The dataset card's configs, as the published dataset names its files.
CARD = ("---\nlicense: apache-2.0\nconfigs:\n- config_name: en\n  data_files: medical_o1_sft.json\n"
        "- config_name: zh\n  data_files: medical_o1_sft_Chinese.json\n---\n# medical-o1-reasoning-SFT\n")


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The local hub, with the environment a user sets (MODELSCOPE_ENDPOINT) and every other host trapped."""
    with local_modelscope() as (endpoint, trap):
        for key in ("MODELSCOPE_CACHE", "MODELSCOPE_API_TOKEN", "MODELSCOPE_DOMAIN", OFFLINE_ENV):
            monkeypatch.delenv(key, raising=False)
        env = {"MODELSCOPE_ENDPOINT": endpoint.endpoint, "MODELSCOPE_HOME": str(tmp_path / "ms-home"),
               "MEDFT_CACHE": str(tmp_path / "cache"), "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env[key] = trap.url
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        yield endpoint
        assert trap.requests == [], f"a request left for another host: {trap.requests}"
    assert all(host.startswith("127.0.0.1:") for host, _ in endpoint.requests)


def _model_files(tmp_path: Path) -> Path:
    """A tiny R1-shaped model repository, plus what a hostile repository adds: a pickle and code."""
    src = write_r1_distill_tokenizer(tmp_path / "repo", "llama", weights=True)
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": "a pickle runs code when loaded"}))
    (src / "modeling_tiny.py").write_text("raise SystemExit('remote code ran')\n")
    return src


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- URIs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["ms://Qwen/Qwen2.5-0.5B-Instruct", "ms://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B/",
                                 "ms://a_b/c.d"])
def test_ms_repo_id_accepts_owner_and_name(uri):
    assert ms_repo_id(parse_uri(uri)) == uri.removeprefix("ms://").rstrip("/")


@pytest.mark.parametrize("uri", ["ms://Qwen", "ms://a/b/c", "ms://../b", "ms://a/..", "ms://a/.hidden", "ms://a b/c",
                                 "ms:///b", "ms://"])
def test_malformed_ms_uris_are_config_errors(uri, capsys):
    with pytest.raises(ValueError, match="ms://owner/name"):
        ms_repo_id(parse_uri(uri))
    for key in ("model.base", "data.source"):
        code, _, err = run_main(["data", "validate", "--set", f"{key}={uri}", "--no-tokenizer"], capsys)
        assert code == 2 and len(error_lines(err)) == 1 and key in err, err


def test_trust_remote_code_is_refused_for_an_ms_base_even_pinned():
    with pytest.raises(ConfigError, match="model.trust_remote_code"):
        config_for(SAMPLE, f"model.base=ms://{MODEL}", f"model.revision={PIN}", "model.trust_remote_code=true")


# --- models --------------------------------------------------------------------------------------------


def test_model_pull_fetches_tokenizer_first_then_safetensors_only_and_records_lineage(hub: MsEndpoint, tmp_path):
    src = _model_files(tmp_path)
    hub.add("model", MODEL, src, revision=PIN)
    cfg = config_for(SAMPLE, f"model.base=ms://{MODEL}", f"model.revision={PIN}")

    tok_dir = model_stage.tokenizer_dir(cfg)
    assert sorted(hub.downloads()) == ["config.json", "generation_config.json", "tokenizer.json",
                                       "tokenizer_config.json"]  # no weights yet
    assert model_stage.load_tokenizer(tok_dir, cfg).eos_token == "<｜end▁of▁sentence｜>"

    weights = model_stage.pull_weights(f"ms://{MODEL}", PIN)
    assert weights.path.is_relative_to(tmp_path / "cache" / "ms")
    assert "pytorch_model.bin" not in hub.downloads() and "modeling_tiny.py" not in hub.downloads()
    assert not list(weights.path.glob("*.bin")) and not list(weights.path.glob("*.py"))
    assert weights.lineage() == {"uri": f"ms://{MODEL}", "revision": PIN,
                                 "sha256": {"model.safetensors": _sha(src / "model.safetensors")}}
    # Another revision is another snapshot: a pin never reads a different revision's files.
    assert weights.path.name == PIN


def test_cached_model_is_used_with_the_network_gone(hub: MsEndpoint, tmp_path, monkeypatch):
    src = _model_files(tmp_path)
    hub.add("model", MODEL, src)
    first = model_stage.pull_weights(f"ms://{MODEL}", None)
    served = len(hub.requests)

    monkeypatch.setenv(OFFLINE_ENV, "1")  # no request at all
    offline = model_stage.pull_weights(f"ms://{MODEL}", None)
    assert len(hub.requests) == served
    assert offline.path == first.path and offline.files == first.files

    monkeypatch.delenv(OFFLINE_ENV)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", _closed_port())  # unreachable: falls back to the same snapshot
    unreachable = model_stage.pull_weights(f"ms://{MODEL}", None)
    assert unreachable.files == first.files == {"model.safetensors": _sha(src / "model.safetensors")}


def test_cached_snapshot_missing_a_shard_is_not_used(hub: MsEndpoint, tmp_path, monkeypatch):
    hub.add("model", MODEL, _model_files(tmp_path))
    weights = model_stage.pull_weights(f"ms://{MODEL}", None)
    (weights.path / "model.safetensors").unlink()
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(NotFoundError, match="not a whole model") as e:
        model_stage.pull_weights(f"ms://{MODEL}", None)
    assert e.value.exit_code == 4


@pytest.mark.parametrize("status, error, code", [(404, NotFoundError, 4), (401, AccessDeniedError, 5),
                                                 (403, AccessDeniedError, 5), (500, TransientError, 75)])
def test_model_pull_failures_map_to_exit_codes(hub: MsEndpoint, status, error, code):
    hub.fail[MODEL] = status
    with pytest.raises(error) as e:
        model_stage.pull_weights(f"ms://{MODEL}", None)
    assert e.value.exit_code == code and "\n" not in e.value.message and f"ms://{MODEL}" in e.value.message
    if status in (401, 403):
        assert "MODELSCOPE_API_TOKEN" in e.value.message


def test_unknown_revision_is_not_found(hub: MsEndpoint, tmp_path):
    hub.add("model", MODEL, _model_files(tmp_path))
    with pytest.raises(NotFoundError, match=f"revision {PIN}"):
        model_stage.pull_weights(f"ms://{MODEL}", PIN)


def test_train_with_a_missing_ms_base_exits_4_before_weights_move(hub: MsEndpoint, tmp_path, capsys):
    code, _, err = run_main(["train", "--set", f"model.base=ms://{MODEL}", "--set", "model.backend=hf",
                             "--set", "data.source=data/sample.jsonl", "--set", "data.subset=null",
                             "--set", "data.split=train", "--set", f"output.store={tmp_path / 'store'}",
                             "--set", "output.run_id=ms-missing"], capsys)
    assert code == 4, err
    assert len(error_lines(err)) == 1 and f"ms://{MODEL}" in err and "not found on ModelScope" in err


# --- data ----------------------------------------------------------------------------------------------


def _dataset_files(tmp_path: Path) -> tuple[Path, list[dict]]:
    rows = records(12)
    repo = tmp_path / "dataset"
    repo.mkdir()
    (repo / "README.md").write_text(CARD)
    write_json_list(repo / "medical_o1_sft.json", rows)
    write_json_list(repo / "medical_o1_sft_Chinese.json", records(3, start=100))
    (repo / "loader.py").write_text("raise SystemExit('dataset code ran')\n")
    (repo / "extra.pkl").write_bytes(pickle.dumps(rows))
    return repo, rows


def test_dataset_pull_reads_the_card_config_and_records_the_revision(hub: MsEndpoint, tmp_path, monkeypatch):
    repo, rows = _dataset_files(tmp_path)
    hub.add("dataset", DATASET, repo, revision="v2")
    cfg = config_for(f"ms://{DATASET}", "data.subset=en", "data.split=train", "data.revision=v2",
                     f"data.cache_dir={tmp_path / 'datasets'}")
    loaded, identity, report = load_rows(cfg)
    assert [r.question for r in loaded] == [r["Question"] for r in rows]
    assert (identity.source, identity.revision, identity.subset, identity.split) == (f"ms://{DATASET}", "v2",
                                                                                     "en", "train")
    assert identity.rows == 12 and report.rows_read == 12
    assert "loader.py" not in hub.downloads() and "extra.pkl" not in hub.downloads()

    served = len(hub.requests)
    monkeypatch.setenv(OFFLINE_ENV, "1")
    again, identity_offline, _ = load_rows(cfg)
    assert len(hub.requests) == served and identity_offline == identity and len(again) == 12


def _validate(capsys, *sets: str) -> tuple[int, str]:
    args = ["data", "validate", "--no-tokenizer", "--set", f"data.source=ms://{DATASET}", "--set", "data.subset=en",
            "--set", "data.split=train"]
    for item in sets:
        args += ["--set", item]
    code, _, err = run_main(args, capsys)
    assert len(error_lines(err)) == 1, err
    return code, err


@pytest.mark.parametrize("status, code, hint", [(404, 4, "not found on ModelScope"), (401, 5, "MODELSCOPE_API_TOKEN"),
                                                (403, 5, "MODELSCOPE_API_TOKEN"), (500, 75, "retry later")])
def test_data_validate_maps_hub_answers_to_exit_codes(hub: MsEndpoint, capsys, status, code, hint):
    hub.fail[DATASET] = status
    got, err = _validate(capsys)
    assert got == code and hint in err and "data.source" in err, err


def test_data_validate_offline_with_nothing_cached_exits_4_with_a_hint(hub: MsEndpoint, capsys, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    code, err = _validate(capsys)
    assert code == 4 and OFFLINE_ENV in err and "MODELSCOPE_CACHE" in err, err
    assert hub.requests == []


def test_data_validate_with_the_hub_unreachable_and_nothing_cached_exits_75(hub: MsEndpoint, capsys, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", _closed_port())
    code, err = _validate(capsys)
    assert code == 75 and "retry later" in err, err


@pytest.mark.parametrize("endpoint", ["http://[::1", "ftp://127.0.0.1",
                                      "http://medft:ms-secret-4d1c@127.0.0.1:x/?token=ms-secret-4d1c"])
def test_a_malformed_endpoint_is_exit_2_not_a_hub_outage(hub: MsEndpoint, capsys, monkeypatch, endpoint):
    """A setting that can never work is a usage error (a Job must not retry it), and quotes no credential."""
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", endpoint)
    code, err = _validate(capsys)
    assert code == 2 and "MODELSCOPE_ENDPOINT" in err and "http(s)://host" in err, err
    assert "ms-secret-4d1c" not in err and hub.requests == []


def test_dataset_subset_missing_from_the_card_is_a_config_error(hub: MsEndpoint, tmp_path, capsys):
    repo, _ = _dataset_files(tmp_path)
    hub.add("dataset", DATASET, repo)
    code, err = _validate(capsys, "data.subset=fr", f"data.cache_dir={tmp_path / 'datasets'}")
    assert code == 2 and "data.subset" in err, err


def test_lineage_is_json_ready(hub: MsEndpoint, tmp_path):
    hub.add("model", MODEL, _model_files(tmp_path), revision=PIN)
    lineage = model_stage.pull_weights(f"ms://{MODEL}", PIN).lineage()
    assert json.loads(json.dumps(lineage)) == lineage
