"""The unsloth backend's sizing: pure, so it is tested here without a GPU (the module imports no unsloth)."""

import pytest

from job import architectures
from job.backends.unsloth import GIB, GpuFacts, estimate_peak_bytes, plan_for
from job.config import load_config


def _gpu(gib: float, bf16: bool = True) -> GpuFacts:
    return GpuFacts(name=f"test {gib} GiB", total_bytes=int(gib * GIB), usable_bytes=int(gib * GIB), bf16=bf16,
                    capability=(9, 0), limit="total")


def _cfg(*overrides: str):
    return load_config(None, list(overrides), env={})


LLAMA8B = architectures.get("llama8b")


def test_a_large_gpu_trains_the_recipes_step_in_one_micro_batch_without_checkpointing():
    plan = plan_for(_cfg(), _gpu(139), LLAMA8B)
    assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing) == (8, 1, False)
    assert plan.load_in_4bit and plan.precision == "bf16"
    assert {"gpu", "batch_size", "gradient_checkpointing", "packing", "load_in_4bit", "precision"} <= set(plan.reasons)


def test_an_8_gib_card_fits_by_checkpointing_and_keeps_8_rows_per_step():
    plan = plan_for(_cfg(), _gpu(8), LLAMA8B)
    assert plan.gradient_checkpointing == "unsloth"
    assert plan.batch_size * plan.grad_accum == 8
    need = estimate_peak_bytes(LLAMA8B, tokens=plan.batch_size * 2048, load_in_4bit=True, checkpointing="unsloth",
                               lora_r=16, target_modules=_cfg().lora.target_modules)
    assert need <= 8 * GIB and "does not fit" not in plan.reasons["batch_size"]


@pytest.mark.parametrize("gib", [8, 12, 16, 24, 40, 80, 139])
def test_every_plan_keeps_the_recipes_rows_per_optimizer_step(gib):
    plan = plan_for(_cfg(), _gpu(gib), LLAMA8B)
    assert plan.batch_size * plan.grad_accum == 2 * 4


def test_no_checkpointing_is_preferred_then_the_largest_micro_batch_that_fits():
    plans = {g: plan_for(_cfg(), _gpu(g), LLAMA8B) for g in (8, 12, 16, 24, 40, 80, 139)}
    # Checkpointing recomputes the forward pass (measured 24-26% slower), so once any micro-batch fits
    # without it, it is off, even at a micro-batch of 1.
    assert [p.gradient_checkpointing for p in plans.values()] == ["unsloth", "unsloth"] + [False] * 5
    without = [p.batch_size for p in plans.values() if p.gradient_checkpointing is False]
    assert without == sorted(without) and without[-1] == 8  # within one mode, more memory never means less


def test_16_bit_lora_that_cannot_fit_falls_back_to_4_bit_and_says_why():
    plan = plan_for(_cfg("model.load_in_4bit=false"), _gpu(8), LLAMA8B)
    assert plan.load_in_4bit and "budget" in plan.reasons["load_in_4bit"]


def test_configured_values_are_kept_and_an_unknown_shape_keeps_the_recipe():
    fixed = plan_for(_cfg("train.batch_size=2", "train.gradient_checkpointing=on"), _gpu(139), LLAMA8B)
    assert (fixed.batch_size, fixed.grad_accum) == (2, 4) and fixed.gradient_checkpointing
    unknown = plan_for(_cfg(), _gpu(139, bf16=False), None)
    assert (unknown.batch_size, unknown.grad_accum, unknown.precision) == (2, 4, "fp16")
