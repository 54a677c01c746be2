"""The GGUF files medft writes, read back by the programs that consume them: llama.cpp itself (through
llama-cpp-python, the dev extra) and transformers' GGUF loader.

Models: the suite's tiny random-init Llama and Qwen2 with tokenizers in the released R1-Distill files' shape
(Llama-3's and Qwen2's pre-tokenizers, Qwen2's NFC normalizer, the same added tokens), exported as q8_0 and f16
(and q4_k_m through llama.cpp's quantizer). Checked:

* llama.cpp tokenizes the Modelfile's prompt, filled in for real rows, into exactly the ids training masked
  (:meth:`Template.encode_prompt`, BOS included) and whole training texts into the tokenizer.json ids;
* transformers' GGUF tokenizer gives the tokenizer.json ids where transformers implements what the file
  says. It does not everywhere, and that is transformers', not the file's: for a Llama GGUF with a byte-level
  vocabulary it always splits text with GPT-2's pattern, whatever ``tokenizer.ggml.pre`` names (its converter's
  "HACK: patch the llama-3 tokenizer"), and for Qwen2 it adds only Qwen's own special tokens, not R1-Distill's
  added ones (``<think>``, ...; nor does its Llama builder), and never BOS. So it is checked on the Qwen2
  layout and on a GPT-2-split tokenizer (the demo's SmolLM2 shape), on text without those tokens; llama.cpp,
  which runs the file, is checked on every text whole, both R1-Distill layouts included;
* logits: llama.cpp's and transformers' from the GGUF against transformers' on the merged safetensors, max
  |difference| / max |reference logit| and top-token agreement within :data:`TOLERANCE` and :data:`AGREEMENT`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from job import gguf_export, ollama
from job.config import load_config
from job.templates import get_template
from job.tokenizer import load_tokenizer
from tests.data_factory import sample_records, write_r1_distill_tokenizer

LAYOUTS = ("llama", "qwen2")
# max |logit difference| / max |reference logit|, and the share of positions whose top token agrees. Measured
# on these models: f16 0.06% / 100%, q8_0 1.1% / 99%, q4_k_m 5.7% / 92% (Llama; Qwen2 lower).
TOLERANCE = {"f16": 0.005, "q8_0": 0.03, "q4_k_m": 0.15}
AGREEMENT = {"f16": 0.99, "q8_0": 0.95, "q4_k_m": 0.8}


#: What transformers' GGUF loader writes for SmolLM2's tokenizer (the demo's base): GPT-2's byte-level split.
GPT2_SPLIT = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}


class Exported:
    """A tiny model in an R1-Distill layout, exported as ``types``; ``pre_tokenizer`` replaces its tokenizer's."""

    def __init__(self, root: Path, layout: str, types: str = "[q8_0, f16, q4_k_m]",
                 pre_tokenizer: dict[str, Any] | None = None) -> None:
        self.merged = write_r1_distill_tokenizer(root / "merged", layout, weights=True, pre_tokenizer=pre_tokenizer)
        self.tokenizer = load_tokenizer(self.merged)
        cfg = load_config(None, [f"export.gguf={types}", "output.model_name=med"])
        self.files = gguf_export.export(cfg, self.merged, root / "gguf", self.tokenizer)
        self.template = get_template(cfg.data.template)

    def gguf(self, qtype: str) -> Path:
        return next(f for f in self.files if f.name == f"med-{qtype}.gguf")

    def prompt_template(self, qtype: str) -> str:
        modelfile = self.gguf(qtype).with_suffix(".Modelfile").read_text(encoding="utf-8")
        assert f"FROM ./med-{qtype}.gguf\n" in modelfile
        [body] = re.findall(r'^TEMPLATE """(.*?)"""$', modelfile, flags=re.S | re.M)
        return body


@pytest.fixture(scope="module", params=LAYOUTS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(tmp_path_factory.mktemp(request.param), request.param)


def _llama(path: Path, **kw: Any) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False, seed=0, **kw)


def _rows() -> list[dict[str, str]]:
    return sample_records()[:3]


def test_every_file_and_modelfile_is_written_and_k_quants_come_from_llama_cpp(exported: Exported) -> None:
    import gguf

    assert sorted(f.name for f in exported.files) == ["med-f16.Modelfile", "med-f16.gguf", "med-q4_k_m.Modelfile",
                                                      "med-q4_k_m.gguf", "med-q8_0.Modelfile", "med-q8_0.gguf"]
    readers = {q: gguf.GGUFReader(exported.gguf(q)) for q in ("f16", "q8_0", "q4_k_m")}
    kinds = {q: {t.tensor_type.name for t in r.tensors if len(t.shape) > 1} for q, r in readers.items()}
    assert kinds["f16"] == {"F16"} and kinds["q8_0"] == {"Q8_0"}
    # llama-quantize's q4_k_m: the tiny model's 64-wide rows are below k-quants' 256-wide blocks, so llama.cpp
    # falls back to q5_0/q8_0 per tensor, and says the file is Q4_K_M.
    assert kinds["q4_k_m"] and not kinds["q4_k_m"] & {"F16", "F32"}
    assert int(readers["q4_k_m"].fields["general.file_type"].contents()) == gguf.LlamaFileType.MOSTLY_Q4_K_M


def test_llama_cpp_tokenizes_the_modelfile_prompt_into_the_ids_training_used(exported: Exported) -> None:
    llm = _llama(exported.gguf("q8_0"), vocab_only=True)
    tok, template = exported.tokenizer, exported.template
    go = exported.prompt_template("q8_0")
    for row in _rows():
        prompt = ollama.fill_go_template(go, row["Question"])
        # add_bos: llama.cpp adds what the GGUF says (BOS for these tokenizers), as Ollama does.
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == template.encode_prompt(row["Question"], tok)
        text = template.text(row["Question"], row["Complex_CoT"], row["Response"], tok)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    assert llm.token_eos() == tok.eos_token_id and llm.token_bos() == tok.bos_token_id


def _transformers_ids(path: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return [loaded(text, add_special_tokens=False)["input_ids"] for text in texts]


@pytest.mark.parametrize("layout, pre_tokenizer", [("qwen2", None), ("llama", GPT2_SPLIT)], ids=["qwen2", "gpt2-split"])
def test_transformers_reads_the_gguf_tokenizer_with_the_tokenizer_json_ids(
        tmp_path_factory: pytest.TempPathFactory, layout: str, pre_tokenizer: dict[str, Any] | None) -> None:
    exported = Exported(tmp_path_factory.mktemp(f"{layout}-tok"), layout, types="[f16]", pre_tokenizer=pre_tokenizer)
    tok, template = exported.tokenizer, exported.template
    # Without R1-Distill's added tokens (the trailing <think>), which transformers' GGUF tokenizers leave out.
    texts = [t for row in _rows() for t in (template.prompt(row["Question"], tok).removesuffix("<think>\n"),
                                               row["Complex_CoT"], row["Response"])]
    assert _transformers_ids(exported.gguf("f16"), texts) == [tok(t, add_special_tokens=False)["input_ids"]
                                                               for t in texts]
    # llama.cpp takes every text whole, the added tokens and EOS included.
    llm = _llama(exported.gguf("f16"), vocab_only=True)
    for row in _rows():
        text = template.text(row["Question"], row["Complex_CoT"], row["Response"], tok)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]


def _reference_logits(exported: Exported, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported.merged, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("qtype", ["f16", "q8_0", "q4_k_m"])
def test_llama_cpp_logits_match_the_merged_model(exported: Exported, qtype: str) -> None:
    tok = exported.tokenizer
    ids = exported.template.encode_prompt(sample_records()[0]["Question"], tok)[:96]
    reference = _reference_logits(exported, ids)
    llm = _llama(exported.gguf(qtype), logits_all=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    relative = float(np.abs(got - reference).max() / np.abs(reference).max())
    assert relative <= TOLERANCE[qtype], f"{qtype}: {relative:.4f}"
    agree = float((got.argmax(-1) == reference.argmax(-1)).mean())
    assert agree >= AGREEMENT[qtype], agree


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_transformers_reads_the_gguf_weights_back(exported: Exported, qtype: str) -> None:
    from transformers import AutoModelForCausalLM

    tok = exported.tokenizer
    ids = exported.template.encode_prompt(sample_records()[1]["Question"], tok)[:96]
    reference = _reference_logits(exported, ids)
    path = exported.gguf(qtype)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    relative = float(np.abs(got - reference).max() / np.abs(reference).max())
    assert relative <= TOLERANCE[qtype], f"{qtype}: {relative:.4f}"
