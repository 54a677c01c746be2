"""The unsloth backend on a real GPU: what it plans, that packed rows stay apart, that it trains.

Imports of torch, transformers, trl and unsloth stay inside the tests: on a machine without CUDA this module
is collected and every test is skipped (tests/gpu/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.meter import Meter, TimedBackend
from benchmarks.models import save_random_checkpoint
from benchmarks.rows import synthetic_rows
from job import architectures

GIB = 2**30


def _config(*overrides: str):
    from job.config import load_config

    return load_config(overrides=["model.backend=unsloth", *overrides], env={})


def _data(rows):
    from job.data import DataReport, PreparedData

    return PreparedData(train=rows, eval=[], eval_rows=[], report=DataReport(source="synthetic"))


def _lora_and_base(model):
    """Float32 copies of the LoRA weights and of the frozen embeddings and norms, in host memory: on the GPU they
    would count in the peak the memory test sets beside the plan's estimate (the 1.5B's embeddings alone are
    0.87 GiB in float32)."""
    named = dict(model.named_parameters())
    lora = {n: p.detach().cpu().float() for n, p in named.items() if "lora_" in n}
    base = {n: p.detach().cpu().float() for n, p in named.items()
            if "lora_" not in n and p.dtype.is_floating_point and ("embed" in n or "norm" in n)}
    return lora, base


def test_plan_reads_this_gpu_and_says_why():
    import torch

    from job.backends import select_backend
    from job.backends.memory_plan import gpu_facts

    cfg = _config("model.base=hf://deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "train.batch_size=auto")
    backend = select_backend(cfg)
    assert backend.name == "unsloth"
    plan = backend.plan(cfg)
    assert plan.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert plan.batch_size * plan.grad_accum == 8  # the recipe's 2 x 4 rows per optimizer step, kept
    # packing: auto -> padded batches, measured faster here than padding-free ones (docs/benchmarks.md)
    assert plan.packing is False and plan.reasons["packing"].startswith("padded (auto)")
    assert backend.sft_args(cfg, plan)["gradient_checkpointing"] is bool(plan.gradient_checkpointing)
    assert {"gpu", "precision", "packing", "batch_size", "gradient_checkpointing",
            "load_in_4bit", "optim"} <= set(plan.reasons)
    assert torch.cuda.get_device_name(0) in plan.reasons["gpu"]
    if gpu_facts().usable_bytes > 40 * GIB:
        # A large GPU: the whole step in one micro-batch, no recompute, 16-bit LoRA, fused AdamW.
        assert (plan.batch_size, plan.grad_accum, plan.gradient_checkpointing) == (8, 1, False)
        assert (plan.load_in_4bit, plan.optim) == (False, "adamw_torch_fused")


def test_a_per_process_memory_cap_is_what_the_plan_sizes_for():
    import torch

    from job.backends.memory_plan import _budget, gpu_facts, micro_batch_peak
    from job.backends.unsloth import UnslothBackend

    if not hasattr(torch.cuda, "get_per_process_memory_fraction"):
        pytest.skip("this torch cannot report the per-process memory fraction (MEDFT_GPU_MEMORY_GIB can)")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(8 * GIB / total)
    try:
        gpu = gpu_facts()
        cfg = _config("model.base=hf://deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "train.batch_size=auto")
        plan = UnslothBackend().plan(cfg)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert gpu.limit == "memory fraction" and gpu.usable_bytes <= 8 * GIB
    # 8B at 2048 tokens on 8 GiB: 4-bit, checkpointing (offloaded) and the recipe's 8 rows per step; it fits.
    assert plan.gradient_checkpointing == "unsloth" and plan.load_in_4bit
    assert plan.batch_size * plan.grad_accum == 8
    need = micro_batch_peak(cfg, architectures.LLAMA_8B, plan, plan.batch_size * cfg.model.max_seq_length)
    assert need <= _budget(gpu), plan.reasons["batch_size"]


def test_packed_rows_attend_only_within_themselves(tiny_weights: Path):
    import torch

    from job.backends.unsloth import UnslothBackend

    cfg = _config(f"model.base={tiny_weights}", "model.max_seq_length=1024", "train.batch_size=auto")
    backend = UnslothBackend()
    model, _ = backend.load(tiny_weights, cfg, backend.plan(cfg))
    rows = synthetic_rows(architectures.TINY_LLAMA, 2, seed=11)
    # Short enough that even the two rows joined stay inside max_seq_length.
    a, b = (torch.tensor(r["input_ids"][:n], device="cuda") for r, n in zip(rows, (300, 400), strict=True))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        alone = model(input_ids=b[None]).logits[0].float()
        packed = model(input_ids=torch.cat([a, b])[None],
                       position_ids=torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None].cuda()
                       ).logits[0, len(a):].float()
        leaked = model(input_ids=torch.cat([a, b])[None]).logits[0, len(a):].float()
    scale = alone.abs().max()
    assert (packed - alone).abs().max() / scale < 2e-2
    # The check can fail: attending to a (one long row, no position reset) changes b's logits.
    assert (leaked - alone).abs().max() / scale > 5e-2


def test_padded_batches_train_the_same_without_their_attention_mask(tiny_weights: Path):
    import torch

    from job.backends.unsloth import UnslothBackend
    from job.train import TrainCollator, to_trainer_rows

    cfg = _config(f"model.base={tiny_weights}", "model.max_seq_length=1024")
    backend = UnslothBackend()
    plan = backend.plan(cfg)
    assert plan.packing is False
    model, _ = backend.load(tiny_weights, cfg, plan)
    model.train()
    rows = to_trainer_rows(synthetic_rows(architectures.TINY_LLAMA, 4, seed=13))
    batch = {k: v.cuda() for k, v in TrainCollator(0, padding_free=False)(rows).items()}
    lengths = torch.tensor([len(r["input_ids"]) for r in rows], device="cuda")
    mask = (torch.arange(batch["input_ids"].shape[1], device="cuda")[None, :] < lengths[:, None]).long()
    assert "attention_mask" not in batch and (mask == 0).any()  # the rows really are padded

    def loss_and_grad(extra):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch, **extra).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None])
        return loss.item(), grads

    loss, grads = loss_and_grad({})
    masked_loss, masked_grads = loss_and_grad({"attention_mask": mask})
    assert abs(loss - masked_loss) <= 1e-2 * abs(masked_loss)
    assert (grads - masked_grads).norm() <= 3e-2 * masked_grads.norm()


def test_unsloth_trains_a_tiny_model_padding_free_in_4_bit(tiny_weights: Path, tmp_path: Path):
    from job.backends import select_backend
    from job.train import fit

    cfg = _config(f"model.base={tiny_weights}", "model.max_seq_length=1024", "train.batch_size=auto",
                  "train.packing=true", "model.load_in_4bit=true", "train.optim=adamw_8bit",
                  "train.max_steps=8", "train.warmup_steps=0",
                  "train.learning_rate=0.005",
                  "train.checkpoint_every=1000", "train.seed=7")
    backend = select_backend(cfg)
    plan = backend.plan(cfg)
    assert plan.load_in_4bit and plan.optim == "adamw_8bit"
    model, tokenizer = backend.load(tiny_weights, cfg, plan)
    lora_before, base_before = _lora_and_base(model)
    assert lora_before and base_before
    meter = Meter()
    result = fit(cfg, TimedBackend(backend, meter), plan, model, tokenizer,
                 _data(synthetic_rows(architectures.TINY_LLAMA, 16, seed=5)), work_dir=tmp_path / "trainer")

    assert result.steps == 8
    lora_after, base_after = _lora_and_base(model)
    assert any(not lora_after[n].equal(lora_before[n]) for n in lora_before if "lora_B" in n)
    assert all(base_after[n].equal(base_before[n]) for n in base_before)  # frozen weights stay frozen
    # Padding-free: every micro-batch fed exactly its rows' tokens, none of padding.
    assert meter.fed == meter.real and len(meter.real) == 8 * plan.grad_accum
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.parametrize("compile_blocks", ["false", "true"])  # false: what train.compile auto gives a short job
def test_qwen2_1_5b_shape_trains_within_its_estimated_memory(tmp_path_factory: pytest.TempPathFactory,
                                                              tmp_path: Path, compile_blocks: str):
    import gc

    import torch

    from job.backends import select_backend
    from job.backends.memory_plan import micro_batch_peak
    from job.train import fit

    arch = architectures.QWEN_1_5B
    weights = save_random_checkpoint(arch, tmp_path_factory.getbasetemp() / "qwen1.5b", seed=0)  # one for both
    gc.collect()
    held_before = torch.cuda.memory_allocated()  # what earlier tests left is not this model's to count
    cfg = _config(f"model.base={weights}", "train.batch_size=auto", "train.max_steps=3",
                  "train.checkpoint_every=1000", f"train.compile={compile_blocks}")
    backend = select_backend(cfg)
    plan = backend.plan(cfg)
    model, tokenizer = backend.load(weights, cfg, plan)
    lora_before, _ = _lora_and_base(model)
    meter = Meter()
    result = fit(cfg, TimedBackend(backend, meter), plan, model, tokenizer,
                 _data(synthetic_rows(arch, 32, seed=2)), work_dir=tmp_path / "trainer")

    assert result.steps == 3, result
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.loss_history), result.loss_history
    lora_after, _ = _lora_and_base(model)
    assert sum(not lora_after[n].equal(lora_before[n]) for n in lora_before) >= len(lora_before) // 2
    # The planner's estimate for the largest micro-batch trained bounds the real peak: plans built on it fit.
    estimate = micro_batch_peak(cfg, arch, plan, max(meter.fed))
    used = result.peak_gpu_mem_gib * GIB - held_before
    assert used <= estimate, (plan, max(meter.fed), held_before / GIB, result.peak_gpu_mem_gib, estimate / GIB)


def test_unsloth_loads_a_model_for_inference_that_generates(tiny_weights: Path):
    """The inference seam (``load_for_inference`` then ``for_inference``), as ``medft generate`` uses it."""
    import torch

    from job.backends.unsloth import UnslothBackend

    backend = UnslothBackend()
    model = backend.for_inference(backend.load_for_inference(tiny_weights, max_seq_length=1024))
    assert not model.training and next(model.parameters()).device.type == "cuda"
    prompt = torch.tensor([synthetic_rows(architectures.TINY_LLAMA, 1, seed=17)[0]["input_ids"][:16]], device="cuda")
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                             min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 20) and torch.equal(out[0, :16], prompt[0])


def test_the_eval_before_training_through_the_inference_path_changes_no_training_step(
        tiny_weights: Path, monkeypatch: pytest.MonkeyPatch):
    """The pipeline evaluates before training on ``for_inference``'s model (eval loss, greedy answers), then calls
    ``for_training``. The eval loss must be what the training-mode model gives; the next training step must
    compute what it computes without the detour, with the plan's gradient checkpointing; the answers must be the
    same with decode graphs as without; and the decode buffers generation left must be gone after it."""
    import torch

    from job import evaluate
    from job.backends.unsloth import UnslothBackend
    from job.train import TrainCollator, to_trainer_rows

    cfg = _config(f"model.base={tiny_weights}", "model.max_seq_length=1024", "train.gradient_checkpointing=unsloth")
    backend = UnslothBackend()
    plan = backend.plan(cfg)
    assert plan.gradient_checkpointing == "unsloth"
    model, _ = backend.load(tiny_weights, cfg, plan)
    model.train()
    rows = synthetic_rows(architectures.TINY_LLAMA, 4, seed=19)
    batch = {k: v.cuda() for k, v in TrainCollator(0, padding_free=False)(to_trainer_rows(rows)).items()}

    def checkpointing():
        # Truthiness: get_peft_model sets True, for_training the recorded mode's name ("unsloth").
        return [bool(m.gradient_checkpointing) for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def loss_and_grad():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad(set_to_none=True)
        return loss.item(), grads

    armed = checkpointing()
    assert any(armed)
    loss, grads = loss_and_grad()
    training_mode_eval = evaluate.eval_loss(model, rows, 0)

    inference = backend.for_inference(model)
    assert not inference.training
    assert evaluate.eval_loss(inference, rows, 0) == pytest.approx(training_mode_eval, rel=1e-2)
    prompt = torch.tensor([rows[0]["input_ids"][:32]], device="cuda")

    def answer() -> torch.Tensor:
        with torch.no_grad():
            return inference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                      min_new_tokens=8, do_sample=False, pad_token_id=0)

    assert os.environ["UNSLOTH_DECODE_CUDA_GRAPHS"] == "1"  # load's default: the decode steps replay graphs
    graphed = answer()
    assert any(m.__dict__.get("_unsloth_graph_buffers") is not None for m in model.modules())
    monkeypatch.setenv("UNSLOTH_DECODE_CUDA_GRAPHS", "0")
    assert graphed.shape == (1, 40) and torch.equal(graphed, answer())  # the eager steps give the same tokens
    assert backend.for_training(model) is model

    assert model.training and checkpointing() == armed
    again, again_grads = loss_and_grad()
    assert again == pytest.approx(loss, rel=1e-3)
    assert (again_grads - grads).norm() <= 1e-2 * grads.norm()
    # Memory training does not budget: the eager decode buffers and the graphs' own.
    assert not any(hasattr(m, "paged_attention") or "_unsloth_graph_buffers" in m.__dict__ for m in model.modules())


def test_the_plan_decides_whether_unsloth_compiles_the_decoder_blocks(tiny_weights: Path):
    """``train.compile`` reaches unsloth: compiled decoder blocks mark themselves checked after their first
    compiled call (unsloth's ``_block_compile``); eager ones never run that path."""
    import torch

    from job.backends.unsloth import UnslothBackend
    from job.train import TrainCollator, to_trainer_rows

    rows = to_trainer_rows(synthetic_rows(architectures.TINY_LLAMA, 2, seed=23))
    batch = {k: v.cuda() for k, v in TrainCollator(0, padding_free=False)(rows).items()}
    for setting, compiled in (("false", False), ("true", True)):
        cfg = _config(f"model.base={tiny_weights}", "model.max_seq_length=1024", f"train.compile={setting}")
        backend = UnslothBackend()
        plan = backend.plan(cfg)
        assert plan.compile is compiled
        model, _ = backend.load(tiny_weights, cfg, plan)
        model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(**batch).loss.backward()
        layers = [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
        assert layers and all(bool(layer.__dict__.get("_unsloth_block_checked")) is compiled for layer in layers)
        del model
