"""On the GPU: the unsloth backend tokenizes the R1-Distill-Llama shape exactly as the hf backend and the file do.

The base is a tiny random Llama (the GPU tests' shape) whose tokenizer has the released DeepSeek-R1-Distill-Llama
files' shape: byte-level BPE ``tokenizer.json``, ``tokenizer_config.json`` naming ``LlamaTokenizerFast``, which
transformers 5 would rebuild with a SentencePiece pre-tokenizer (spaces and newlines lost). Nothing from the hub.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

BOUNDARY = "\n\n### Response:\n<think>\nOkay, let us see."


def test_unsloth_and_hf_backends_give_the_file_ids_on_the_r1_llama_shape(tmp_path: Path):
    import torch
    from tokenizers import Tokenizer

    from benchmarks.models import build_random_model
    from job import architectures
    from job.backends.unsloth import UnslothBackend
    from job.config import load_config
    from job.data import Row
    from job.tokenizer import check_round_trip, guard_texts, load_tokenizer
    from tests.data_factory import R1_BOS, R1_EOS, sample_records, write_r1_distill_tokenizer

    dest = write_r1_distill_tokenizer(tmp_path / "r1-llama", "llama", tokenizer_class="LlamaTokenizerFast")
    raw = Tokenizer.from_file(str(dest / "tokenizer.json"))
    arch = replace(architectures.TINY_LLAMA, key="tiny-r1-llama", vocab_size=raw.get_vocab_size(),
                   bos_token_id=raw.token_to_id(R1_BOS), eos_token_id=raw.token_to_id(R1_EOS),
                   pad_token_id=raw.token_to_id("<｜▁pad▁｜>"))
    model = build_random_model(arch, dtype=torch.bfloat16, device="cuda")
    model.save_pretrained(dest)  # weights and config.json; the tokenizer files stay as written
    del model
    torch.cuda.empty_cache()

    cfg = load_config(overrides=[f"model.base={dest}", "model.backend=unsloth", "model.max_seq_length=1024",
                                 "model.load_in_4bit=false", "train.batch_size=1",
                                 "train.gradient_checkpointing=off"], env={})
    backend = UnslothBackend()
    _, unsloth_tokenizer = backend.load(dest, cfg, backend.plan(cfg))
    # The hf backend loads its tokenizer with exactly this call (job/backends/hf.py).
    hf_tokenizer = load_tokenizer(dest, trust_remote_code=False)

    rows = [Row(r["Question"], r["Complex_CoT"], r["Response"], i + 1) for i, r in enumerate(sample_records()[:8])]
    texts = [BOUNDARY, *(t for _, t in guard_texts(rows, "r1-medical", hf_tokenizer))]
    for text in texts:
        file_ids = raw.encode(text, add_special_tokens=False).ids
        assert unsloth_tokenizer(text, add_special_tokens=False)["input_ids"] == file_ids
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == file_ids
        assert unsloth_tokenizer(text)["input_ids"] == hf_tokenizer(text)["input_ids"] == raw.encode(text).ids

    # The "\n" after <think> survives as its own token, and the text comes back whole.
    ids = unsloth_tokenizer(BOUNDARY, add_special_tokens=False)["input_ids"]
    think = raw.token_to_id("<think>")
    assert unsloth_tokenizer.decode([ids[ids.index(think) + 1]]) == "\n"
    assert unsloth_tokenizer.decode(ids) == BOUNDARY
    assert unsloth_tokenizer.eos_token_id == unsloth_tokenizer.pad_token_id == raw.token_to_id(R1_EOS)
    check_round_trip(unsloth_tokenizer, guard_texts(rows, "r1-medical", unsloth_tokenizer), name="unsloth")
