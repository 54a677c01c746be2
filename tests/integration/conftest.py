"""Fixtures for whole-job tests: a tiny random model on disk, a small dataset, and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_factory import tiny_tokenizer
from tests.model_factory import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer())


@pytest.fixture
def job_env(tmp_path, monkeypatch) -> dict[str, str]:
    """Environment for a job subprocess: its own cache, JSON logs, a short lease."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFT_")}
    env.update(MEDFT_CACHE=str(tmp_path / "cache"), MEDFT_LOG_FORMAT="json", MEDFT_LEASE_SECONDS="20",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for key in ("MEDFT_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def medft_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "job.cli", *args]


def run_medft(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(medft_cmd(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def job_args(model_dir: Path, store: str, run_id: str, *extra: str) -> list[str]:
    """A fast tiny-model job: a few steps on the sample data, merged in float32 for an exact check."""
    return ["train", "--set", f"model.base={model_dir}", "--set", "model.backend=hf",
            "--set", "model.max_seq_length=1200", "--set", "data.source=data/sample.jsonl",
            "--set", "data.subset=null", "--set", "data.split=train", "--set", "data.eval_fraction=0.1",
            "--set", "train.max_steps=6", "--set", "train.checkpoint_every=2", "--set", "train.grad_accum=1",
            "--set", "train.warmup_steps=0", "--set", "train.learning_rate=0.005",
            "--set", "eval.max_new_tokens=8", "--set", "eval.max_eval_rows=4",
            "--set", f"output.store={store}", "--set", f"output.run_id={run_id}",
            "--set", "output.model_name=tiny", "--set", "output.aliases=[candidate]", *extra]
