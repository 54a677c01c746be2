"""The evaluate stage: held-out loss and greedy answers to fixed questions, before and after training."""

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


@torch.no_grad()
def eval_loss(model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int = 4,
              on_rows: Callable[[int], None] | None = None) -> float | None:
    """Mean loss per trained (completion) token over ``rows``; None when there are no eval rows.
    ``on_rows(n)`` is told each batch of ``n`` rows done (progress)."""
    if not rows:
        return None
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            n = len(r["input_ids"])
            ids[j, :n] = torch.tensor(r["input_ids"])
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor([t if m else -100 for t, m in zip(r["input_ids"], r["completion_mask"])])
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 shifted.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shifted != -100).sum())
        if on_rows is not None:
            on_rows(len(chunk))
    model.train(was_training)
    return total / count if count else None


@torch.no_grad()
def answers(model: Any, tokenizer: Any, cfg: JobConfig) -> list[dict[str, str]]:
    """Greedy answers to ``eval.questions``, generated in one left-padded batch.

    Each prompt is encoded exactly as the head of a training example (BOS included where training had it).
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
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    model.train(was_training)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [{"question": q, "output": "<think>\n" + t} for q, t in zip(cfg.eval.questions, texts)]


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
