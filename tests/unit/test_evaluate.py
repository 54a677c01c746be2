"""The evaluate stage (job/evaluate.py) on tiny random Llama and Qwen2 models, on the CPU in float32.

The greedy answers of the one left-padded ``generate`` must equal each question's answer generated alone; the
eval loss must equal the former fixed batches of 4 rows and not depend on the token budget; empty inputs give
empty results.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from job import evaluate
from job.templates import get_template
from tests.data_factory import SAMPLE, config_for, tiny_tokenizer
from tests.model_factory import tiny_config

#: Questions whose prompts differ in length (249 to 301 tokens with the tiny tokenizer).
QUESTIONS = ("Why?", "What causes a fever in a child after a long flight and a cough?",
             "A 61-year-old woman with a long history of involuntary urine loss during activities like coughing or "
             "sneezing. What next?", "Pain", "Is it the heart or the lungs?")
#: The EOS row of the output layer scaled by this much: some answers then stop early and others run to the limit.
EOS_BOOST = {"llama": 2.0, "qwen2": 4.3}
MAX_NEW = 24


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer()


def _model(arch: str, tokenizer: Any, eos_boost: float = 1.0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=len(tokenizer))
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= eos_boost
    return model.train()  # as the stage gets it before training


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def arch(request: Any) -> str:
    return str(request.param)


def _cfg(questions: tuple[str, ...], max_new_tokens: int = MAX_NEW) -> Any:
    cfg = config_for(SAMPLE)
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"questions": questions,
                                                                       "max_new_tokens": max_new_tokens})})


# --- answers ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _one_at_a_time(model: Any, tokenizer: Any, cfg: Any) -> tuple[list[dict[str, str]], list[int | None]]:
    """Each question's greedy answer generated alone (no padding), and its length up to its EOS (None: no EOS
    within the limit)."""
    answers, lengths = [], []
    for q in cfg.eval.questions:
        ids = torch.tensor([get_template(cfg.data.template).encode_prompt(q, tokenizer)])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        lengths.append(new.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in new else None)
        answers.append({"question": q, "output": "<think>\n" + tokenizer.decode(new, skip_special_tokens=True)})
    return answers, lengths


def test_left_padded_answers_equal_each_question_alone(arch: str, tokenizer: Any) -> None:
    model = _model(arch, tokenizer, EOS_BOOST[arch])
    cfg = _cfg(QUESTIONS)
    reference, lengths = _one_at_a_time(model.eval(), tokenizer, cfg)
    model.train()
    # The premise: answers of several lengths, some cut off by the limit, so padding after an EOS is exercised.
    assert None in lengths and len({n for n in lengths if n is not None}) >= 2, lengths
    got = evaluate.answers(model, tokenizer, cfg)
    assert got == reference
    assert [a["question"] for a in got] == list(QUESTIONS) and all(a["output"].startswith("<think>\n") for a in got)
    assert len({a["output"] for a in got}) > 1  # the answers differ: the comparison is not between constants
    assert model.training  # left in the mode it had
    model.eval()
    assert evaluate.answers(model, tokenizer, cfg) == reference and not model.training


def test_no_questions_no_answers(tokenizer: Any) -> None:
    model = _model("llama", tokenizer)
    assert evaluate.answers(model, tokenizer, _cfg(())) == []
    assert model.training


# --- eval loss -------------------------------------------------------------------------------------------


def _rows(n: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Rows of 2 to 70 tokens: a prompt head (masked) and a completion (trained), in no order of length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        length = rng.randint(2, 70)
        head = rng.randint(1, length - 1)
        rows.append({"input_ids": [rng.randrange(3, vocab) for _ in range(length)],
                     "completion_mask": [0] * head + [1] * (length - head)})
    return rows


@torch.no_grad()
def _loss_in_fours(model: Any, rows: list[dict[str, list[int]]], pad_id: int) -> float:
    """The former ``eval_loss``: rows in their order, 4 to a batch, the loss over each whole batch."""
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(rows), 4):
        chunk = rows[i:i + 4]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])])
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shifted = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shifted != -100).sum())
    model.train()
    return total / count


def test_eval_loss_equals_the_former_batches_of_four_and_not_the_budget(arch: str, tokenizer: Any) -> None:
    model = _model(arch, tokenizer)
    rows = _rows(13, len(tokenizer))
    pad = tokenizer.pad_token_id
    reference = _loss_in_fours(model, rows, pad)
    batches: dict[str, list[int]] = {"alone": [], "default": [], "together": []}
    alone = evaluate.eval_loss(model, rows, pad, token_budget=1, on_rows=batches["alone"].append)
    default = evaluate.eval_loss(model, rows, pad, on_rows=batches["default"].append)
    together = evaluate.eval_loss(model, rows, pad, token_budget=10**9, on_rows=batches["together"].append)
    assert batches == {"alone": [1] * 13, "default": [13], "together": [13]}
    for loss in (alone, default, together):
        assert loss == pytest.approx(reference, rel=1e-5)
    assert model.training  # left in the mode it had
    # Not a constant: other rows give another loss.
    assert evaluate.eval_loss(model, _rows(13, len(tokenizer), seed=1), pad) != pytest.approx(reference, rel=1e-3)


def test_eval_loss_counts_only_completion_tokens(tokenizer: Any) -> None:
    """A row's loss is the mean over its completion tokens alone, each predicted from the tokens before it."""
    model = _model("llama", tokenizer).eval()
    row = {"input_ids": [5, 9, 17, 33, 41, 60], "completion_mask": [0, 0, 0, 1, 1, 1]}
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([row["input_ids"]])).logits[0].float(), dim=-1)
    expected = -sum(float(logp[t - 1, row["input_ids"][t]]) for t in (3, 4, 5)) / 3
    assert evaluate.eval_loss(model, [row], tokenizer.pad_token_id) == pytest.approx(expected, rel=1e-5)
    assert not model.training


def test_eval_loss_of_nothing_is_none(tokenizer: Any) -> None:
    model = _model("llama", tokenizer)
    called: list[int] = []
    assert evaluate.eval_loss(model, [], tokenizer.pad_token_id, on_rows=called.append) is None and called == []
    untrained = [{"input_ids": [5, 6, 7], "completion_mask": [0, 0, 0]}, {"input_ids": [8], "completion_mask": [1]}]
    assert evaluate.eval_loss(model, untrained, tokenizer.pad_token_id, on_rows=called.append) is None
    assert called == [2] and model.training


def test_token_batches_pack_longest_first_within_the_budget() -> None:
    lengths = [5, 40, 12, 40, 3, 90, 12, 7]
    # 90 is over the budget: alone; two rows of 40 fill 80; the five shortest pad to 5 x 12 = 60.
    assert evaluate.token_batches(lengths, budget=80) == [[5], [1, 3], [2, 6, 7, 0, 4]]
    assert evaluate.token_batches(lengths, budget=59) == [[5], [1], [3], [2, 6, 7, 0], [4]]
    assert evaluate.token_batches(lengths, budget=1) == [[5], [1], [3], [2], [6], [7], [0], [4]]
    assert evaluate.token_batches(lengths, budget=10**6) == [[5, 1, 3, 2, 6, 7, 0, 4]]
    assert evaluate.token_batches([], budget=80) == []


def test_the_hf_backend_round_trip_around_eval_before_leaves_the_model_as_training_needs_it(tokenizer: Any) -> None:
    """The pipeline runs the evaluation before training on ``for_inference``'s model, then ``for_training``:
    the model must come back in training mode with its gradient checkpointing, and its loss unchanged."""
    from job.backends.hf import HFBackend

    backend = HFBackend()
    model = _model("llama", tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = _rows(5, len(tokenizer))
    inference = backend.for_inference(model)
    assert not any(m.training for m in inference.modules())
    before = evaluate.eval_loss(inference, rows, tokenizer.pad_token_id)
    assert backend.for_training(model) is model
    assert all(m.training for m in model.modules()) and model.is_gradient_checkpointing
    assert evaluate.eval_loss(model, rows, tokenizer.pad_token_id) == pytest.approx(before, rel=1e-6)
