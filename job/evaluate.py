"""The evaluate stage: held-out loss and greedy answers to fixed questions, before and after training.

* :func:`eval_loss`: the mean loss per completion token over the eval rows, run in batches packed to a token
  budget (:data:`EVAL_TOKEN_BUDGET`) instead of a fixed number of rows; the result does not depend on the
  batching beyond floating-point rounding.
* :func:`answers`: greedy answers to ``eval.questions`` in one left-padded ``generate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from job.config import JobConfig
from job.templates import get_template
from registry import progress
from registry.logs import get_logger

log = get_logger(__name__)

#: Most padded tokens (rows x the batch's longest row) one eval-loss forward takes. Its logits dominate the
#: memory: 16,384 positions of a 152k vocabulary (Qwen-based R1-Distill models) are 5 GB in bf16. The loss is
#: then taken one row at a time in float32 (a row's logits and log-probabilities: 2 x 1.2 GB at 2,048 tokens),
#: so the peak stays below that of the former fixed batches of 4 rows of 2,048 tokens (the whole batch's
#: float32 logits and log-probabilities: 10 GB), while short rows go dozens to a forward instead of 4.
#: A row longer than the budget runs alone.
EVAL_TOKEN_BUDGET = 16_384


def token_batches(lengths: list[int], budget: int = EVAL_TOKEN_BUDGET) -> list[list[int]]:
    """Row indices packed into batches, longest rows first (an out-of-memory shows in the first batch).

    Rows are sorted by length, descending (ties in index order), and each batch is filled while its padded
    size, rows x its first (longest) row's length, stays at most ``budget``; a row longer than ``budget``
    makes a batch of one. Every index appears exactly once."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= budget:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@torch.no_grad()
def eval_loss(model: Any, rows: list[dict[str, list[int]]], pad_id: int, token_budget: int = EVAL_TOKEN_BUDGET,
              on_rows: Callable[[int], None] | None = None) -> float | None:
    """Mean loss per trained (completion) token over ``rows`` (``input_ids`` and ``completion_mask`` each):
    the summed cross-entropy of every token whose ``completion_mask`` is set, predicted from the tokens
    before it, over the number of such tokens. None when there are no rows or no completion token.

    Rows run right-padded in batches of :func:`token_batches` (``token_budget``); ``on_rows(n)`` is told each
    batch of ``n`` rows done (progress). The model is in eval mode meanwhile and left in the mode it had."""
    if not rows:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in token_batches([len(r["input_ids"]) for r in rows], token_budget):
            chunk = [rows[i] for i in batch]
            width = len(chunk[0]["input_ids"])  # the longest: batches are sorted longest first
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, r in enumerate(chunk):
                ids[j, :len(r["input_ids"])] = torch.tensor(r["input_ids"], dtype=torch.long)
                mask[j, :len(r["input_ids"])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            summed = torch.zeros((), dtype=torch.float64, device=device)
            for j, r in enumerate(chunk):  # one row at a time in float32: see EVAL_TOKEN_BUDGET
                n = len(r["input_ids"])
                # Position t's logits predict token t + 1: the targets are the row's completion tokens from 1 on.
                targets = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"][1:], r["completion_mask"][1:])],
                                       dtype=torch.long)
                count += int((targets != -100).sum())
                if n > 1:
                    summed += torch.nn.functional.cross_entropy(logits[j, :n - 1].float(), targets.to(device),
                                                               ignore_index=-100, reduction="sum").double()
            total += float(summed)  # one host sync a batch, so the progress below counts rows really done
            del logits
            if on_rows is not None:
                on_rows(len(chunk))
    finally:
        model.train(was_training)
    return total / count if count else None


@torch.no_grad()
def answers(model: Any, tokenizer: Any, cfg: JobConfig) -> list[dict[str, str]]:
    """Greedy answers to ``eval.questions``, in their order: ``{"question", "output"}``, the output being
    ``"<think>\n"`` (the prompt's end) and the answer's text decoded without special tokens.

    Each prompt is encoded exactly as the head of a training example (BOS included where training had it), and
    all of them are generated in one left-padded batch by the model's own ``generate``. Not the continuous
    engine (:func:`job.inference.batching.generate_many`) that scores benchmarks: its steps cost about the same
    for 2 answers as for 200 (measured on an H200: 23.5 s for 2 answers of 256 tokens with the training-mode
    model, no faster than its ``generate``), and a job asks only a few questions. The pipeline passes the model
    through its backend's ``for_inference`` first, before training as after (unsloth's decoding with its CUDA
    graphs: 5.5 to 6.3 s for 2 answers of up to 256 tokens on the 8B, docs/benchmarks.md run 11). The model is
    in eval mode meanwhile and left in the mode it had.
    """
    template = get_template(cfg.data.template)
    prompts = [template.encode_prompt(q, tokenizer) for q in cfg.eval.questions]
    if not prompts:
        return []
    width = max(len(p) for p in prompts)
    # Left padding: generation continues from the last real token of every row.
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [{"question": q, "output": "<think>\n" + t} for q, t in zip(cfg.eval.questions, texts, strict=True)]


def evaluate(model: Any, tokenizer: Any, eval_rows: list[dict[str, list[int]]], cfg: JobConfig,
             label: str) -> dict[str, Any]:
    """Eval loss and (when ``eval.enabled``) greedy answers, logged under ``label`` (before/after)."""
    rows = eval_rows[: cfg.eval.max_eval_rows]
    with progress.current().task(f"eval loss {label}", total=len(rows), unit="row") as task:
        loss = eval_loss(model, rows, tokenizer.pad_token_id, on_rows=task.advance)
    result: dict[str, Any] = {"eval_loss": loss, "eval_rows": len(rows),
                              "perplexity": math.exp(loss) if loss is not None and loss < 50 else None}
    result["answers"] = []
    if cfg.eval.enabled:
        # One batched generate call: the bar shows that the answers are being written, and how long they took.
        with progress.current().task(f"eval answers {label}", total=len(cfg.eval.questions), unit="question") as task:
            result["answers"] = answers(model, tokenizer, cfg)
            task.advance(len(result["answers"]))
    log.info("eval.done", when=label, eval_loss=loss, eval_rows=len(rows), questions=len(result["answers"]))
    return result
