"""``export.gguf``: the types a config may list, the checks made before training, and the Ollama Modelfile's
prompt, filled in for real rows, against the training template (tokenizers in the released R1-Distill shapes)."""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path

import pytest

from job import gguf_export, ollama
from job.config import load_config
from job.templates import get_template
from job.tokenizer import load_tokenizer
from registry.errors import ConfigError
from tests.data_factory import R1_SPLIT_PATTERNS, sample_records, write_r1_distill_tokenizer

ROOT = Path(__file__).resolve().parents[2]


def test_gguf_types_are_checked_when_the_config_loads() -> None:
    assert load_config(None, ["export.gguf=[Q8_0, f16, q4_k_m]"]).export.gguf == ("q8_0", "f16", "q4_k_m")
    assert load_config(None, []).export.gguf == ()
    with pytest.raises(ConfigError) as e:
        load_config(None, ["export.gguf=[q8_0, q3]"])
    assert e.value.exit_code == 2
    assert e.value.message.startswith("--set export.gguf: export.gguf: unknown GGUF type 'q3'; use any of f16,")
    assert "q4_k_m" in e.value.message
    with pytest.raises(ConfigError, match="export.gguf needs export.merge=true"):
        load_config(None, ["export.gguf=[q8_0]", "export.merge=false"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, ["export.gguf=[f16, F16]"])


def _no_quantizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No llama-quantize (not named, not on PATH) and no llama-cpp-python (as when it is not installed)."""
    monkeypatch.delenv(gguf_export.QUANTIZE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def test_a_k_quant_needs_llama_quantize_before_training(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_quantizer(monkeypatch, tmp_path)
    gguf_export.check_plan(load_config(None, ["export.gguf=[q8_0, q5_1]"]))  # the gguf library writes these
    with pytest.raises(ConfigError) as e:
        gguf_export.check_plan(load_config(None, ["export.gguf=[q8_0, q4_k_m]"]))
    assert e.value.message.startswith("--set export.gguf: export.gguf: q4_k_m is made by llama.cpp's llama-quantize")
    assert "MEDFT_LLAMA_QUANTIZE" in e.value.message and "--target llama-quantize" in e.value.message

    monkeypatch.setenv(gguf_export.QUANTIZE_ENV, str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="MEDFT_LLAMA_QUANTIZE=.*not an executable file"):
        gguf_export.check_plan(load_config(None, ["export.gguf=[q4_k_m]"]))
    binary = tmp_path / "llama-quantize"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv(gguf_export.QUANTIZE_ENV)
    gguf_export.check_plan(load_config(None, ["export.gguf=[q4_k_m]"]))  # found on PATH


def test_the_dry_run_refuses_a_k_quant_without_the_quantizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from tests import cli

    _no_quantizer(monkeypatch, tmp_path)
    code, _, err = cli.run_main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--dry-run", "--set",
                                 "export.gguf=[q4_k_m]", "--set", f"output.store={tmp_path / 'store'}"], capsys)
    assert code == 2
    assert [line for line in cli.error_lines(err) if "llama-quantize" in line], err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("layout, name", [("llama", "llama-bpe"), ("qwen2", "qwen2")])
def test_the_r1_distill_pre_tokenizers_map_to_llama_cpps_names(tmp_path: Path, layout: str, name: str) -> None:
    spec = json.loads((write_r1_distill_tokenizer(tmp_path, layout) / "tokenizer.json").read_text())
    assert gguf_export.pre_tokenizer_name(spec, "t") == name


def test_smollm2_as_transformers_rebuilds_it_is_gpt2_and_anything_else_is_refused(tmp_path: Path) -> None:
    spec = json.loads((write_r1_distill_tokenizer(tmp_path, "llama") / "tokenizer.json").read_text())
    # What transformers' GGUF loader writes for SmolLM2's tokenizer (the demo's base): GPT-2's byte-level split.
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    assert gguf_export.pre_tokenizer_name(spec, "t") == "gpt-2"
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": R1_SPLIT_PATTERNS["qwen2"] + "x"}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    with pytest.raises(ConfigError, match=r"^tok.json: export.gguf: this tokenizer's pre-tokenizer"):
        gguf_export.pre_tokenizer_name(spec, "tok.json")


def test_an_architecture_llama_cpp_is_not_given_is_refused_before_training(tmp_path: Path) -> None:
    d = write_r1_distill_tokenizer(tmp_path, "llama")
    gguf_export.check_model(d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(ConfigError, match=r"config.json: export.gguf: model_type mistral is not one"):
        gguf_export.check_model(d)
    (d / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ConfigError, match="rope scaling 'yarn'"):
        gguf_export.check_model(d)


def _template_of(modelfile: str) -> str:
    [body] = re.findall(r'^TEMPLATE """(.*?)"""$', modelfile, flags=re.S | re.M)
    return body


@pytest.mark.parametrize("template_name", ["r1-medical", "r1-medical-zh", "chat"])
@pytest.mark.parametrize("layout", ["llama", "qwen2"])
def test_the_modelfile_and_the_gguf_chat_template_render_the_training_prompt(
        tmp_path: Path, layout: str, template_name: str) -> None:
    tok = load_tokenizer(write_r1_distill_tokenizer(tmp_path, layout))
    template = get_template(template_name)
    parts = ollama.prompt_parts(template, tok)
    text = ollama.modelfile("m-q8_0.gguf", parts, model_name="m", template_name=template_name)
    assert "FROM ./m-q8_0.gguf\n" in text
    assert 'PARAMETER stop "<｜end▁of▁sentence｜>"\nPARAMETER temperature 0.6\nPARAMETER top_p 0.95\n' in text
    go = _template_of(text)
    assert go.count("{{") == 1  # one action, no conditionals: Ollama's rendering is this substitution
    jinja = ollama.chat_template(template, tok, parts)
    # The instruction templates get BOS from the tokenizer (the GGUF says add_bos); the chat template writes it.
    assert parts.add_bos is (template_name != "chat")
    for row in sample_records()[:3]:
        question = row["Question"]
        trained = template.prompt(question, tok)
        assert ollama.fill_go_template(go, question) == trained
        rendered = tok.apply_chat_template([{"role": "user", "content": question}], chat_template=jinja,
                                           tokenize=False, add_generation_prompt=True)
        assert rendered == trained


def test_a_prompt_that_go_templates_would_misread_is_refused() -> None:
    parts = ollama.PromptParts(head="Use {{ braces }}: ", tail="\n<think>\n", add_bos=True, eos="</s>")
    with pytest.raises(ConfigError, match="Ollama TEMPLATE"):
        ollama.modelfile("m.gguf", parts, model_name="m", template_name="x")


def test_the_model_card_names_the_gguf_files_and_the_ollama_steps() -> None:
    from job.model_card import model_card

    lineage = {"base_model": {"uri": "hf://org/base", "revision": None},
               "dataset": {"source": "hf://org/data", "rows": 10, "content_sha256": "b" * 64}}
    card = model_card(load_config(None, ["export.gguf=[q8_0, f16]", "output.model_name=med"], env={}), lineage,
                      {"train_loss": 1.0}, {})
    assert "`med-q8_0.gguf`, `med-f16.gguf`" in card
    assert "ollama create med -f med-q8_0.Modelfile\nollama run med\n" in card
    assert "GGUF" not in model_card(load_config(None, env={}), lineage, {"train_loss": 1.0}, {})


def test_llama_3_rope_scaling_is_written_as_transformers_computes_it() -> None:
    """R1-Distill-Llama-8B's rope scaling (Llama 3.1's) becomes llama.cpp's ``rope_freqs`` divisors: the base
    frequencies over the scaled ones transformers uses."""
    import numpy as np
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=scaling,
                         max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    as_dict = config.to_dict()
    divisors = gguf_export._llama3_rope_factors(as_dict, gguf_export._rope_scaling(as_dict, Path("config.json")))
    assert divisors.shape == (64,) and divisors[0] == 1.0 and divisors[-1] == 8.0
    np.testing.assert_allclose(divisors, base / scaled.double().numpy(), rtol=1e-5)
