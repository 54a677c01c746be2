"""Prompt templates: how a (question, reasoning, answer) row becomes the text a model is trained on.

Every template splits a training text in two, and the split is the contract the rest of medft relies on:

* ``prompt(question, tokenizer)``: everything up to and including the opening ``<think>\\n``. It is both the
  part of the training text that is masked out of the loss and, unchanged, the prompt a trained model is
  asked at inference, so the model is asked exactly the way it was taught.
* ``completion(reasoning, answer, tokenizer)``: the reasoning, the closing ``</think>``, the answer and the
  tokenizer's EOS token (a model that never sees EOS never learns to stop).

The training text is ``prompt(...) + completion(...)``; :meth:`Template.encode_prompt` gives the token ids
of the prompt exactly as :func:`job.data.prepare` builds them, for the evaluation and inference code.
"""

from __future__ import annotations

from typing import Any

from registry.errors import ConfigError

THINK_OPEN = "<think>\n"
THINK_CLOSE = "</think>"

# The reference tutorials' instruction prompt (DeepSeek-R1 medical fine-tuning), with the question and the
# response header around the opening <think>.
_R1_HEAD_EN = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "Before answering, think carefully about the question and create a step-by-step chain of thoughts to "
    "ensure a logical and accurate response.\n\n"
    "### Instruction:\n"
    "You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment "
    "planning. Please answer the following medical question.\n\n"
    "### Question:\n"
)
_R1_TAIL_EN = "\n\n### Response:\n" + THINK_OPEN

# The same prompt for the dataset's Chinese subset, so a zh model is asked in the language it answers in.
_R1_HEAD_ZH = (
    "以下是一条描述任务的指令，并附有提供更多背景信息的输入。请写出恰当完成该请求的回答。\n"
    "回答之前，请仔细思考问题，并逐步梳理思路，以确保回答合乎逻辑且准确。\n\n"
    "### 指令：\n"
    "你是一名医学专家，在临床推理、诊断和治疗方案制定方面拥有深厚的知识。请回答以下医学问题。\n\n"
    "### 问题：\n"
)
_R1_TAIL_ZH = "\n\n### 回答：\n" + THINK_OPEN


def eos_token(tokenizer: Any) -> str:
    """The tokenizer's EOS token text; raises ConfigError (exit 2) when it has none."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos or getattr(tokenizer, "eos_token_id", None) is None:
        raise ConfigError("model.base: the tokenizer has no eos_token, so a trained model could never learn to "
                          "stop; use a model whose tokenizer defines one")
    return str(eos)


def leading_special_ids(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts in front of any text when asked to add special tokens (usually BOS).

    Found by encoding a probe with and without special tokens, so a tokenizer that also appends something
    (an EOS after every text) contributes only its prefix: a prompt must never end in EOS.
    """
    probe = "probe text"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    # The tokenizer changes the text itself when adding specials; fall back to a BOS it declares.
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and full[:1] == [bos] else []


class Template:
    """A way to format rows; see the module docstring for the prompt/completion contract.

    ``tokenizer_adds_prefix`` says whether the tokens the tokenizer adds by itself (BOS) go in front of the
    prompt; a chat template renders its own BOS text, so it does not.
    """

    name: str = ""
    tokenizer_adds_prefix: bool = True
    #: Between ``</think>`` and the answer.
    answer_separator: str = "\n"

    def prompt(self, question: str, tokenizer: Any = None) -> str:
        """The inference prompt, ending with the opening ``<think>\\n``."""
        raise NotImplementedError

    def completion_body(self, reasoning: str, answer: str) -> str:
        """The completion without the EOS token: ``{reasoning}\\n</think>{separator}{answer}``."""
        return f"{reasoning}\n{THINK_CLOSE}{self.answer_separator}{answer}"

    def completion(self, reasoning: str, answer: str, tokenizer: Any) -> str:
        """The trained part: reasoning, closing ``</think>``, answer and the tokenizer's EOS token.

        Raises ConfigError when the tokenizer has no EOS token.
        """
        return self.completion_body(reasoning, answer) + eos_token(tokenizer)

    def text(self, question: str, reasoning: str, answer: str, tokenizer: Any) -> str:
        """The whole training text: ``prompt + completion``."""
        return self.prompt(question, tokenizer) + self.completion(reasoning, answer, tokenizer)

    def prefix_ids(self, tokenizer: Any) -> list[int]:
        """Special token ids that go before the prompt text (BOS for instruction templates, none for chat)."""
        return leading_special_ids(tokenizer) if self.tokenizer_adds_prefix else []

    def encode_prompt(self, question: str, tokenizer: Any) -> list[int]:
        """The prompt's token ids, identical to the masked head of the training example built for it."""
        ids = tokenizer(self.prompt(question, tokenizer), add_special_tokens=False)["input_ids"]
        return self.prefix_ids(tokenizer) + list(ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class InstructionTemplate(Template):
    """A fixed instruction paragraph, the question, a response header and ``<think>`` (tokenizer-agnostic)."""

    def __init__(self, name: str, head: str, tail: str) -> None:
        self.name = name
        self._head = head
        self._tail = tail

    def prompt(self, question: str, tokenizer: Any = None) -> str:
        return self._head + question + self._tail


class ChatTemplate(Template):
    """The model's own chat template for the user turn; the assistant turn is built by hand.

    The DeepSeek-R1-Distill chat template deletes everything up to ``</think>`` from assistant turns, so
    rendering the whole conversation with ``apply_chat_template`` would silently drop the reasoning we want
    to train on. Only the user turn and the generation prompt are rendered by the template.
    """

    tokenizer_adds_prefix = False
    answer_separator = "\n\n"

    def __init__(self) -> None:
        self.name = "chat"

    def prompt(self, question: str, tokenizer: Any = None) -> str:
        """Raises ConfigError when the tokenizer has no chat template."""
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template=chat: the tokenizer of model.base has no chat template; use "
                              "data.template=r1-medical")
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        # Newer DeepSeek-R1-Distill templates already open the think block in the generation prompt.
        if text.endswith(THINK_OPEN):
            return text
        if text.endswith(THINK_OPEN.rstrip("\n")):
            return text + "\n"
        return text + THINK_OPEN


TEMPLATES: dict[str, Template] = {
    "r1-medical": InstructionTemplate("r1-medical", _R1_HEAD_EN, _R1_TAIL_EN),
    "r1-medical-zh": InstructionTemplate("r1-medical-zh", _R1_HEAD_ZH, _R1_TAIL_ZH),
    "chat": ChatTemplate(),
}


def get_template(name: str) -> Template:
    """The template called ``name``; raises ConfigError (exit 2) for an unknown name."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"data.template: unknown template {name!r}; use one of "
                          f"{', '.join(sorted(TEMPLATES))}") from None
