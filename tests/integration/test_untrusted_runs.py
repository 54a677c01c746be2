"""Forged run folders through ``medft generate``/``chat``: stored records never run code or load a pickle.

Each forged run is published the way a real one is (``registry.runs.publish_dir``: every file uploaded, then a
valid MANIFEST.json with correct sha256s), so checksums alone cannot catch it; the weights are a tiny random
Llama saved by transformers. A forged folder's Python file would create a marker file if it ever ran; the
last step proves that payload live by running it on purpose with ``--trust-remote-code``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from registry.runs import publish_dir, run_prefix
from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.integration.conftest import ROOT, medft_cmd

SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "f" * 40
QUESTION = "A 30-year-old has fever and neck stiffness. Next step?"
EVIL = '''
from pathlib import Path

Path({marker!r}).write_text("ran")

from transformers import LlamaConfig, LlamaForCausalLM


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def _record(base_uri: str, *, trust: bool = True, revision: str = SHA, artifacts: dict[str, str] | None = None
            ) -> dict[str, Any]:
    """What the job records, as a forger would write it: the training config claims trusted remote code."""
    return {
        "artifacts": artifacts or {"merged": "merged"},
        "lineage": {"base_model": {"uri": base_uri, "revision": revision, "sha256": {}}},
        "config": {"model": {"base": base_uri, "revision": revision, "trust_remote_code": trust,
                             "max_seq_length": 512},
                   "data": {"template": "r1-medical"}},
        "metrics": {},
    }


def _publish(store_uri: str, run_id: str, folder: Path, record: dict[str, Any]) -> str:
    store = open_store(store_uri)
    publish_dir(store, run_id, folder, record)
    return store.url(run_prefix(run_id))


def _evil_merged(tiny_model_dir: Path, dest: Path, marker: Path) -> Path:
    """The tiny model with a config.json ``auto_map`` into ``evil.py``, which writes ``marker`` when imported."""
    shutil.copytree(tiny_model_dir, dest)
    (dest / "evil.py").write_text(EVIL.format(marker=str(marker)))
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type="evil-llama",
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code, _, err = run_main(argv, capsys)
    assert "Traceback" not in err, err[-3000:]
    return code, error_lines(err)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """For in-process runs (monkeypatched) and subprocesses (returned): own caches, no hub."""
    values = {"MEDFT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
              "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "MEDFT_LOG_FORMAT": "json",
              "TOKENIZERS_PARALLELISM": "false"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MEDFT_")}, **values}


def test_a_forged_run_folder_never_runs_its_code(tiny_model_dir: Path, tmp_path: Path, env: dict[str, str],
                                                 capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    store = str(tmp_path / "store")
    folder = tmp_path / "forged"
    _evil_merged(tiny_model_dir, folder / "merged", marker)
    run = _publish(store, "forged-1", folder, _record("hf://org/tiny"))

    # 1. The run folder itself, although its record says trust_remote_code: true with a pinned revision.
    code, errors = _cli(["generate", run, "-q", QUESTION, "--max-new-tokens", "2"], capsys)
    assert code == 3 and len(errors) == 1, errors
    assert "config.json auto_map" in errors[0] and "never runs code" in errors[0], errors
    assert not marker.exists()

    # 2. Registration runs the same checks: refused naming the file, no version written.
    code, errors = _cli(["registry", "register", "forged", run, "--alias", "prod", "--store", store], capsys)
    assert code == 3 and len(errors) == 1 and "config.json auto_map" in errors[0], errors
    assert not (Path(store) / "registry" / "models" / "forged").exists()
    # A version registered before registration checked (an older medft) is still refused at load, asked by
    # NAME@ALIAS and by chat.
    with monkeypatch.context() as older_medft:
        older_medft.setattr("registry.registry.check_loadable", lambda *_: None)
        code, _ = _cli(["registry", "register", "forged", run, "--alias", "prod", "--store", store], capsys)
    assert code == 0
    code, errors = _cli(["generate", "forged@prod", "--store", store, "-q", QUESTION], capsys)
    assert code == 3 and len(errors) == 1 and "auto_map" in errors[0], errors
    monkeypatch.setattr("sys.stdin", io.StringIO(QUESTION + "\n"))
    code, errors = _cli(["chat", "forged@prod", "--store", store], capsys)
    assert code == 3 and len(errors) == 1 and "auto_map" in errors[0], errors
    assert not marker.exists()

    # 3. The flag is refused for a registry ref, and for a sha the run was not pinned to.
    code, errors = _cli(["generate", "forged@prod", "--store", store, "-q", QUESTION, "--trust-remote-code", SHA],
                        capsys)
    assert code == 2 and "refused for the registry ref forged:1" in errors[0], errors
    for sha, words in ((OTHER_SHA, f"at revision {SHA}, not {OTHER_SHA}"), ("main", "40-hex commit sha")):
        code, errors = _cli(["generate", run, "-q", QUESTION, "--trust-remote-code", sha], capsys)
        assert code == 2 and len(errors) == 1 and words in errors[0], errors
    assert not marker.exists()
    assert not (tmp_path / "hf-modules").exists()  # transformers never even copied the module

    # 4. The same folder with the flag and its pinned sha does run the code: the payload above was live.
    proc = subprocess.run(medft_cmd("generate", run, "-q", QUESTION, "--trust-remote-code", SHA, "--temperature",
                                    "0", "--max-new-tokens", "2", "--json"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "ran" and json.loads(proc.stdout)["ref"] == run


def test_code_named_without_a_trust_claim_is_refused_too(tiny_model_dir: Path, tmp_path: Path,
                                                         env: dict[str, str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """No trust_remote_code in the record: transformers would fail with a traceback on the unknown type."""
    marker = tmp_path / "pwned"
    folder = tmp_path / "forged"
    _evil_merged(tiny_model_dir, folder / "merged", marker)
    run = _publish(str(tmp_path / "store"), "forged-2", folder, _record("hf://org/tiny", trust=False))
    code, errors = _cli(["generate", run, "-q", QUESTION], capsys)
    assert code == 3 and len(errors) == 1 and "auto_map" in errors[0], errors
    # A plain .py file beside otherwise ordinary weights is refused as well.
    clean = tmp_path / "clean"
    shutil.copytree(tiny_model_dir, clean / "merged")
    (clean / "merged" / "modeling_extra.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    run = _publish(str(tmp_path / "store"), "forged-3", clean, _record("hf://org/tiny", trust=False))
    code, errors = _cli(["generate", run, "-q", QUESTION], capsys)
    assert code == 3 and "modeling_extra.py" in errors[0], errors
    assert not marker.exists()


# ------------------------------------------------------------------------------------ hostile artifacts

def _lie_about_shape(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [4096, 4096]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _adapter(tiny_model_dir: Path, dest: Path) -> Path:
    """A real PEFT adapter for the tiny model (random LoRA weights) with its tokenizer, as the job saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"]))
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(dest)
    return dest


def _forge(kind: str, tiny_model_dir: Path, root: Path) -> tuple[dict[str, Any], list[str]]:
    """Write the run folder for ``kind`` under ``root``; return its record and the extra generate arguments."""
    merged = root / "merged"
    if kind in ("pickle-only merged", "decoy safetensors beside a pickle", "lying header (merged)",
                "index listing a missing shard"):
        shutil.copytree(tiny_model_dir, merged)
        if kind != "lying header (merged)" and kind != "index listing a missing shard":
            from safetensors.torch import load_file

            torch.save(load_file(merged / "model.safetensors"), merged / "pytorch_model.bin")
            (merged / "model.safetensors").unlink()
            if kind == "decoy safetensors beside a pickle":
                from safetensors.torch import save_file

                save_file({"decoy": torch.zeros(1)}, str(merged / "extra.safetensors"))
        elif kind == "lying header (merged)":
            _lie_about_shape(merged / "model.safetensors")
        else:
            (merged / "model.safetensors.index.json").write_text(json.dumps(
                {"weight_map": {"lm_head.weight": "model.safetensors",
                                "model.norm.weight": "model-00002-of-00002.safetensors"}}))
        return _record(str(tiny_model_dir), trust=False), []
    adapter = _adapter(tiny_model_dir, root / "adapter")
    record = _record(str(tiny_model_dir), trust=False, artifacts={"adapter": "adapter"})
    if kind == "pickle-only adapter":
        from safetensors.torch import load_file

        torch.save(load_file(adapter / "adapter_model.safetensors"), adapter / "adapter_model.bin")
        (adapter / "adapter_model.safetensors").unlink()
    elif kind == "lying header (adapter)":
        _lie_about_shape(adapter / "adapter_model.safetensors")
    elif kind == "base URI hf://a/../b":
        record = _record("hf://a/../b", trust=False, artifacts={"adapter": "adapter"})
    elif kind == "base URI hf://a/b/c, --compare base":
        record = _record("hf://a/b/c", trust=False, artifacts={"adapter": "adapter"})
        return record, ["--artifact", "adapter", "--compare", "base"]
    elif kind == "base revision with ..":
        record = _record(str(tiny_model_dir), trust=False, revision="../../../etc", artifacts={"adapter": "adapter"})
    return record, ["--artifact", "adapter"]


HOSTILE = {
    "pickle-only merged": "only pickle weights (pytorch_model.bin)",
    "decoy safetensors beside a pickle": "pytorch_model.bin is a pickle weight file beside the safetensors",
    "lying header (merged)": "the header lies about sizes",
    "index listing a missing shard": "lists model-00002-of-00002.safetensors, which is missing",
    "pickle-only adapter": "only pickle weights (adapter_model.bin)",
    "lying header (adapter)": "the header lies about sizes",
    "base URI hf://a/../b": "records a base model that cannot be loaded",
    "base URI hf://a/b/c, --compare base": "is not hf://org/name",
    "base revision with ..": "records base revision '../../../etc'",
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_hostile_artifacts_exit_3_before_anything_loads(kind: str, tiny_model_dir: Path, tmp_path: Path,
                                                         env: dict[str, str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    record, extra = _forge(kind, tiny_model_dir, tmp_path / "forged")
    run = _publish(str(tmp_path / "store"), "hostile", tmp_path / "forged", record)
    code, errors = _cli(["generate", run, "-q", QUESTION, "--max-new-tokens", "2", *extra], capsys)
    assert code == 3 and len(errors) == 1, (kind, errors)
    assert HOSTILE[kind] in errors[0], errors


# ---------------------------------------------------------------------------------- generate/chat input

@pytest.fixture
def clean_run(tiny_model_dir: Path, tmp_path: Path, env: dict[str, str]) -> str:
    """A well-formed published run, so that only the input can be at fault."""
    shutil.copytree(tiny_model_dir, tmp_path / "clean" / "merged")
    return _publish(str(tmp_path / "store"), "clean", tmp_path / "clean", _record(str(tiny_model_dir), trust=False))


@pytest.mark.parametrize("args, words", [
    (["-q", "what about \udcff\udcfe?"], "--question is not valid UTF-8 (byte 0xff at character 12)"),
    (["-q", QUESTION, "--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=4294967295"),
    (["-q", QUESTION, "--seed", str(2**32)], "'--seed'"),
    (["-q", QUESTION, "--temperature", "nan"], "--temperature must be 0 (greedy) or a finite positive number"),
    (["-q", QUESTION, "--temperature", "inf"], "--temperature must be 0 (greedy) or a finite positive number"),
    (["-q", QUESTION, "--temperature", "-0.5"], "'--temperature': -0.5 is not in the range x>=0"),
    (["-q", QUESTION, "--top-p", "nan"], "--top-p must be in (0, 1]"),
    (["-q", QUESTION, "--top-p", "0"], "'--top-p': 0.0 is not in the range 0<x<=1"),
    (["-q", QUESTION, "--top-p", "1.5"], "'--top-p'"),
    (["-q", QUESTION, "--max-new-tokens", "0"], "'--max-new-tokens': 0 is not in the range x>=1"),
    (["-q", QUESTION, "--artifact", "pickle"], "'--artifact'"),
    (["-q", "   "], "--question is empty"),
])
def test_bad_generate_input_is_one_line_exit_2_before_any_download(args: list[str], words: str, clean_run: str,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["generate", clean_run, *args], capsys)
    assert code == 2 and "Traceback" not in err and "Usage:" not in err, err[-2000:]
    errors = error_lines(err)
    assert len(errors) == 1 and words in errors[0], errors
    assert not (tmp_path / "cache" / "models").exists()  # refused before the artifact was fetched


def test_chat_refuses_closed_stdin_and_undecodable_lines(clean_run: str, tmp_path: Path, env: dict[str, str],
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", None)  # what Python sets when fd 0 is closed
    code, errors = _cli(["chat", clean_run], capsys)
    assert code == 2 and len(errors) == 1 and "standard input, which is closed" in errors[0], errors
    assert not (tmp_path / "cache" / "models").exists()

    # The first line is answered, the second is not UTF-8: one line naming it, exit 2.
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"What causes anemia?\nfever \xff\xfe\n"),
                                                      encoding="utf-8"))
    code, out, err = run_main(["chat", clean_run, "--temperature", "0", "--max-new-tokens", "2", "--json"], capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert [json.loads(line)["question"] for line in out.splitlines()] == ["What causes anemia?"]
    assert error_lines(err) == ["medft: error: standard input line 2 is not valid UTF-8 (byte 0xff); "
                                "pass UTF-8 text"]

    # A real process whose fd 0 is closed.
    proc = subprocess.run(medft_cmd("chat", clean_run), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120, stdin=None, preexec_fn=lambda: os.close(0))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("medft: error:")] == [
        "medft: error: chat reads one question a line from standard input, which is closed; run it at a "
        "terminal, pipe questions in, or use medft generate --question"]
