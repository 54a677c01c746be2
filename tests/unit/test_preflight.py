"""job.preflight: optimizer, schedule and LoRA targets checked before any weights move, naming the key's source.

The model is a tiny Llama's real config.json (transformers writes it); the model built from it lives on the
meta device, so nothing here allocates weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from job import preflight
from job.config import load_config
from registry.errors import ConfigError
from tests.model_factory import tiny_config

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))


@pytest.fixture
def config_json(tmp_path: Path) -> Path:
    tiny_config("qwen2").save_pretrained(tmp_path)
    return tmp_path / "config.json"


@pytest.mark.parametrize("override, words", [
    ("train.optim=adamw_torchh", "unknown optimizer 'adamw_torchh'; did you mean adamw_torch"),
    ("train.optim=adam", "unknown optimizer 'adam'"),
    ("train.scheduler=cosinee", "unknown schedule 'cosinee'; did you mean cosine"),
    ("train.scheduler=cosine_with_min_lr", "min_lr"),  # needs lr_scheduler_kwargs, which the config cannot set
    ("train.scheduler=warmup_stable_decay", "num_decay_steps"),
    ("train.scheduler=reduce_lr_on_plateau", "steps on an evaluation metric (ReduceLROnPlateau.step needs metrics)"),
    ("train.scheduler=greedy", "steps on an evaluation metric (GreedyLR.step needs metrics)"),
])
def test_optimizers_and_schedules_transformers_would_refuse_later(override: str, words: str) -> None:
    cfg = load_config(None, [override], env={})
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as e:
        preflight.check_optimizer(cfg)
        preflight.check_scheduler(cfg)
    assert e.value.message.startswith(f"--set {key}: {key}: ") and words in e.value.message, e.value.message
    assert "\n" not in e.value.message


def test_every_optimizer_and_schedule_transformers_runs_here_passes() -> None:
    from transformers.training_args import OptimizerNames

    for name in ["auto", *(o.value for o in OptimizerNames)]:
        preflight.check_optimizer(load_config(None, [f"train.optim={name}"], env={}))
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt"):
        preflight.check_scheduler(load_config(None, [f"train.scheduler={name}"], env={}))
    for path in CONFIGS:
        cfg = load_config(path, env={})
        preflight.check_optimizer(cfg)
        preflight.check_scheduler(cfg)


def test_checks_leave_accelerate_device_state_to_the_trainer() -> None:
    """The trainer sets accelerate's process-wide device state; a check that set it first would pin the CPU."""
    from accelerate.state import PartialState

    saved = dict(PartialState._shared_state)  # a Borg: this dict is the state; empty means not initialized
    PartialState._shared_state.clear()
    try:
        for name in ("linear", "reduce_lr_on_plateau", "cosine_with_min_lr"):
            try:
                preflight.check_scheduler(load_config(None, [f"train.scheduler={name}"], env={}))
            except ConfigError:
                pass
        preflight.check_optimizer(load_config(None, ["train.optim=sgd"], env={}))
        assert PartialState._shared_state == {}
    finally:
        PartialState._shared_state.clear()
        PartialState._shared_state.update(saved)


def test_an_environment_value_is_named_by_its_variable(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  optim: sgd\n")
    cfg = load_config(path, env={"MEDFT_TRAIN__SCHEDULER": "cosine_with_min_lr"})
    with pytest.raises(ConfigError) as e:
        preflight.check_scheduler(cfg)
    assert e.value.message.startswith("MEDFT_TRAIN__SCHEDULER: train.scheduler:") and str(path) not in e.value.message
    cfg = load_config(path, env={"MEDFT_TRAIN__OPTIM": "sgdd"})
    with pytest.raises(ConfigError, match="^MEDFT_TRAIN__OPTIM: train.optim: unknown optimizer 'sgdd'"):
        preflight.check_optimizer(cfg)


@pytest.mark.parametrize("targets, words", [
    ("[q_proj, qproj]", "'qproj' matches no module of Qwen2ForCausalLM"),
    ("[c_attn]", "'c_attn' matches no module"),  # GPT-2's name: a recipe copied from another architecture
    ("[mlp]", "'mlp' names Qwen2MLP, which LoRA cannot adapt"),
    ("[input_layernorm]", "'input_layernorm' names Qwen2RMSNorm, which LoRA cannot adapt"),
])
def test_target_modules_the_model_lacks_are_refused(config_json: Path, targets: str, words: str) -> None:
    cfg = load_config(None, [f"lora.target_modules={targets}"], env={})
    with pytest.raises(ConfigError) as e:
        preflight.check_target_modules(cfg, config_json)
    message = e.value.message
    assert message.startswith("--set lora.target_modules: lora.target_modules: ") and words in message, message
    assert "linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    assert str(config_json) in message and "\n" not in message


def test_default_and_partial_targets_pass(config_json: Path) -> None:
    for sets in ([], ["lora.target_modules=[q_proj, v_proj]"], ["lora.target_modules=[lm_head, embed_tokens]"]):
        preflight.check_target_modules(load_config(None, sets, env={}), config_json)


def test_a_config_that_needs_remote_code_is_left_to_the_load_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = tiny_config().to_dict()
    config.update(model_type="evil-llama", auto_map={"AutoConfig": "evil.EvilConfig"})
    (tmp_path / "config.json").write_text(json.dumps(config))
    preflight.check_target_modules(load_config(None, ["lora.target_modules=[nothing]"], env={}),
                                   tmp_path / "config.json")
    assert not marker.exists()


def test_targets_of_a_remote_code_model_are_left_to_its_own_code(config_json: Path) -> None:
    cfg = load_config(None, ["lora.target_modules=[Wqkv]", "model.trust_remote_code=true",
                             "model.revision=" + "a" * 40], env={})
    preflight.check_target_modules(cfg, config_json)  # the built-in Qwen2 lacks Wqkv; the repo's code may not


def test_local_config_json_is_found_without_a_download(tmp_path: Path, config_json: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert preflight.local_config_json(load_config(None, [f"model.base={config_json.parent}"], env={})) == config_json
    assert preflight.local_config_json(load_config(None, [f"model.base=file://{config_json.parent}"], env={})) \
        == config_json
    assert preflight.local_config_json(load_config(None, ["model.base=s3://bucket/model"], env={})) is None
    assert preflight.local_config_json(load_config(None, ["model.base=hf://org/not-cached"], env={})) is None
    assert preflight.local_config_json(load_config(None, [f"model.base={tmp_path / 'missing'}"], env={})) is None
