"""GGUF files of the merged model (``export.gguf``), for llama.cpp, Ollama and LM Studio.

Each listed type becomes ``gguf/<model_name>-<type>.gguf`` beside an Ollama Modelfile (:mod:`job.ollama`).
The file is written with the ``gguf`` library of the llama.cpp project, streamed: the tensor table is built
from the safetensors headers first, then every tensor is read, converted (and quantized) and written one at
a time, so host memory holds one tensor, never the model. The ``gguf`` library quantizes f16, bf16, q8_0,
q4_0, q4_1, q5_0 and q5_1 itself; a k-quant (q4_k_m, ...) is made from the f16 file by llama.cpp's own
quantizer: the ``llama-quantize`` binary (``MEDFT_LLAMA_QUANTIZE``, else on ``PATH``; the image has it), else
the same library function through ``llama-cpp-python`` when that is installed (the dev extra).
:func:`check_plan` requires one of them before training.

Inside each file: the architecture's hyperparameters, the tokenizer (``tokenizer.json``'s byte-level BPE
vocabulary and merges, its special tokens, whether a BOS goes first, and ``tokenizer.ggml.pre``: llama.cpp's
name for the pre-tokenizer, read from the ``pre_tokenizer`` section of tokenizer.json, see
:func:`pre_tokenizer_name`) and a chat template that renders the prompt the model was trained with.

Supported architectures: Llama (R1-Distill-Llama, SmolLM2) and Qwen2 (R1-Distill-Qwen). llama.cpp rotates
Llama's query and key heads in interleaved order where transformers splits them in halves, so those two
weights are permuted on the way (Qwen2 uses the halves order in both).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from job.config import GGUF_K_QUANTS, JobConfig
from registry.errors import ConfigError, DataError
from registry.logs import get_logger

log = get_logger(__name__)

#: The environment variable naming llama.cpp's ``llama-quantize`` binary (else it is looked up on PATH).
QUANTIZE_ENV = "MEDFT_LLAMA_QUANTIZE"
QUANTIZE_HOWTO = ("build it from llama.cpp (cmake -B build && cmake --build build --target llama-quantize) or use "
                  "the medft image, then put it on PATH or set MEDFT_LLAMA_QUANTIZE to its path")
#: config.json ``model_type`` -> (GGUF architecture, whether q/k are permuted to llama.cpp's rope order).
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False)}

# tokenizer.json pre-tokenizer split patterns llama.cpp implements, by its ``tokenizer.ggml.pre`` name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def quantize_binary() -> str | None:
    """llama.cpp's ``llama-quantize``: ``$MEDFT_LLAMA_QUANTIZE`` when set, else on PATH; None when neither.

    Raises ConfigError when the variable names something that is not an executable file.
    """
    named = os.environ.get(QUANTIZE_ENV)
    if named:
        if not (os.path.isfile(named) and os.access(named, os.X_OK)):
            raise ConfigError(f"{QUANTIZE_ENV}={named}: not an executable file; point it at llama.cpp's "
                              "llama-quantize or unset it")
        return named
    return shutil.which("llama-quantize")


def _llama_cpp_binding() -> Any | None:
    """llama-cpp-python's ``llama_cpp`` module (llama.cpp's library), or None when not installed."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    import llama_cpp

    return llama_cpp


def check_plan(cfg: JobConfig) -> None:
    """Before training: a k-quant in ``export.gguf`` needs llama.cpp's quantizer (ConfigError, exit 2, otherwise)."""
    wanted = [t for t in cfg.export.gguf if t in GGUF_K_QUANTS]
    if wanted and quantize_binary() is None and _llama_cpp_binding() is None:
        raise cfg.error("export.gguf", f"{wanted[0]} is made by llama.cpp's llama-quantize, which is not on PATH "
                                       f"({QUANTIZE_ENV} is unset and llama-cpp-python is not installed); "
                                       f"{QUANTIZE_HOWTO}; or list only types the gguf library writes (f16, bf16, "
                                       "q8_0, q4_0, q4_1, q5_0, q5_1)")


def pre_tokenizer_name(tokenizer_json: dict[str, Any], where: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json, from its pre-tokenizer.

    llama.cpp's converter recognises a tokenizer by hashing the ids it gives a probe text; medft reads the
    pre-tokenizer itself instead, which is what those ids depend on: Llama-3's split pattern (digits in
    threes, R1-Distill-Llama) is ``llama-bpe``, Qwen2's (single digits, R1-Distill-Qwen) is ``qwen2``, and
    GPT-2's built-in byte-level split (what transformers rebuilds SmolLM2's tokenizer as) is ``gpt-2``.
    Raises ConfigError for any other (the GGUF would split text differently from training). A normalizer is not
    carried: llama.cpp has none, so R1-Distill-Qwen's NFC step is skipped there (text already in NFC, as
    nearly all text is, tokenizes the same).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            shape.append(("Split", (step.get("pattern") or {}).get("Regex"), step.get("behavior")))
        elif kind == "ByteLevel":
            shape.append(("ByteLevel", bool(step.get("use_regex", True)), bool(step.get("add_prefix_space"))))
        else:
            shape.append((kind,))
    known = {
        (("Split", _LLAMA3_SPLIT, "Isolated"), ("ByteLevel", False, False)): "llama-bpe",
        (("Split", _QWEN2_SPLIT, "Isolated"), ("ByteLevel", False, False)): "qwen2",
        (("ByteLevel", True, False),): "gpt-2",
    }
    name = known.get(tuple(shape))
    if name is None or (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise ConfigError(f"{where}: export.gguf: this tokenizer's pre-tokenizer ({[s[0] for s in shape]}) is not "
                          "one medft maps to llama.cpp (Llama-3, Qwen2 or GPT-2 byte-level BPE); set "
                          "export.gguf=[] and convert with llama.cpp's convert_hf_to_gguf.py")
    return name


def check_model(model_dir: Path) -> None:
    """Before training: the base's architecture and tokenizer can be written as GGUF (ConfigError otherwise)."""
    config = json.loads((model_dir / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{model_dir / 'config.json'}: export.gguf: model_type {arch} is not one medft writes "
                          f"as GGUF ({', '.join(ARCHITECTURES)}); set export.gguf=[]")
    _rope_scaling(config, model_dir / "config.json")
    if (model_dir / "tokenizer.json").exists():  # else checked at export, on the tokenizer training saved
        pre_tokenizer_name(json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8")),
                           str(model_dir / "tokenizer.json"))


def _rope_scaling(config: dict[str, Any], where: Path) -> dict[str, Any] | None:
    """The config's rope scaling when it is one GGUF carries (Llama 3's), None when there is none."""
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"{where}: export.gguf: rope scaling {kind!r} is not written to GGUF by medft; "
                          "set export.gguf=[]")
    return scaling


def _rope_theta(config: dict[str, Any]) -> float:
    return float(config.get("rope_theta") or (config.get("rope_parameters") or {}).get("rope_theta") or 10000.0)


def _llama3_rope_factors(config: dict[str, Any], scaling: dict[str, Any]) -> Any:
    """Per-frequency divisors of Llama 3's rope scaling (llama.cpp's ``rope_freqs`` tensor): long wavelengths
    are stretched by ``factor``, short ones kept, the band between interpolated."""
    import numpy as np

    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / (_rope_theta(config) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    return divisor.astype(np.float32)


@dataclass(frozen=True)
class _Target:
    name: str  # GGUF tensor name
    source: str | None  # safetensors name (None: computed, rope_freqs)
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType


def _shards(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return [model_dir / n for n in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return sorted(model_dir.glob("*.safetensors"))


def _tensor_type(shape: tuple[int, ...], wanted: Any) -> Any:
    """GGML type of one tensor: 1-D ones (norms, biases) stay float32, as in every llama.cpp file; a row length
    the type's blocks do not divide falls back to f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block = GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else GGMLQuantizationType.F16


def _plan(model_dir: Path, config: dict[str, Any], arch: Any, wanted: Any) -> list[_Target]:
    """Every tensor to write, from the safetensors headers only (no weights read)."""
    import gguf
    from gguf import GGMLQuantizationType
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    targets = []
    for shard in _shards(model_dir):
        with safe_open(shard, "np") as f:
            for key in f.keys():
                name = names.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise DataError(f"{shard}: tensor {key} has no GGUF name for this architecture; "
                                    "set export.gguf=[]")
                shape = tuple(f.get_slice(key).get_shape())
                targets.append(_Target(name, key, shape, _tensor_type(shape, wanted)))
    if _rope_scaling(config, model_dir / "config.json"):
        half = (config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]) // 2
        targets.append(_Target(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None, (half,),
                               GGMLQuantizationType.F32))
    return targets


def _nbytes(target: _Target) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    return math.prod(quant_shape_to_byte_shape(target.shape, target.qtype))


def _to_rope_pairs(weight: Any, heads: int) -> Any:
    """Reorder a Llama q/k projection's output rows from transformers' rotate-half layout (each head's first
    half, then second half) to llama.cpp's interleaved pairs."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _tensor_data(model_dir: Path, config: dict[str, Any], targets: list[_Target], permute: bool) -> Iterator[Any]:
    """Each target's bytes in order, read one tensor at a time."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    from safetensors import safe_open

    by_source = {t.source: t for t in targets if t.source}
    for shard in _shards(model_dir):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                target = by_source[key]
                weight = f.get_tensor(key).float().numpy()
                if permute and key.endswith("self_attn.q_proj.weight"):
                    weight = _to_rope_pairs(weight, config["num_attention_heads"])
                elif permute and key.endswith("self_attn.k_proj.weight"):
                    weight = _to_rope_pairs(weight, config.get("num_key_value_heads") or config["num_attention_heads"])
                if target.qtype == GGMLQuantizationType.F32:
                    yield np.ascontiguousarray(weight, dtype=np.float32)
                elif target.qtype == GGMLQuantizationType.F16:
                    yield np.ascontiguousarray(weight, dtype=np.float16)
                else:
                    yield quantize(np.ascontiguousarray(weight, dtype=np.float32), target.qtype)
    for target in targets:
        if target.source is None:
            yield _llama3_rope_factors(config, _rope_scaling(config, model_dir / "config.json") or {})


def _add_hyperparameters(writer: Any, config: dict[str, Any], file_type: int) -> None:
    heads = config["num_attention_heads"]
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type)


def _add_tokenizer(writer: Any, model_dir: Path, vocab_size: int, add_bos: bool, chat_template: str) -> None:
    """tokenizer.json's vocabulary (padded to the embedding's rows), merges and special tokens."""
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    pre = pre_tokenizer_name(spec, str(model_dir / "tokenizer.json"))
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in spec["model"]["vocab"].items()}
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= vocab_size:
        raise DataError(f"{model_dir}: tokenizer.json has token id {max(by_id)} but the model only "
                        f"{vocab_size} embedding rows")
    tokens = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in tokens])
    writer.add_token_types([int(k) for _, k in tokens])
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)  # its guesses at add_bos from the post-processor: decided below instead
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    finally:
        vocab_log.setLevel(level)
    special.chat_template = chat_template
    special.add_special_token["bos"] = add_bos
    special.add_special_token["eos"] = False
    special.add_to_gguf(writer, quiet=True)


@dataclass(frozen=True)
class GgufFile:
    """One written GGUF: its type and path."""

    type: str
    path: Path


def write_gguf(merged_dir: Path, dest: Path, stem: str, qtype_name: str, *, add_bos: bool,
               chat_template: str) -> Path:
    """Write ``dest/<stem>-<qtype_name>.gguf`` (a type the gguf library writes) from ``merged_dir``, streamed.

    ``add_bos``: whether llama.cpp puts BOS before a prompt (as training's prompts began); ``chat_template``:
    the Jinja template stored in the file. Raises ConfigError (architecture or tokenizer not supported),
    DataError (a tensor without a GGUF name, a tokenizer larger than the embedding).
    """
    import gguf

    config = json.loads((merged_dir / "config.json").read_text())
    arch_name, permute = ARCHITECTURES.get(config.get("model_type"), (None, False))
    if arch_name is None:
        check_model(merged_dir)  # raises, naming the architecture
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    qtype = gguf.GGMLQuantizationType[qtype_name.upper()]
    file_type = gguf.LlamaFileType[f"MOSTLY_{qtype_name.upper()}"]
    targets = _plan(merged_dir, config, arch, qtype)
    path = dest / f"{stem}-{qtype_name}.gguf"
    dest.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, arch_name)
    try:
        writer.add_name(stem)
        _add_hyperparameters(writer, config, int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, merged_dir, config["vocab_size"], add_bos, chat_template)
        import numpy as np

        for target in targets:
            writer.add_tensor_info(target.name, target.shape, np.dtype(np.float32), _nbytes(target),
                                   raw_dtype=target.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for data in _tensor_data(merged_dir, config, targets, permute):
            writer.write_tensor_data(data)
    finally:
        writer.close()
    log.info("export.gguf", path=str(path), type=qtype_name, tensors=len(targets), bytes=path.stat().st_size)
    return path


def llama_quantize(source: Path, dest: Path, qtype_name: str) -> Path:
    """Quantize the f16 GGUF ``source`` into ``dest`` with llama.cpp's quantizer (a k-quant): the
    ``llama-quantize`` binary, else llama-cpp-python's binding of the same function.

    Raises ConfigError when neither is here, DataError (with the binary's last output line) when it fails.
    """
    binary = quantize_binary()
    if binary is None:
        binding = _llama_cpp_binding()
        if binding is None:
            raise ConfigError(f"export.gguf: {qtype_name} needs llama.cpp's llama-quantize; {QUANTIZE_HOWTO}")
        params = binding.llama_model_quantize_default_params()
        params.ftype = getattr(binding, f"LLAMA_FTYPE_MOSTLY_{qtype_name.upper()}")
        if binding.llama_model_quantize(str(source).encode(), str(dest).encode(), params) != 0:
            raise DataError(f"llama.cpp could not quantize {source.name} to {qtype_name}")
        log.info("export.gguf", path=str(dest), type=qtype_name, quantizer="llama-cpp-python",
                 bytes=dest.stat().st_size)
        return dest
    done = subprocess.run([binary, str(source), str(dest), qtype_name.upper()], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise DataError(f"{binary} {source.name} {qtype_name.upper()} failed (exit {done.returncode}): {last}")
    log.info("export.gguf", path=str(dest), type=qtype_name, quantizer=binary, bytes=dest.stat().st_size)
    return dest


def export_all(merged_dir: Path, dest: Path, stem: str, types: tuple[str, ...], *, add_bos: bool,
               chat_template: str) -> list[GgufFile]:
    """Every type of ``export.gguf`` into ``dest``; a k-quant goes through an f16 file, kept only if listed."""
    files = []
    f16 = dest / f"{stem}-f16.gguf"
    for name in types:
        if name in GGUF_K_QUANTS:
            if not f16.exists():
                write_gguf(merged_dir, dest, stem, "f16", add_bos=add_bos, chat_template=chat_template)
            path = llama_quantize(f16, dest / f"{stem}-{name}.gguf", name)
        elif name == "f16" and f16.exists():
            path = f16  # already written for a k-quant listed before it
        else:
            path = write_gguf(merged_dir, dest, stem, name, add_bos=add_bos, chat_template=chat_template)
        files.append(GgufFile(name, path))
    if "f16" not in types:
        f16.unlink(missing_ok=True)
    return files


def export(cfg: JobConfig, merged_dir: Path, dest: Path, tokenizer: Any) -> list[Path]:
    """The export stage's GGUF step: every ``export.gguf`` type of ``merged_dir`` into ``dest``, each with its
    Ollama Modelfile (:mod:`job.ollama`), prompts rendered by ``data.template`` with training's ``tokenizer``.
    Returns the files written. Raises what :func:`write_gguf` and :func:`llama_quantize` raise."""
    from job import ollama
    from job.templates import get_template

    template = get_template(cfg.data.template)
    parts = ollama.prompt_parts(template, tokenizer)
    jinja = ollama.chat_template(template, tokenizer, parts)
    written: list[Path] = []
    for gguf_file in export_all(merged_dir, dest, cfg.output.model_name, cfg.export.gguf, add_bos=parts.add_bos,
                                chat_template=jinja):
        written += [gguf_file.path, ollama.write_modelfile(gguf_file.path, parts, model_name=cfg.output.model_name,
                                                           template_name=template.name)]
    return written
