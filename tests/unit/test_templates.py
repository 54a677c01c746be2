"""Templates: the exact training text, the inference prompt as its prefix, and the chat template trap."""

from __future__ import annotations

import pytest

from job.templates import TEMPLATES, THINK_OPEN, get_template, leading_special_ids
from registry.errors import ConfigError
from tests.data_factory import R1_LIKE_CHAT_TEMPLATE_WITH_THINK, smollm2_tokenizer, tiny_tokenizer

Q = "A 30-year-old has fever {and} rash. Next step?"
R = "Fever with rash: think of infections first.\nThen drugs."
A = "Take a careful history and examine the skin."


def test_the_three_templates_exist_and_unknown_names_fail_with_exit_2() -> None:
    assert set(TEMPLATES) == {"r1-medical", "r1-medical-zh", "chat"}
    assert get_template("chat") is TEMPLATES["chat"]
    with pytest.raises(ConfigError) as e:
        get_template("alpaca")
    assert e.value.exit_code == 2
    assert "data.template" in e.value.message and "r1-medical" in e.value.message


def test_r1_medical_is_the_tutorial_prompt_around_the_question() -> None:
    tok = tiny_tokenizer()
    t = get_template("r1-medical")
    prompt = t.prompt(Q, tok)
    assert prompt.startswith("Below is an instruction that describes a task")
    assert ("You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment "
            "planning. Please answer the following medical question.") in prompt
    # The question goes in verbatim (braces included) between its header and the response header.
    assert prompt.endswith(f"### Question:\n{Q}\n\n### Response:\n<think>\n")
    assert t.completion(R, A, tok) == f"{R}\n</think>\n{A}</s>"
    assert t.text(Q, R, A, tok) == prompt + t.completion(R, A, tok)
    # The instruction template does not depend on the tokenizer.
    assert t.prompt(Q) == prompt


def test_the_chinese_variant_asks_in_chinese_with_the_same_think_structure() -> None:
    tok = tiny_tokenizer()
    t = get_template("r1-medical-zh")
    prompt = t.prompt("发热三天，下一步？", tok)
    assert "医学专家" in prompt and "### 问题：\n发热三天，下一步？\n\n### 回答：\n<think>\n" in prompt
    assert "Below is an instruction" not in prompt
    assert t.completion("推理", "回答", tok) == "推理\n</think>\n回答</s>"


def test_chat_renders_only_the_user_turn_and_builds_the_assistant_turn_by_hand() -> None:
    tok = tiny_tokenizer()
    t = get_template("chat")
    prompt = t.prompt(Q, tok)
    assert prompt == f"<s><|User|>{Q}<|Assistant|><think>\n"
    assert t.completion(R, A, tok) == f"{R}\n</think>\n\n{A}</s>"
    # Why by hand: the R1-style template drops everything up to </think> from an assistant turn, so
    # rendering the whole conversation would train on the answer without its reasoning.
    rendered = tok.apply_chat_template([{"role": "user", "content": Q},
                                        {"role": "assistant", "content": f"<think>\n{R}\n</think>\n\n{A}"}],
                                       tokenize=False)
    assert "Fever with rash" not in rendered
    assert "Fever with rash" in t.text(Q, R, A, tok)


def test_chat_does_not_open_a_second_think_block_when_the_template_already_does() -> None:
    tok = tiny_tokenizer(chat_template=R1_LIKE_CHAT_TEMPLATE_WITH_THINK)
    prompt = get_template("chat").prompt(Q, tok)
    assert prompt.endswith("<|Assistant|><think>\n")
    assert prompt.count("<think>") == 1


def test_chat_on_the_real_smollm2_template_ends_with_the_opened_think_block() -> None:
    tok = smollm2_tokenizer()
    prompt = get_template("chat").prompt(Q, tok)
    assert prompt.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n{THINK_OPEN}" == prompt[-len(
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n{THINK_OPEN}"):]
    assert get_template("chat").completion(R, A, tok).endswith(f"{A}<|im_end|>")


def test_chat_without_a_chat_template_and_any_template_without_eos_fail_with_exit_2() -> None:
    with pytest.raises(ConfigError, match="no chat template.*data.template=r1-medical"):
        get_template("chat").prompt(Q, tiny_tokenizer(chat_template=None))
    with pytest.raises(ConfigError, match="no eos_token") as e:
        get_template("r1-medical").completion(R, A, tiny_tokenizer(eos=None))
    assert e.value.exit_code == 2


def test_encode_prompt_puts_the_tokenizers_own_prefix_only_before_instruction_prompts() -> None:
    tok = tiny_tokenizer()  # adds <s> in front of every text
    bos = tok.convert_tokens_to_ids("<s>")
    r1 = get_template("r1-medical")
    ids = r1.encode_prompt(Q, tok)
    assert ids[0] == bos and ids[1:] == tok(r1.prompt(Q), add_special_tokens=False)["input_ids"]
    # The chat template renders BOS itself as text; no second BOS may be added.
    chat_ids = get_template("chat").encode_prompt(Q, tok)
    assert chat_ids.count(bos) == 1 and chat_ids[0] == bos
    # SmolLM2 adds nothing in front of a text.
    assert r1.encode_prompt(Q, smollm2_tokenizer()) == smollm2_tokenizer()(r1.prompt(Q),
                                                                           add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_appends_eos_to_every_text_contributes_only_its_prefix() -> None:
    tok = tiny_tokenizer(add_eos=True)
    assert tok("x")["input_ids"][-1] == tok.eos_token_id  # the trap: tokenizer(prompt) would end in EOS
    assert leading_special_ids(tok) == [tok.convert_tokens_to_ids("<s>")]
    assert get_template("r1-medical").encode_prompt(Q, tok)[-1] != tok.eos_token_id
    assert leading_special_ids(tiny_tokenizer(add_bos=False)) == []
