"""The continuous engine (job/inference/batching.py) on the GPU: the same greedy answers as one-at-a-time
``generate``, and the same model as unsloth's own forward when unsloth loaded it."""

from __future__ import annotations

from pathlib import Path

from job.templates import get_template


def _prompts(n: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(10, 1900) for _ in range(rng.randint(8, 120))] for _ in range(n)]


def test_greedy_answers_equal_one_at_a_time_generate_on_the_gpu(tiny_weights: Path) -> None:
    """float32 on the GPU (no TF32): batching changes no greedy token of 8 answers of 64 tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from job.inference import Loaded, Sampling
    from job.inference.batching import generate_many
    from job.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_weights, dtype=torch.float32, use_safetensors=True).cuda().eval()
    tokenizer = load_tokenizer(tiny_weights, trust_remote_code=False)
    loaded = Loaded(label="tiny", model=model, tokenizer=tokenizer, template=get_template("r1-medical"),
                    backend="transformers")
    prompts = _prompts(8)
    stop = tokenizer.eos_token_id
    reference = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                                 eos_token_id=[stop], pad_token_id=stop)[0, len(p):].tolist()
        end = next((n for n, t in enumerate(new) if t == stop), None)
        reference.append(new if end is None else new[:end + 1])
    got = generate_many(loaded, prompts, Sampling(max_new_tokens=64, temperature=0.0), max_in_flight=3,
                        engine="continuous")
    assert [c.ids for c in got] == reference


def test_the_slot_model_computes_what_unsloth_loaded(tiny_weights: Path) -> None:
    """Through unsloth's inference load (its patched modules), the slot cache's logits match the model's own
    forward in bf16 within a bf16 tolerance, and pick the same greedy token."""
    import torch

    from job.backends.unsloth import UnslothBackend
    from job.inference.batching import _SlotModel

    backend = UnslothBackend()
    model = backend.for_inference(backend.load_for_inference(tiny_weights, max_seq_length=1024))
    prompt = _prompts(1)[0]
    runner = _SlotModel(model, slots=2, length=256)
    with torch.inference_mode():
        mine = runner.prefill(0, prompt)[0]
        theirs = model(torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    scale = theirs.abs().max()
    assert (mine - theirs).abs().max() <= 0.05 * scale, float((mine - theirs).abs().max() / scale)
    assert int(mine.argmax()) == int(theirs.argmax())


def test_the_slot_model_computes_what_the_training_model_computes(tiny_weights: Path) -> None:
    """``eval.benchmarks`` scores the model being trained: unsloth's training load with LoRA (its patched MLP
    and attention modules). The slot cache's logits match that model's own forward in bf16, LoRA included."""
    import torch

    from job.backends import select_backend
    from job.config import load_config
    from job.inference.batching import _SlotModel

    cfg = load_config(overrides=["model.backend=unsloth", f"model.base={tiny_weights}", "model.max_seq_length=1024"],
                      env={})
    backend = select_backend(cfg)
    model, _ = backend.load(tiny_weights, cfg, backend.plan(cfg))
    with torch.no_grad():  # a LoRA that is not zero, so the check sees the adapter's contribution
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    prompt = _prompts(1)[0]
    model.eval()
    with torch.inference_mode():
        mine = _SlotModel(model, slots=1, length=256).prefill(0, prompt)[0]
        theirs = model(input_ids=torch.tensor([prompt], device="cuda")).logits[0, -1].float()
    scale = theirs.abs().max()
    assert (mine - theirs).abs().max() <= 0.05 * scale, float((mine - theirs).abs().max() / scale)
    assert int(mine.argmax()) == int(theirs.argmax())
