"""Rows to training examples: templating, tokenizing, the loss mask, too-long handling, the train/eval split
and the token statistics of the data report (:func:`prepare`); and ``medft data validate`` (:func:`validate`).
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from job.config import DataConfig, JobConfig
from job.data.results import DataReport, DatasetIdentity, PreparedData, Row
from job.data.sources import load_rows
from job.templates import Template, eos_token, get_template
from registry.errors import DataError
from registry.logs import get_logger

log = get_logger(__name__)

#: Rows tokenized per call: large enough for the fast tokenizer's batching, small enough to bound memory.
_TOKENIZE_BATCH = 2048
#: Reasoning and answer lengths are measured on at most this many rows (evenly spaced): tokenizing them
#: apart from the completion would otherwise nearly double the cost of ``prepare`` on a large dataset.
STATS_SAMPLE_ROWS = 2000


class _Encoder:
    """Batch tokenization without special tokens, through the Rust backend when that is provably the same.

    ``tokenizer(texts)`` builds offsets, attention masks and Python objects per token that prepare never
    uses; the fast tokenizer's own ``encode_batch_fast`` skips them and is several times faster. It is
    used only when it gives the same ids as ``tokenizer(...)`` on the texts of the first batch, so a
    tokenizer that preprocesses text in Python is still tokenized its own way.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        self._backend = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
        self._verified = self._backend is None

    def _slow(self, texts: list[str]) -> list[list[int]]:
        return list(self._tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"])

    def _batches(self, texts: list[str]) -> Iterator[list[str]]:
        for i in range(0, len(texts), _TOKENIZE_BATCH):
            yield texts[i:i + _TOKENIZE_BATCH]

    def _fast(self, texts: list[str]) -> list[Any] | None:
        if self._backend is None:
            return None
        encodings = self._backend(texts, add_special_tokens=False)
        if not self._verified:
            probe = texts[:8]
            if [e.ids for e in encodings[:len(probe)]] != self._slow(probe):
                log.info("data.tokenizer_python_path", reason="its backend gives other ids than tokenizer(...)")
                self._backend = None
                return None
            self._verified = True
        return encodings

    def ids(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for batch in self._batches(texts):
            enc = self._fast(batch)
            out.extend([e.ids for e in enc] if enc is not None else self._slow(batch))
        return out

    def lengths(self, texts: list[str]) -> list[int]:
        out: list[int] = []
        for batch in self._batches(texts):
            enc = self._fast(batch)
            out.extend([len(e) for e in enc] if enc is not None else [len(x) for x in self._slow(batch)])
        return out


def _stats(values: list[int]) -> dict[str, float]:
    s = sorted(values)
    return {"min": s[0], "median": round(float(statistics.median(s)), 1),
            "p95": s[max(0, math.ceil(0.95 * len(s)) - 1)], "max": s[-1]}


def split_indices(rows: list[Row], candidates: list[int], eval_fraction: float, seed: int
                  ) -> tuple[list[int], list[int]]:
    """Split ``candidates`` (indices into ``rows``) into sorted train and eval indices, disjoint.

    ``round(n * eval_fraction)`` rows go to eval, at least 1 when ``eval_fraction > 0`` and ``n >= 2``,
    never all. Rows that share a question stay on one side (so eval questions are unseen), unless every
    row shares one. Deterministic for ``seed``.
    """
    n = len(candidates)
    if eval_fraction <= 0 or n < 2:
        return sorted(candidates), []
    want = min(n - 1, max(1, round(n * eval_fraction)))
    groups: dict[str, list[int]] = {}
    for i in candidates:
        groups.setdefault(rows[i].question, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    chosen: list[int] = []
    for g in order:
        if len(chosen) >= want:
            break
        if len(chosen) + len(g) < n:
            chosen.extend(g)
    if not chosen:  # one question throughout: split rows, not questions
        shuffled = sorted(candidates)
        random.Random(seed).shuffle(shuffled)
        chosen = shuffled[:want]
    eval_set = set(chosen)
    return sorted(i for i in candidates if i not in eval_set), sorted(eval_set)


@dataclass
class _Tokens:
    """Every row's prompt and completion body ids, and the reasoning/answer lengths of the stats sample."""

    prefix: list[int]
    prompts: list[list[int]]
    bodies: list[list[int]]
    reasoning_lengths: list[int]
    answer_lengths: list[int]
    sample_rows: int


def _eos_id(tokenizer: Any) -> int:
    """The id every example ends with; ConfigError (from ``eos_token``) when the tokenizer has none."""
    eos_token(tokenizer)
    eos_id = int(tokenizer.eos_token_id)
    if getattr(tokenizer, "bos_token_id", None) == eos_id:
        log.warning("data.eos_is_bos", eos_token=tokenizer.eos_token,
                    hint="if the model's generation stops on another token, it will never learn to stop")
    return eos_id


def _tokenize(rows: list[Row], tokenizer: Any, template: Template) -> _Tokens:
    prefix = template.prefix_ids(tokenizer)
    encoder = _Encoder(tokenizer)
    prompts = encoder.ids([template.prompt(r.question, tokenizer) for r in rows])
    bodies = encoder.ids([template.completion_body(r.reasoning, r.answer) for r in rows])
    step = max(1, math.ceil(len(rows) / STATS_SAMPLE_ROWS))
    sample = rows[::step]
    return _Tokens(prefix=prefix, prompts=prompts, bodies=bodies,
                   reasoning_lengths=encoder.lengths([r.reasoning for r in sample]),
                   answer_lengths=encoder.lengths([r.answer for r in sample]), sample_rows=len(sample))


def _build_examples(tokens: _Tokens, eos_id: int, max_len: int, d: DataConfig, report: DataReport
                    ) -> tuple[dict[int, dict[str, list[int]]], list[int]]:
    """Examples by row index, rows too long dropped or truncated (counted in ``report``); every row's total."""
    examples: dict[int, dict[str, list[int]]] = {}
    totals: list[int] = []
    for i, (prompt, body) in enumerate(zip(tokens.prompts, tokens.bodies)):
        head = tokens.prefix + prompt
        tail = body + [eos_id]
        total = len(head) + len(tail)
        totals.append(total)
        if total > max_len:
            if d.too_long == "drop":
                report.dropped["too_long"] += 1
                continue
            if len(head) >= max_len:
                report.dropped["prompt_too_long"] += 1
                continue
            tail = tail[:max_len - len(head)]
            report.truncated += 1
        mask = [1] * (len(head) + len(tail)) if d.train_on_prompt else [0] * len(head) + [1] * len(tail)
        examples[i] = {"input_ids": head + tail, "completion_mask": mask}
    return examples, totals


def _require_examples(examples: dict[int, Any], tokens: _Tokens, totals: list[int], max_len: int,
                      d: DataConfig) -> None:
    if examples:
        return
    if d.too_long == "truncate":
        shortest = len(tokens.prefix) + min(len(x) for x in tokens.prompts)
        raise DataError(f"{d.source}: no row is left: every prompt alone fills model.max_seq_length={max_len} "
                        f"tokens (shortest prompt {shortest}); raise model.max_seq_length")
    raise DataError(f"{d.source}: no row is left: all {len(totals)} rows are longer than "
                    f"model.max_seq_length={max_len} tokens (shortest {min(totals)}); raise "
                    "model.max_seq_length or set data.too_long=truncate")


def prepare(rows: list[Row], tokenizer: Any, cfg: JobConfig, *, report: DataReport | None = None
            ) -> PreparedData:
    """Format, tokenize, length-check and split ``rows``.

    Each example is ``prefix + prompt + completion + EOS`` where the prompt and the completion are
    tokenized separately, so the mask boundary is exact and the prompt ids equal
    ``Template.encode_prompt``. ``completion_mask`` is 0 on the prompt and 1 on the completion (EOS
    included), or all 1 with ``data.train_on_prompt``. A row longer than ``model.max_seq_length`` is
    dropped (``too_long``) or, with ``data.too_long=truncate``, cut at the limit (losing its EOS); a row
    whose prompt alone fills the limit is dropped (``prompt_too_long``). ``report`` (from ``load_rows``)
    is carried over and completed.

    Raises DataError (exit 3) when no row is left, ConfigError when the tokenizer has no EOS token or
    (``chat``) no chat template.
    """
    d = cfg.data
    started = time.monotonic()
    template = get_template(d.template)
    report = dataclasses.replace(report, dropped=dict(report.dropped)) if report else DataReport(
        source=d.source, rows_read=len(rows), rows_kept=len(rows))
    if not rows:
        raise DataError(f"{d.source}: row 1: no rows to train on; add rows to the data")
    eos_id = _eos_id(tokenizer)
    max_len = cfg.model.max_seq_length
    tokens = _tokenize(rows, tokenizer, template)
    examples, totals = _build_examples(tokens, eos_id, max_len, d, report)

    report.token_stats = {"prompt": _stats([len(tokens.prefix) + len(p) for p in tokens.prompts]),
                          "reasoning": _stats(tokens.reasoning_lengths), "answer": _stats(tokens.answer_lengths),
                          "total": _stats(totals)}
    report.token_stats_rows = tokens.sample_rows
    report.template, report.max_seq_length = template.name, max_len
    report.rows_kept = len(examples)
    _require_examples(examples, tokens, totals, max_len, d)
    train_idx, eval_idx = split_indices(rows, list(examples), d.eval_fraction, cfg.train.seed)
    report.train_rows, report.eval_rows = len(train_idx), len(eval_idx)
    log.info("data.prepared", template=template.name, train=len(train_idx), eval=len(eval_idx),
             dropped=report.dropped, truncated=report.truncated, seconds=round(time.monotonic() - started, 2))
    return PreparedData(train=[examples[i] for i in train_idx], eval=[examples[i] for i in eval_idx],
                        eval_rows=[rows[i] for i in eval_idx], report=report,
                        used_rows=[rows[i] for i in sorted(examples)])


def validate(cfg: JobConfig, tokenizer: Any = None, *,
             loaded: tuple[list[Row], DatasetIdentity, DataReport] | None = None) -> DataReport:
    """``medft data validate``: load and check the data; with a tokenizer, also format and measure it.

    ``loaded`` is what :func:`load_rows` already returned for ``cfg``, to avoid reading the data twice.
    With a tokenizer (and ``model.tokenizer_check``), the template and a sample of rows must survive its
    encode/decode round trip first, as in training (:func:`job.tokenizer.check_round_trip`).
    Raises what :func:`load_rows` and :func:`prepare` raise, ConfigError when the round trip fails.
    """
    rows, _identity, report = loaded if loaded is not None else load_rows(cfg)
    if tokenizer is None:
        return report
    if cfg.model.tokenizer_check:
        from job.tokenizer import check_round_trip, guard_texts

        check_round_trip(tokenizer, guard_texts(rows, cfg.data.template, tokenizer),
                         name=f"model.base {cfg.model.base}")
    return prepare(rows, tokenizer, cfg, report=report).report
