"""Choosing the next token of many rows at once: greedy, or sampled reproducibly per row.

Sampling draws each row's token with the exponential race (``argmax p_i / E_i`` with ``E_i ~ Exp(1)`` picks
token ``i`` with probability ``p_i``), where ``E_i`` comes from a counter-based hash of (the row's seed, the
step, the token id) instead of a generator's state. So a row's sample depends only on its own logits, seed and
step: the same seed gives the same answer whatever else shares the batch, in whichever slot, in whichever
order questions finish, and the static and the continuous engine sample alike. Top-p keeps the smallest set of
most likely tokens whose probability reaches ``top_p`` (the token that crosses it included), as transformers'
``TopPLogitsWarper`` does.

Greedy takes the first maximum (``argmax``), as ``generate`` does.
"""

from __future__ import annotations

from typing import Any

_MASK32 = 0xFFFFFFFF


def _mix32(x: Any) -> Any:
    """A 32-bit avalanche hash (the "lowbias32" constants) on int64 tensors holding values in [0, 2**32).

    int64 products wrap modulo 2**64, so their low 32 bits are the exact 32-bit products."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniforms(seeds: Any, steps: Any, vocab: int) -> Any:
    """``[rows, vocab]`` float64 uniforms in (0, 1), a pure function of each row's (seed, step) and the token id."""
    import torch

    row = _mix32((_mix32(seeds & _MASK32) ^ (steps & _MASK32)) & _MASK32)
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    h = _mix32((row[:, None] + ids[None, :] * 0x9E3779B9) & _MASK32)
    h = _mix32(h ^ row[:, None])
    return (h.to(torch.float64) + 0.5) / 2.0**32


def choose(logits: Any, *, temperature: float, top_p: float, seeds: Any | None, steps: Any | None) -> Any:
    """The next token of every row of ``logits`` (``[rows, vocab]``): greedy when ``temperature == 0``, else a
    sample at ``temperature`` within the top-p nucleus, drawn from ``seeds``/``steps`` (int64 ``[rows]``)."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # the mass of the tokens more likely than this one
        drop = before >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    race = probs.double() / -torch.log(uniforms(seeds, steps, probs.shape[-1]))
    return race.argmax(dim=-1)
