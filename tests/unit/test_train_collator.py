"""The train stage's collator: padded batches train without an attention mask, with the same loss and gradients."""

import pytest
import torch

from job.train import TrainCollator, to_trainer_rows
from tests.model_factory import tiny_config


def _rows(lengths: list[int]) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in lengths:
        ids = torch.randint(5, 500, (n,), generator=gen).tolist()
        prompt = n // 3
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * (n - prompt)})
    return to_trainer_rows(rows)


def _loss_and_grads(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_right_padded_batch_without_its_mask_has_the_same_loss_and_gradients(arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32, attn_implementation="sdpa")
    rows = _rows([37, 12, 29, 5])
    collator = TrainCollator(pad_token_id=0, padding_free=False)
    batch = collator(rows)

    assert "attention_mask" not in batch and collator.tokens == 37 + 12 + 29 + 5
    assert batch["input_ids"].shape == (4, 37)
    lengths = torch.tensor([37, 12, 29, 5])
    mask = (torch.arange(37)[None, :] < lengths[:, None]).long()
    assert (batch["labels"][mask == 0] == -100).all()  # padding is on the right and out of the loss

    loss, grads = _loss_and_grads(model, batch)
    masked_loss, masked_grads = _loss_and_grads(model, {**batch, "attention_mask": mask})
    assert loss == pytest.approx(masked_loss, rel=1e-5)
    for g, m in zip(grads, masked_grads, strict=True):
        torch.testing.assert_close(g, m, rtol=1e-4, atol=1e-6)

    # The check can fail: the same rows padded on the left do need their mask.
    def left_pad(key: str, value: int) -> torch.Tensor:
        return torch.stack([torch.cat([torch.full((37 - len(r[key]),), value), torch.tensor(r[key])]) for r in rows])

    left = {"input_ids": left_pad("input_ids", 0), "labels": left_pad("labels", -100)}
    unmasked_left, _ = _loss_and_grads(model, left)
    assert unmasked_left != pytest.approx(masked_loss, rel=1e-3)


def test_a_padding_free_batch_is_one_row_with_positions_and_no_padding():
    collator = TrainCollator(pad_token_id=0, padding_free=True)
    batch = collator(_rows([7, 4]))
    assert batch["input_ids"].shape == (1, 11) and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3]]
