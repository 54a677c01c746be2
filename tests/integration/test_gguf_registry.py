"""The ``gguf`` artifact through the registry: ``resolve``/``download --artifact gguf`` carry it, every file
checked by sha256, and ``generate``/``eval`` refuse it with one line (they load safetensors, not GGUF)."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from registry.registry import Registry
from registry.store import open_store
from tests import cli
from tests.conftest import SAMPLE_RECORD

MODELFILE = 'FROM ./med-q8_0.gguf\nTEMPLATE """Q: {{ .Prompt }}\n<think>\n"""\nPARAMETER temperature 0.6\n'


@pytest.fixture
def gguf_version(tmp_path: Path, sample_run_dir: Path, publish_sample_run: Callable[..., str],
                 monkeypatch: pytest.MonkeyPatch) -> str:
    """med:1 from a run that published gguf/ beside merged/ and adapter/; returns the run URI."""
    store = str(tmp_path / "store")
    monkeypatch.setenv("MEDFT_STORE", store)
    monkeypatch.delenv("MEDFT_REGISTRY", raising=False)
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    (sample_run_dir / "gguf").mkdir()
    (sample_run_dir / "gguf" / "med-q8_0.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 40)
    (sample_run_dir / "gguf" / "med-q8_0.Modelfile").write_text(MODELFILE)
    record = copy.deepcopy(SAMPLE_RECORD)
    record["artifacts"]["gguf"] = "gguf"
    run_uri = publish_sample_run(store, "run-1", record)
    Registry.open(store + "/registry").register("med", "run-1", store=open_store(store))
    return run_uri


def test_resolve_and_download_carry_the_gguf_artifact(gguf_version: str, sample_run_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli.run_main(["registry", "resolve", "med:1", "--artifact", "gguf"], capsys)
    assert (code, out.strip()) == (0, f"{gguf_version}/gguf"), err
    code, out, err = cli.run_main(["registry", "show", "med:1", "--json"], capsys)
    assert code == 0 and '"gguf"' in out

    dest = tmp_path / "dl"
    code, _, err = cli.run_main(["registry", "download", "med:1", str(dest), "--artifact", "gguf"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in dest.iterdir()) == ["med-q8_0.Modelfile", "med-q8_0.gguf"]
    for name in ("med-q8_0.gguf", "med-q8_0.Modelfile"):
        assert hashlib.sha256((dest / name).read_bytes()).digest() == \
            hashlib.sha256((sample_run_dir / "gguf" / name).read_bytes()).digest()


def test_a_tampered_gguf_is_not_downloaded(gguf_version: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    stored = Path(gguf_version) / "gguf" / "med-q8_0.gguf"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    dest = tmp_path / "dl"
    code, _, err = cli.run_main(["registry", "download", "med:1", str(dest), "--artifact", "gguf"], capsys)
    assert code == 3 and "med-q8_0.gguf" in err
    assert not dest.exists() or not any(dest.iterdir())


@pytest.mark.parametrize("command", [["generate", "med:1", "--question", "Fever?"], ["eval", "med:1", "--limit", "1"],
                                     ["chat", "med:1"]])
def test_generate_chat_and_eval_refuse_the_gguf_artifact_in_one_line(
        gguf_version: str, tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli.run_main([*command, "--artifact", "gguf"], capsys)
    assert code == 2
    [line] = cli.error_lines(err)
    assert "--artifact gguf" in line and "llama.cpp or Ollama" in line and "--artifact merged" in line
    assert not (tmp_path / "cache" / "models").exists()  # refused before anything was downloaded


def test_a_gguf_artifact_holding_a_pickle_is_not_registered(tmp_path: Path, sample_run_dir: Path,
                                                            publish_sample_run: Callable[..., str]) -> None:
    """Registration applies the loading checks to every artifact: a gguf/ folder is data for llama.cpp, but a
    pickle beside it is refused as anywhere else (exit 3 naming it), and no version is written."""
    from registry.errors import DataError

    store = str(tmp_path / "store")
    (sample_run_dir / "gguf").mkdir()
    (sample_run_dir / "gguf" / "med-q8_0.gguf").write_bytes(b"GGUF" + bytes(64))
    (sample_run_dir / "gguf" / "extra.pkl").write_bytes(b"\x80\x04N.")
    record = copy.deepcopy(SAMPLE_RECORD)
    record["artifacts"]["gguf"] = "gguf"
    publish_sample_run(store, "run-1", record)
    reg = Registry.open(store + "/registry")
    with pytest.raises(DataError, match=r"extra\.pkl"):
        reg.register("med", "run-1", store=open_store(store))
    assert reg.list() == []
