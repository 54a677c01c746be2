"""The batch engines (job/inference/batching.py) on tiny random Llama and Qwen2 models, on the CPU in float32.

Greedy answers of the continuous engine must equal plain one-prompt-at-a-time ``generate`` token for token,
whatever the number of slots; seeded samples must not depend on the batch they share or on the engine;
forced lengths must be exact; slots must be refilled as answers end.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from job.inference import Loaded, Sampling
from job.inference.batching import _SlotModel, generate_many, plan_engine, unsupported
from job.inference.sampling import choose, uniforms
from job.templates import get_template
from tests.model_factory import tiny_config

STOP = 2


class _Tokenizer:
    """Just what the engines read from a tokenizer: the EOS and pad ids."""

    eos_token_id = STOP
    pad_token_id = 0


def _loaded(arch: str, seed: int = 0) -> Loaded:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size=256)
    config.eos_token_id, config.pad_token_id = STOP, 0
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return Loaded(label=arch, model=model, tokenizer=_Tokenizer(), template=get_template("r1-medical"),
                  backend="transformers")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 256) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def _one_at_a_time(loaded: Loaded, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.inference_mode():
            gen = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                        do_sample=False, eos_token_id=[STOP], pad_token_id=0)
        new = gen[0, len(p):].tolist()
        end = next((n for n, t in enumerate(new) if t == STOP), None)
        out.append(new if end is None else new[:end + 1])
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def loaded(request: Any) -> Loaded:
    return _loaded(request.param)


def test_greedy_answers_equal_one_at_a_time_generate_for_any_number_of_slots(loaded: Loaded) -> None:
    prompts = _prompts(7)
    reference = _one_at_a_time(loaded, prompts, 24)
    greedy = Sampling(max_new_tokens=24, temperature=0.0)
    for slots in (1, 3, 7):
        got = generate_many(loaded, prompts, greedy, max_in_flight=slots, engine="continuous")
        assert [c.ids for c in got] == reference, f"{slots} slots"
        assert [c.stopped for c in got] == [ids[-1] == STOP for ids in reference]
    static = generate_many(loaded, prompts, greedy, max_in_flight=3, engine="static")
    assert [c.ids for c in static] == reference


def test_slots_are_refilled_as_answers_end_and_lengths_are_forced(loaded: Loaded) -> None:
    """Answers of very different forced lengths through 2 slots: each exactly its length, ending in a stop."""
    prompts = _prompts(5, seed=1)
    lengths = [1, 17, 3, 30, 8]
    seen: list[tuple[int, int]] = []
    got = generate_many(loaded, prompts, Sampling(max_new_tokens=40, temperature=0.0), max_in_flight=2,
                        engine="continuous", lengths=lengths, progress=lambda d, t: seen.append((d, t)))
    assert [len(c.ids) for c in got] == lengths
    assert all(c.stopped and c.ids[-1] == STOP and STOP not in c.ids[:-1] for c in got)
    assert seen == [(n, 5) for n in range(1, 6)]
    static = generate_many(loaded, prompts, Sampling(max_new_tokens=40, temperature=0.0), max_in_flight=2,
                           engine="static", lengths=lengths)
    assert [c.ids for c in static] == [c.ids for c in got]


def test_max_new_tokens_ends_an_answer_without_a_stop(loaded: Loaded) -> None:
    got = generate_many(loaded, _prompts(3, seed=2), Sampling(max_new_tokens=5, temperature=0.0),
                        engine="continuous", lengths=[9, 9, 9])
    assert all(len(c.ids) == 5 and not c.stopped for c in got)


def test_a_seeded_sample_depends_on_its_seed_not_on_its_batch_or_engine(loaded: Loaded) -> None:
    prompts = _prompts(6, seed=3)
    hot = Sampling(max_new_tokens=16, temperature=1.0, top_p=0.9)
    seeds = [11, 12, 13, 14, 15, 16]
    together = generate_many(loaded, prompts, hot, seeds=seeds, max_in_flight=6, engine="continuous")
    in_twos = generate_many(loaded, prompts, hot, seeds=seeds, max_in_flight=2, engine="continuous")
    alone = [generate_many(loaded, [p], hot, seeds=[s], engine="continuous")[0] for p, s in zip(prompts, seeds)]
    static = generate_many(loaded, prompts, hot, seeds=seeds, max_in_flight=4, engine="static")
    assert [c.ids for c in together] == [c.ids for c in in_twos] == [c.ids for c in alone] == [c.ids for c in static]
    other = generate_many(loaded, prompts, hot, seeds=[s + 100 for s in seeds], engine="continuous")
    assert [c.ids for c in other] != [c.ids for c in together]
    greedy = generate_many(loaded, prompts, Sampling(max_new_tokens=16, temperature=0.0), engine="continuous")
    assert [c.ids for c in greedy] != [c.ids for c in together]


def test_the_sampler_follows_the_distribution_and_top_p() -> None:
    """Many rows, one distribution: the frequencies match it, and top-p drops the tail."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 20000
    logits = probs.log().repeat(rows, 1)
    seeds = torch.arange(rows, dtype=torch.long)
    steps = torch.zeros(rows, dtype=torch.long)
    counts = torch.bincount(choose(logits, temperature=1.0, top_p=1.0, seeds=seeds, steps=steps), minlength=4)
    assert torch.allclose(counts / rows, probs, atol=0.015)
    nucleus = torch.bincount(choose(logits, temperature=1.0, top_p=0.8, seeds=seeds, steps=steps), minlength=4)
    assert nucleus[2] == nucleus[3] == 0  # 0.5 + 0.3 reaches 0.8: the rest is cut
    assert abs(nucleus[0] / rows - 0.625) < 0.015
    u = uniforms(seeds[:100], steps[:100], 1000)
    assert float(u.min()) > 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_other_architectures_fall_back_to_static_batches() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    assert "GPT2LMHeadModel" in (unsupported(model) or "")
    plan = plan_engine(model, [[1, 2, 3]], 8, None)
    assert plan.engine == "static" and "GPT2LMHeadModel" in plan.reason


def test_the_slot_cache_logits_equal_the_full_forward(loaded: Loaded) -> None:
    """Prefill then decode one token through the cache gives the logits of a plain forward over both."""
    prompt = _prompts(1, seed=4)[0]
    runner = _SlotModel(loaded.model, slots=2, length=64)
    with torch.inference_mode():
        first = runner.prefill(1, prompt)
        full = loaded.model(torch.tensor([prompt + [7]])).logits[0].float()
        step = runner.decode(torch.tensor([0, 7]), torch.tensor([0, len(prompt)]), 64)
    assert torch.allclose(first[0], full[-2], atol=1e-4)
    assert torch.allclose(step[1], full[-1], atol=1e-4)
