"""Synthetic training rows shaped like the medical reasoning data, for benchmarks and GPU tests.

Question 40-110 tokens, reasoning 330-580, answer 80-180, plus the prompt template: 515-935 tokens a row,
drawn from a seeded generator so every arm and every run trains on the same rows.
"""

from __future__ import annotations

import random
from typing import Any

from job.architectures import Architecture

#: Token counts of one row's parts, drawn uniformly (inclusive), as in the real data.
ROW_PARTS = {"question": (40, 110), "reasoning": (330, 580), "answer": (80, 180)}
#: The r1-medical template around them: BOS and the instruction before the question, ``<think>`` after it
#: (masked out of the loss); ``</think>``, a separator and EOS in the completion.
PROMPT_OVERHEAD = 62
COMPLETION_OVERHEAD = 3


def _token_sampler(arch: Architecture, rng: random.Random) -> Any:
    top = min(arch.vocab_size, arch.bos_token_id, arch.eos_token_id, arch.pad_token_id)
    return lambda k: [rng.randrange(16, top) for _ in range(k)]


def _part_lengths(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(*ROW_PARTS[p]) for p in ("question", "reasoning", "answer"))  # type: ignore[return-value]


def synthetic_rows(arch: Architecture, n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` tokenized rows shaped like the real data, in :class:`job.data.PreparedData`'s format."""
    rng = random.Random(seed)
    ids = _token_sampler(arch, rng)
    rows = []
    for _ in range(n):
        q, r, a = _part_lengths(rng)
        prompt = [arch.bos_token_id, *ids(PROMPT_OVERHEAD - 1 + q)]
        completion = [*ids(r + a + COMPLETION_OVERHEAD - 1), arch.eos_token_id]
        rows.append({"input_ids": prompt + completion,
                     "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


def full_length_rows(arch: Architecture, n: int, tokens: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """``n`` rows of exactly ``tokens`` tokens each (the rows of :func:`synthetic_rows` with their reasoning
    lengthened or cut): the worst case the memory plan sizes a micro-batch for, every row at
    ``model.max_seq_length``. Raises ValueError when ``tokens`` cannot hold a prompt and an EOS."""
    out = []
    for row in synthetic_rows(arch, n, seed):
        prompt = row["completion_mask"].count(0)
        if tokens < prompt + 1:
            raise ValueError(f"{tokens} tokens cannot hold a {prompt}-token prompt and an EOS")
        ids = _token_sampler(arch, random.Random(seed * 7919 + len(out)))
        body = (row["input_ids"][prompt:-1] + ids(tokens))[: tokens - prompt - 1]
        out.append({"input_ids": row["input_ids"][:prompt] + body + [arch.eos_token_id],
                    "completion_mask": [0] * prompt + [1] * (tokens - prompt)})
    return out


def synthetic_records(arch: Architecture, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` raw rows (Question / Complex_CoT / Response) of ``t<N>`` words, which the synthetic tokenizer of
    :func:`benchmarks.models.build_tokenizer` maps one word to one token, so lengths match the real data."""
    rng = random.Random(seed)
    ids = _token_sampler(arch, rng)
    out = []
    for _ in range(n):
        q, r, a = _part_lengths(rng)
        out.append({k: " ".join(f"t{i}" for i in ids(m))
                    for k, m in (("Question", q), ("Complex_CoT", r), ("Response", a))})
    return out
