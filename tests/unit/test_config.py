from pathlib import Path

import pytest
from pydantic import ValidationError

from job.config import ALL_PROJECTIONS, JobConfig, load_config
from registry.errors import ConfigError

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))


def test_every_shipped_config_validates():
    assert len(CONFIGS) >= 7
    for path in CONFIGS:
        cfg = load_config(path, env={})
        assert isinstance(cfg, JobConfig), path


@pytest.mark.parametrize("name", ["r1-llama-8b-en", "r1-qwen-7b-en", "r1-qwen-1.5b-en", "r1-llama-8b-zh"])
def test_reference_recipes_match_the_tutorials(name):
    cfg = load_config(Path(__file__).parents[2] / "configs" / f"{name}.yaml", env={})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (16, 16, ALL_PROJECTIONS)
    # auto: the plan keeps the recipe's 2 x 4 rows per step and picks precision and optimizer per GPU
    # (tests/unit/test_unsloth_plan.py checks that a small GPU gets the recipe's 4-bit and 8-bit AdamW).
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.max_steps) == ("auto", 4, 60)
    assert (cfg.train.learning_rate, cfg.train.optim, cfg.train.scheduler) == (2e-4, "auto", "linear")
    assert (cfg.train.seed, cfg.model.max_seq_length, cfg.model.load_in_4bit) == (3407, 2048, "auto")
    assert cfg.data.split == "train[:500]"
    assert cfg.data.template == ("r1-medical-zh" if name.endswith("zh") else "r1-medical")


def test_sources_apply_in_order_file_then_set_then_env(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  max_steps: 7\n  learning_rate: 1.0e-3\nlora:\n  r: 4\n")
    cfg = load_config(f, ["train.max_steps=9", "lora.r=8"], env={"MEDFT_LORA__R": "32", "MEDFT_RUN_ID": "job-a"})
    assert cfg.train.max_steps == 9 and cfg.train.learning_rate == 1e-3
    assert cfg.lora.r == 32 and cfg.output.run_id == "job-a"
    assert isinstance(cfg.train.max_steps, int)


def test_config_is_frozen():
    cfg = load_config(None, env={})
    with pytest.raises(ValidationError):
        cfg.train.max_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("override, key", [
    ("train.bogus=1", "train.bogus"),
    ("train.learning_rate=abc", "train.learning_rate"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.max_steps=0", "train.max_steps"),
    ("lora.r=-1", "lora.r"),
    ("model.max_seq_length=0", "model.max_seq_length"),
    ("model.base=hf://org/../../etc", "model.base"),
    ("data.source=s3://bucket/../other/rows.jsonl", "data.source"),
    ("model.trust_remote_code=true", "model.trust_remote_code"),
    ("output.run_id=a/b", "output.run_id"),
    ("bogus.key=1", "bogus"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], env={})
    assert key in e.value.message and e.value.exit_code == 2
    assert "\n" not in e.value.message


def test_relative_local_paths_are_allowed():
    assert load_config(None, ["data.source=../data/rows.jsonl"], env={}).data.source == "../data/rows.jsonl"


def test_trust_remote_code_with_pinned_revision_is_allowed():
    cfg = load_config(None, ["model.trust_remote_code=true", "model.revision=" + "a" * 40], env={})
    assert cfg.model.trust_remote_code


def test_bad_yaml_and_missing_file_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    for path in (bad, tmp_path / "missing.yaml"):
        with pytest.raises(ConfigError) as e:
            load_config(path, env={})
        assert str(path) in e.value.message


def test_malformed_set_is_a_usage_error():
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, ["train.max_steps"], env={})
