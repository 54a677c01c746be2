"""The GGUF files medft writes, read back by the programs that consume them: llama.cpp itself (through
llama-cpp-python, the dev extra) and transformers' GGUF loader.

Models: the suite's tiny random-init Llama and Qwen2 with tokenizers in the released R1-Distill files' shape
(Llama-3's and Qwen2's pre-tokenizers, Qwen2's NFC normalizer, the same added tokens), exported as q8_0 and f16
(and q4_k_m through llama.cpp's quantizer). Checked:

* llama.cpp tokenizes the Modelfile's prompt, filled in for real rows, into exactly the ids training masked
  (:meth:`Template.encode_prompt`, BOS included) and whole training texts into the tokenizer.json ids;
* transformers' GGUF tokenizer gives the tokenizer.json ids on the rows' text. Its GGUF tokenizer builder
  for Qwen2 knows only Qwen's own special tokens, not R1-Distill's added ones (``<think>``, ...), and never
  adds BOS, so it is checked on text without those (llama.cpp, the consumer that runs the file, on all);
* logits: llama.cpp's and transformers' from the GGUF against transformers' on the merged safetensors, all in
  float32 arithmetic, max |difference| / max |reference logit| within 1% (f16) and 5% (q8_0); q4_k_m, 4-bit,
  within 25% and its top token agreeing at most positions.
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
TOLERANCE = {"f16": 0.01, "q8_0": 0.05, "q4_k_m": 0.25}


class Exported:
    def __init__(self, root: Path, layout: str) -> None:
        self.merged = write_r1_distill_tokenizer(root / "merged", layout, weights=True)
        self.tokenizer = load_tokenizer(self.merged)
        cfg = load_config(None, ["export.gguf=[q8_0, f16, q4_k_m]", "output.model_name=med"])
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


def _rows(tokenizer: Any) -> list[dict[str, str]]:
    return sample_records()[:3]


def test_every_file_and_modelfile_is_written_and_k_quants_come_from_llama_cpp(exported: Exported) -> None:
    import gguf

    assert sorted(f.name for f in exported.files) == ["med-f16.Modelfile", "med-f16.gguf", "med-q4_k_m.Modelfile",
                                                      "med-q4_k_m.gguf", "med-q8_0.Modelfile", "med-q8_0.gguf"]
    kinds = {q: {t.tensor_type.name for t in gguf.GGUFReader(exported.gguf(q)).tensors if len(t.shape) > 1}
             for q in ("f16", "q8_0", "q4_k_m")}
    assert kinds["f16"] == {"F16"} and kinds["q8_0"] == {"Q8_0"} and "Q4_K" in kinds["q4_k_m"]


def test_llama_cpp_tokenizes_the_modelfile_prompt_into_the_ids_training_used(exported: Exported) -> None:
    llm = _llama(exported.gguf("q8_0"), vocab_only=True)
    tok, template = exported.tokenizer, exported.template
    go = exported.prompt_template("q8_0")
    for row in _rows(tok):
        prompt = ollama.fill_go_template(go, row["Question"])
        # add_bos: llama.cpp adds what the GGUF says (BOS for these tokenizers), as Ollama does.
        assert llm.tokenize(prompt.encode(), add_bos=True, special=True) == template.encode_prompt(row["Question"], tok)
        text = template.text(row["Question"], row["Complex_CoT"], row["Response"], tok)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False)["input_ids"]
    assert llm.token_eos() == tok.eos_token_id and llm.token_bos() == tok.bos_token_id


def test_transformers_reads_the_gguf_tokenizer_with_the_tokenizer_json_ids(exported: Exported) -> None:
    from transformers import AutoTokenizer

    path = exported.gguf("f16")
    loaded = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = exported.tokenizer
    for row in _rows(tok):
        prompt = exported.template.prompt(row["Question"], tok).removesuffix("<think>\n")
        for text in (prompt, row["Complex_CoT"], row["Response"]):
            assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


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
    assert agree >= (0.99 if qtype == "f16" else 0.9 if qtype == "q8_0" else 0.6), agree


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
