"""GPU tests: the unsloth backend on a real CUDA device. Skipped, not failed, where there is none.

Run them on the GPU machine (README, development section)::

    python -m pytest tests/gpu -q

Without CUDA or without unsloth (``pip install '.[gpu]'``) every test here is reported as skipped. With
them, unsloth is imported here, before any test imports transformers, trl or peft, as it must be.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _gpu_ready() -> bool:
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("unsloth") is None:
        return False
    import torch

    return torch.cuda.is_available()


GPU = _gpu_ready()
if GPU:
    os.environ.setdefault("MEDFT_CACHE", tempfile.mkdtemp(prefix="medft-gpu-cache-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from job.backends.unsloth import import_unsloth

    import_unsloth()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and unsloth (medft[gpu]); run on the GPU machine")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama (grouped-query attention, 4 layers) with the synthetic word tokenizer."""
    from benchmarks.models import save_random_checkpoint
    from job import architectures

    dest = tmp_path_factory.mktemp("tiny-llama")
    return save_random_checkpoint(architectures.TINY_LLAMA, dest, seed=0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 raw rows (Question / Complex_CoT / Response); the tiny model's tokenizer reads a word as a token."""
    from benchmarks.rows import synthetic_records
    from job import architectures

    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    rows = synthetic_records(architectures.TINY_LLAMA, 40, seed=3)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def job_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a ``medft train`` subprocess: its own cache, JSON logs, offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFT_")}
    env.update(MEDFT_CACHE=str(tmp_path / "cache"), MEDFT_LOG_FORMAT="json", MEDFT_LEASE_SECONDS="20",
               PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return env


def medft_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "job.cli", *args]


def job_args(weights: Path, data: Path, store: Path, run_id: str, *extra: str) -> list[str]:
    """A short unsloth job on the tiny model: a few steps, evaluation kept small, merged in float32.

    The tiny model's synthetic word tokenizer reads ``t<N>`` words only, so the template's text cannot come back
    through it: the tokenizer round-trip check is off for these jobs.
    """
    settings = [f"model.base={weights}", "model.backend=unsloth", "model.max_seq_length=1536",
                "model.tokenizer_check=false",
                f"data.source={data}", "data.subset=null", "data.split=train", "data.eval_fraction=0.1",
                "train.max_steps=6", "train.grad_accum=1", "train.warmup_steps=0",
                "train.learning_rate=0.005",
                "eval.max_new_tokens=8", "eval.max_eval_rows=4", f"output.store={store}",
                f"output.run_id={run_id}", "output.model_name=tiny"]
    return ["train", *[x for s in settings for x in ("--set", s)], *extra]
