"""The unsloth backend's sizing: pure, so it is tested here without a GPU (the module imports no unsloth)."""

import pytest

from job import architectures
from job.backends.memory_plan import (
    COMPILE_MIN_STEPS,
    GIB,
    HEADROOM_BYTES,
    HEADROOM_FRACTION,
    GpuFacts,
    estimate_peak_bytes,
    micro_batch_peak,
    plan_for,
)
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
    assert (plan.load_in_4bit, plan.optim, plan.precision) == (False, "adamw_torch_fused", "bf16")
    assert {"gpu", "batch_size", "gradient_checkpointing", "packing", "load_in_4bit", "precision",
            "optim"} <= set(plan.reasons)
    assert "16-bit LoRA fits" in plan.reasons["load_in_4bit"]


def test_an_80_gib_gpu_keeps_the_large_micro_batch_and_gives_up_16_bit_weights_first():
    plan = plan_for(_cfg(), _gpu(80), LLAMA8B)
    assert (plan.batch_size, plan.gradient_checkpointing, plan.load_in_4bit) == (8, False, True)
    assert "over the budget" in plan.reasons["load_in_4bit"]
    sixteen = estimate_peak_bytes(LLAMA8B, tokens=8 * 2048, load_in_4bit=False, checkpointing=False, lora_r=16,
                                  target_modules=_cfg().lora.target_modules, optim=plan.optim)
    assert sixteen > 75 * GIB  # why: the 16-bit weights would not fit beside 8 rows of activations


def test_an_8_gib_card_fits_by_checkpointing_and_keeps_8_rows_per_step():
    plan = plan_for(_cfg(), _gpu(8), LLAMA8B)
    assert plan.gradient_checkpointing == "unsloth" and plan.load_in_4bit
    assert plan.batch_size * plan.grad_accum == 8
    need = micro_batch_peak(_cfg(), LLAMA8B, plan, plan.batch_size * 2048)
    assert need <= 8 * GIB and "does not fit" not in plan.reasons["batch_size"]


def test_float32_adam_moments_cost_memory_the_estimate_counts():
    common = {"tokens": 2048, "load_in_4bit": True, "checkpointing": "unsloth", "lora_r": 16,
              "target_modules": _cfg().lora.target_modules}
    fused = estimate_peak_bytes(LLAMA8B, optim="adamw_torch_fused", **common)
    eight_bit = estimate_peak_bytes(LLAMA8B, optim="adamw_8bit", **common)
    assert fused - eight_bit == 6 * LLAMA8B.lora_parameters(16, common["target_modules"])


def test_the_smallest_budget_falls_back_to_the_recipes_8_bit_adamw():
    # Just enough for the recipe's 2 x 4 with 8-bit moments, not for float32 ones.
    common = {"tokens": 2 * 2048, "load_in_4bit": True, "checkpointing": "unsloth", "lora_r": 16,
              "target_modules": _cfg().lora.target_modules}
    eight_bit = estimate_peak_bytes(LLAMA8B, optim="adamw_8bit", **common)
    fused = estimate_peak_bytes(LLAMA8B, optim="adamw_torch_fused", **common)
    usable = ((eight_bit + fused) / 2 + HEADROOM_BYTES) / (1 - HEADROOM_FRACTION)
    gpu = GpuFacts(name="tight", total_bytes=int(usable), usable_bytes=int(usable), bf16=True, capability=(8, 0),
                   limit="total")
    plan = plan_for(_cfg(), gpu, LLAMA8B)
    assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing) == (2, 4, "unsloth")
    assert (plan.load_in_4bit, plan.optim) == (True, "adamw_8bit")
    assert "would not fit" in plan.reasons["optim"]


def test_a_prequantized_base_stays_4_bit_and_pinned_settings_are_kept():
    prequantized = plan_for(_cfg("model.base=hf://unsloth/DeepSeek-R1-Distill-Llama-8B-bnb-4bit",
                                 "model.merge_base=hf://deepseek-ai/DeepSeek-R1-Distill-Llama-8B"),
                            _gpu(139), LLAMA8B)
    assert prequantized.load_in_4bit and "pre-quantized" in prequantized.reasons["load_in_4bit"]
    pinned = plan_for(_cfg("model.load_in_4bit=true", "train.optim=adamw_8bit"), _gpu(139), LLAMA8B)
    assert (pinned.load_in_4bit, pinned.optim) == (True, "adamw_8bit")
    assert pinned.reasons["optim"] == "adamw_8bit: as configured"


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


def test_16_bit_lora_asked_for_is_kept_where_it_fits_and_falls_back_to_4_bit_where_not():
    plan = plan_for(_cfg("model.load_in_4bit=false"), _gpu(8), LLAMA8B)
    assert plan.load_in_4bit and "budget" in plan.reasons["load_in_4bit"]
    # On 24 GiB auto would take 4-bit without checkpointing; asked for 16-bit, it checkpoints instead.
    assert plan_for(_cfg(), _gpu(24), LLAMA8B).load_in_4bit
    asked = plan_for(_cfg("model.load_in_4bit=false"), _gpu(24), LLAMA8B)
    assert asked.load_in_4bit is False and asked.reasons["load_in_4bit"] == "False: as configured"


def test_configured_values_are_kept_and_an_unknown_shape_keeps_the_recipe():
    fixed = plan_for(_cfg("train.batch_size=2", "train.gradient_checkpointing=on"), _gpu(139), LLAMA8B)
    assert (fixed.batch_size, fixed.grad_accum) == (2, 4) and fixed.gradient_checkpointing
    unknown = plan_for(_cfg(), _gpu(139, bf16=False), None)
    assert (unknown.batch_size, unknown.grad_accum, unknown.precision) == (2, 4, "fp16")
    assert (unknown.load_in_4bit, unknown.optim) == (True, "adamw_8bit")


@pytest.mark.parametrize(("overrides", "compiled", "why"), [
    ((), False, "off (auto): 60 steps"),  # the recipe's job: compiling costs more than it saves
    ((f"train.max_steps={COMPILE_MIN_STEPS - 1}",), False, "off (auto)"),
    ((f"train.max_steps={COMPILE_MIN_STEPS}",), True, "on (auto)"),
    (("train.max_steps=-1", "train.epochs=0.5"), True, "on (auto): trains by epochs"),
    (("train.compile=true",), True, "on (train.compile)"),
    (("train.compile=false", "train.max_steps=5000"), False, "off (train.compile)"),
])
def test_only_jobs_long_enough_to_pay_it_back_compile_their_decoder_blocks(overrides, compiled, why):
    for shape in (LLAMA8B, None):  # sized or not, the decision is the job's length
        plan = plan_for(_cfg(*overrides), _gpu(80), shape)
        assert plan.compile is compiled and plan.reasons["compile"].startswith(why)
        assert plan.record().compile is compiled  # stored with the run


def test_the_hf_backend_never_compiles_and_says_so_when_asked():
    from job.backends.hf import HFBackend

    assert HFBackend().plan(_cfg()).compile is False and "compile" not in HFBackend().plan(_cfg()).reasons
    asked = HFBackend().plan(_cfg("train.compile=true"))
    assert asked.compile is False and "runs eager" in asked.reasons["compile"]
