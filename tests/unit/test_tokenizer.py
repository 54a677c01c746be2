"""medft's one tokenizer loader and its round-trip guard, on tokenizers in the released R1-Distill files' shape.

The failing shape of the real DeepSeek-R1-Distill-Llama files is built here: a byte-level BPE ``tokenizer.json``
whose ``tokenizer_config.json`` names ``LlamaTokenizerFast``, which transformers 5 rebuilds with SentencePiece
pre-tokenizer and decoder (every space and newline lost). The Qwen2 layout is checked the same way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from job import inference
from job.data import Row, prepare
from job.inference.loading import _tokenizer
from job.templates import THINK_OPEN, get_template
from job.tokenizer import (
    PORTABLE_TOKENIZER_CLASS,
    check_round_trip,
    first_difference,
    guard_texts,
    load_tokenizer,
    round_trip,
    save_tokenizer,
)
from registry.errors import ConfigError
from tests.data_factory import R1_EOS, SAMPLE, config_for, sample_records, write_r1_distill_tokenizer

SHAPES = [("llama", "LlamaTokenizerFast"), ("qwen2", "Qwen2TokenizerFast"), ("qwen2", "LlamaTokenizerFast")]
BOUNDARY = "\n\n### Response:\n<think>\nOkay, let us see.  Two spaces,\ttabs\n\nand 12345 digits."


@pytest.fixture(params=SHAPES, ids=[f"{layout}-{cls}" for layout, cls in SHAPES])
def r1_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    layout, cls = request.param
    return write_r1_distill_tokenizer(tmp_path / "base", layout, tokenizer_class=cls)


@pytest.fixture
def rows() -> list[Row]:
    return [Row(r["Question"], r["Complex_CoT"], r["Response"], i + 1) for i, r in enumerate(sample_records())]


def _raw(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path / "tokenizer.json"))


def test_plain_auto_tokenizer_mangles_the_llama_shape_this_is_what_is_fixed(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = write_r1_distill_tokenizer(tmp_path / "base", "llama")
    broken = AutoTokenizer.from_pretrained(path)
    assert type(broken).__name__ == "LlamaTokenizer"
    expected, decoded = round_trip(broken, BOUNDARY)
    assert "<think>Okay,letussee." in decoded and decoded != expected


def test_the_loader_keeps_the_file_pipeline_and_the_config_settings(r1_dir: Path, rows: list[Row]) -> None:
    tok = load_tokenizer(r1_dir)
    raw = _raw(r1_dir)
    config = json.loads((r1_dir / "tokenizer_config.json").read_text())
    for text in [BOUNDARY, *(t for _, t in guard_texts(rows, "r1-medical", tok))]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(text, add_special_tokens=False).ids  # same ids, so same token counts
        assert tok(text)["input_ids"] == raw.encode(text).ids  # the file's post-processor: BOS in front
        assert tok.decode(ids) == text  # byte-level: every space and newline comes back
    # The "\n" after <think> is its own token, not swallowed.
    think = tok.convert_tokens_to_ids("<think>")
    ids = tok(BOUNDARY, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[ids.index(think) + 1:ids.index(think) + 2]) == "\n"
    assert tok.chat_template == config["chat_template"]
    assert tok.eos_token == R1_EOS and tok.pad_token == R1_EOS and tok.pad_token_id == tok.eos_token_id
    assert tok.bos_token_id == raw.token_to_id(config["bos_token"]["content"])


def test_the_mask_boundary_is_right_after_think_and_one_eos_is_trained(r1_dir: Path, rows: list[Row]) -> None:
    from job.train import TrainCollator, to_trainer_rows

    tok = load_tokenizer(r1_dir)
    raw = _raw(r1_dir)
    cfg = config_for(SAMPLE, "model.max_seq_length=4096", "data.eval_fraction=0")
    prepared = prepare(rows, tok, cfg)
    assert len(prepared.train) == len(rows)
    template = get_template("r1-medical")
    for example, row in zip(prepared.train, rows):
        ids, mask = example["input_ids"], example["completion_mask"]
        head = ids[:mask.index(1)]
        assert tok.decode(head, skip_special_tokens=True).endswith("### Response:\n" + THINK_OPEN)
        assert raw.decode(head, skip_special_tokens=False).startswith(tok.bos_token + "Below is an instruction")
        # The whole example is the file's encoding of the training text, BOS in front: counts match exactly.
        assert ids == raw.encode(template.text(row.question, row.reasoning, row.answer, tok)).ids
        assert ids.count(tok.eos_token_id) == 1 and ids[-1] == tok.eos_token_id

    # pad = EOS (as released): padding stays out of the loss, each row's own EOS stays in it.
    batch = TrainCollator(tok.pad_token_id, padding_free=False)(to_trainer_rows(prepared.train[:4]))
    labels, input_ids = batch["labels"].tolist(), batch["input_ids"].tolist()
    lengths = [len(e["input_ids"]) for e in prepared.train[:4]]
    assert len(set(lengths)) > 1  # rows of different lengths, so some are padded
    for row_labels, row_ids, n in zip(labels, input_ids, lengths):
        assert row_labels[n - 1] == tok.eos_token_id
        assert [t for t in row_labels if t == tok.eos_token_id] == [tok.eos_token_id]
        assert all(t == -100 for t in row_labels[n:]) and all(t == tok.pad_token_id for t in row_ids[n:])


def test_inference_prompts_with_the_ids_training_masked(r1_dir: Path, rows: list[Row]) -> None:
    train_tok = load_tokenizer(r1_dir)
    cfg = config_for(SAMPLE, "model.max_seq_length=4096", "data.eval_fraction=0")
    example = prepare(rows[:3], train_tok, cfg).train[0]
    loaded = inference.Loaded(label="x", model=None, tokenizer=_tokenizer(r1_dir, False),
                              template=get_template("r1-medical"), backend="transformers")
    prompt = loaded.prompt_ids(rows[0].question)
    assert prompt == example["input_ids"][:example["completion_mask"].index(1)]
    assert loaded.tokenizer.decode(prompt[-3:]).endswith(THINK_OPEN)


@pytest.mark.parametrize("with_model_config", [False, True], ids=["adapter", "merged"])
def test_the_saved_tokenizer_reloads_with_plain_auto_tokenizer(r1_dir: Path, rows: list[Row], tmp_path: Path,
                                                               with_model_config: bool) -> None:
    from transformers import AutoTokenizer

    tok = load_tokenizer(r1_dir)
    dest = tmp_path / "out"
    dest.mkdir()
    if with_model_config:  # merged/ holds the model's config.json beside the tokenizer, adapter/ does not
        shutil.copy(r1_dir / "config.json", dest / "config.json")
    texts = [t for _, t in guard_texts(rows, "r1-medical", tok)]
    save_tokenizer(tok, dest, texts[:2])
    assert json.loads((dest / "tokenizer_config.json").read_text())["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
    reloaded = AutoTokenizer.from_pretrained(dest)
    for text in [BOUNDARY, *texts]:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"]
    assert reloaded.decode(reloaded(BOUNDARY, add_special_tokens=False)["input_ids"]) == BOUNDARY
    assert reloaded.chat_template == tok.chat_template and reloaded.eos_token == tok.eos_token


# ------------------------------------------------------------------------------------------ the guard

def test_the_guard_stops_the_llama_tokenizer_rebuild(tmp_path: Path, rows: list[Row]) -> None:
    from transformers import AutoTokenizer

    path = write_r1_distill_tokenizer(tmp_path / "base", "llama")
    broken = AutoTokenizer.from_pretrained(path)
    with pytest.raises(ConfigError) as e:
        check_round_trip(broken, guard_texts(rows, "r1-medical", broken), name="model.base hf://org/r1")
    message = e.value.message
    assert message.startswith("model.base hf://org/r1: its tokenizer (")
    assert str(path) in message and "LlamaTokenizer" in message
    assert "the r1-medical template, character 5:" in message  # "Below is": the first space is lost
    assert "expected 'Below is an instruction" in message and "decoded 'Belowisaninstruction" in message
    assert e.value.exit_code == 2


def test_the_guard_stops_a_tokenizer_json_with_a_lossy_pre_tokenizer(tmp_path: Path, rows: list[Row]) -> None:
    lossy = {"type": "Sequence", "pretokenizers": [
        {"type": "WhitespaceSplit"}, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": False}]}
    path = write_r1_distill_tokenizer(tmp_path / "base", "llama", pre_tokenizer=lossy)
    tok = load_tokenizer(path)
    with pytest.raises(ConfigError, match=r"does not give the text back: the r1-medical template"):
        check_round_trip(tok, guard_texts(rows, "r1-medical", tok), name="model.base x")
    # Rows are checked too, each named by its source row, after the template.
    good = write_r1_distill_tokenizer(tmp_path / "good", "llama")
    fine = load_tokenizer(good)
    texts = guard_texts(rows, "r1-medical", fine)
    texts[3] = (texts[3][0], texts[3][1].replace("\n", "\r\n"))  # byte-level keeps \r too: still passes
    check_round_trip(fine, texts, name="model.base x")
    with pytest.raises(ConfigError, match=rf"{texts[2][0]}, character "):
        check_round_trip(tok, [texts[2]], name="model.base x")


def test_the_guard_allows_the_documented_unicode_normalisation_only(tmp_path: Path) -> None:
    tok = load_tokenizer(write_r1_distill_tokenizer(tmp_path / "qwen", "qwen2"))  # NFC normalizer, as released
    decomposed = "Cafe\u0301 au lait"
    expected, decoded = round_trip(tok, decomposed)
    assert decoded == "Caf\u00e9 au lait" != decomposed and expected == decoded
    check_round_trip(tok, [("text", decomposed)], name="qwen")
    llama = load_tokenizer(write_r1_distill_tokenizer(tmp_path / "llama", "llama"))  # no normalizer
    check_round_trip(llama, [("text", decomposed)], name="llama")  # byte-level returns it exactly


def test_first_difference() -> None:
    assert first_difference("abc", "abc") is None
    assert first_difference("abc", "abd") == 2
    assert first_difference("abc", "ab") == 2 and first_difference("ab", "abc") == 2


def test_guard_texts_sample_spreads_over_the_rows(rows: list[Row], tmp_path: Path) -> None:
    tok = load_tokenizer(write_r1_distill_tokenizer(tmp_path / "base", "llama"))
    many = [Row(r.question, r.reasoning, r.answer, i + 1) for i, r in enumerate(rows * 40)]
    texts = guard_texts(many, "r1-medical", tok, limit=8)
    assert texts[0][0] == "the r1-medical template" and len(texts) == 9
    assert texts[1][0] == "row 1" and int(texts[-1][0].split()[1]) > len(many) // 2
    assert all(t.endswith(R1_EOS) for _, t in texts)


def test_generation_stops_at_eos_when_pad_is_eos(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    path = write_r1_distill_tokenizer(tmp_path / "base", "llama", weights=True)
    tok = _tokenizer(path, False)
    assert tok.pad_token_id == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # a model that always predicts EOS: constant hidden state, only EOS scores
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_token_id, 0] = 1.0
    loaded = inference.Loaded(label="x", model=model, tokenizer=tok, template=get_template("r1-medical"),
                              backend="transformers")
    answer = inference.generate(loaded, "Why?", inference.Sampling(max_new_tokens=5, temperature=0))
    assert answer.finish_reason == "stop" and answer.completion_tokens == 1


def test_the_unsloth_backend_trains_with_the_loader_tokenizer_not_its_own(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from job.backends.unsloth import UnslothBackend

    path = write_r1_distill_tokenizer(tmp_path / "base", "llama")
    as_unsloth_got_it = AutoTokenizer.from_pretrained(path)  # the class transformers resolves: LlamaTokenizer
    as_unsloth_got_it.padding_side = "right"
    cfg = config_for(SAMPLE, f"model.base={path}")
    tok = UnslothBackend._same_tokenizer_as_hf(path, cfg, as_unsloth_got_it)
    assert tok(BOUNDARY, add_special_tokens=False)["input_ids"] == _raw(path).encode(
        BOUNDARY, add_special_tokens=False).ids
    assert tok.padding_side == "right" and tok.pad_token_id == tok.eos_token_id
