"""The export stage: the PEFT adapter (made portable), and the adapter merged into the original 16-bit weights.

The merge streams the base checkpoint tensor by tensor (``safe_open``): each LoRA delta is computed in float32
(on the GPU when there is one) and added to the original weight, then cast to ``export.dtype``; a weight outside
float16's range fails with a line suggesting bfloat16. Shards are planned from the headers, written under their
final names by a second thread while the next one merges, and announced as they land (so publishing can
start), so peak host memory is about two shards, never the model. The merged model's logits are then checked
against base + adapter, unmerged, in float32 (models cut to ``export.merge_check_layers`` layers).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from job.config import JobConfig
from job.weights import write_sharded
from registry import progress
from registry.errors import ConfigError, DataError
from registry.logs import get_logger

log = get_logger(__name__)

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FP16_MAX = torch.finfo(torch.float16).max
_COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")


def _base_shards(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        return [base_dir / n for n in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return sorted(base_dir.glob("*.safetensors"))


@dataclass(frozen=True)
class LoraDelta:
    scaling: float
    pairs: dict[str, tuple[str, str]]  # base weight name -> (lora_A key, lora_B key)


def read_adapter(adapter_dir: Path) -> LoraDelta:
    """Map each adapted base weight to its LoRA A/B tensors in a PEFT adapter directory."""
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scaling = alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, tuple[str, str]] = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            if ".lora_A." in key:
                base = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                pairs[base] = (key, key.replace(".lora_A.", ".lora_B."))
    if not pairs:
        raise DataError(f"{adapter_dir}: adapter has no LoRA weights to merge")
    return LoraDelta(scaling=scaling, pairs=pairs)


def _tensors(weights_dir: Path) -> list[tuple[str, str, int]]:
    """(name, safetensors dtype, number of elements) of every tensor in ``weights_dir``, in the order the merge
    reads them (:func:`_base_shards`), from the headers alone: no tensor is read."""
    out = []
    for shard in _base_shards(weights_dir):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                sliced = f.get_slice(name)
                out.append((name, sliced.get_dtype(), math.prod(sliced.get_shape())))
    return out


def _free_gpu_bytes() -> int:
    """Bytes free on the GPU once PyTorch's cache is emptied (what the trained model left there is free for the
    export); 0 without a GPU."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info()
    return free


def merge_device(largest: int) -> torch.device:
    """Where the merge computes: the GPU when one is free enough for the largest tensor (``largest`` elements)
    in float32 with its temporaries (reading, casting and writing stay on the host either way), else the CPU.

    The arithmetic is the same float32 on both (TF32 is turned off for it, see :func:`_merged_tensors`); the GPU
    only removes the host's float32 passes over every weight, most of the export's time on an 8B model.
    """
    return torch.device("cuda") if _free_gpu_bytes() > 4 * 4 * largest + 2 * 1024**3 else torch.device("cpu")


@contextmanager
def _exact_float32() -> Iterator[None]:
    """float32 products in full float32 (no TF32), which unsloth and the trainer may have allowed for speed."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _merged_tensors(base_dir: Path, adapter_dir: Path, dtype: torch.dtype, stats: dict[str, Any],
                    device: torch.device, on_shard: Callable[[], None] = lambda: None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every base tensor, merged where the adapter has a delta, in ``dtype`` on the host; computed in float32
    on ``device``. ``on_shard()`` after each base shard is read through (progress)."""
    delta = read_adapter(adapter_dir)
    merged = set()
    with safe_open(adapter_dir / "adapter_model.safetensors", "pt") as lora, _exact_float32():
        for shard in _base_shards(base_dir):
            with safe_open(shard, "pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name).to(device)
                    if name in delta.pairs:
                        a_key, b_key = delta.pairs[name]
                        lora_b, lora_a = (lora.get_tensor(k).to(device).float() for k in (b_key, a_key))
                        w = tensor.float() + delta.scaling * (lora_b @ lora_a)
                        merged.add(name)
                    else:
                        w = tensor.float() if tensor.is_floating_point() else tensor
                    if w.is_floating_point():
                        # One reduction finds both: the largest magnitude is NaN or inf when any weight is.
                        peak = float(w.abs().amax()) if w.numel() else 0.0
                        if not math.isfinite(peak):
                            raise DataError(f"{name}: merged weight is not finite; the adapter diverged "
                                            "(lower train.learning_rate)")
                        if dtype == torch.float16 and peak > _FP16_MAX:
                            raise ConfigError(f"{name}: merged weight reaches {peak:.3g}, beyond float16's "
                                              f"{_FP16_MAX:.0f}; set export.dtype=bfloat16")
                        w = w.to(dtype)
                    stats["tensors"] = stats.get("tensors", 0) + 1
                    yield name, w.cpu().contiguous()
            on_shard()
    missing = set(delta.pairs) - merged
    if missing:
        raise DataError(f"{adapter_dir}: adapter targets weights the base lacks ({sorted(missing)[0]}, ...); "
                        "the adapter was trained on another architecture")
    stats["merged_weights"] = len(merged)


_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8}


def _merged_sizes(tensors: list[tuple[str, str, int]], dtype: torch.dtype) -> list[tuple[str, int]]:
    """(name, bytes) of every merged tensor of the base's ``tensors`` (:func:`_tensors`), in the order
    :func:`_merged_tensors` yields them: floating-point tensors in ``dtype``, the others as they are."""
    return [(name, numel * (dtype.itemsize if kind.startswith(("F", "BF")) else _ITEM_BYTES[kind]))
            for name, kind, numel in tensors]


def merge(base_dir: Path, adapter_dir: Path, dest: Path, cfg: JobConfig,
          on_written: Callable[[Path], None] = lambda path: None) -> dict[str, Any]:
    """Write base + adapter as sharded safetensors with config, generation config and tokenizer.

    ``on_written(path)`` is called (from a writer thread) as each shard is complete on disk, under its final
    name. Raises ConfigError (float16 overflow), DataError (adapter does not fit the base), TransientError (disk).
    """
    dtype = _TORCH_DTYPES[cfg.export.dtype]
    tensors = _tensors(base_dir)
    device = merge_device(max((numel for _, _, numel in tensors), default=0))
    stats: dict[str, Any] = {"device": device.type}
    with progress.current().task("merge", total=len(_base_shards(base_dir)), unit="shard") as task:
        shards = write_sharded(_merged_tensors(base_dir, adapter_dir, dtype, stats, device, task.advance), dest,
                               sizes=_merged_sizes(tensors, dtype), shard_size=cfg.export.shard_size,
                               on_written=on_written)
    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = cfg.export.dtype
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in _COPIED_FILES:
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, dest / name)
    stats["shards"] = len(shards)
    log.info("export.merged", dest=str(dest), **stats)
    return stats


@torch.no_grad()
def _logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float().cpu()


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _first_layers_bytes(weights_dir: Path, layers: int) -> int:
    """float32 bytes of the tensors a model cut to its first ``layers`` decoder layers loads (every tensor when
    ``layers`` is 0): embeddings, norms and head, and those layers."""
    kept = [numel for name, _, numel in _tensors(weights_dir)
            if not layers or (layer := _LAYER.search(name)) is None or int(layer[1]) < layers]
    return 4 * sum(kept)


def _float32_model(weights_dir: Path, layers: int, device: str) -> Any:
    """The model in ``weights_dir`` in float32 on ``device``, cut to its first ``layers`` decoder layers (0: all).

    The folder was checked to hold safetensors only; nothing in it runs code of its own here.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(weights_dir, trust_remote_code=False)
    cut = bool(layers) and layers < config.num_hidden_layers
    if cut:
        config.num_hidden_layers = layers
        if getattr(config, "layer_types", None):  # per-layer attention kinds: one per kept layer
            config.layer_types = config.layer_types[:layers]
    verbosity = hf_logging.get_verbosity()
    if cut:  # the later layers' weights are left out on purpose: no load report listing each as unexpected
        hf_logging.set_verbosity_error()
    try:
        return AutoModelForCausalLM.from_pretrained(weights_dir, config=config, dtype=torch.float32,
                                                    use_safetensors=True, trust_remote_code=False,
                                                    device_map={"": device}).eval()
    finally:
        hf_logging.set_verbosity(verbosity)


def check_merge(base_dir: Path, adapter_dir: Path, merged_dir: Path, tokenizer: Any, prompts: list[str],
                tolerance: float, *, layers: int = 0) -> dict[str, Any]:
    """Compare the merged model's logits with base + adapter (unmerged) on ``prompts``.

    The difference is measured relative to the logits' scale: max |a - b| / max |b|. Both run in float32, so
    the check sees the merge and not bfloat16 rounding (which on its own reaches several percent on an 8B
    model); on the GPU when a float32 copy fits in its free memory, else on the CPU. One model is in memory at
    a time. With ``layers`` > 0 both models are cut to their first ``layers`` decoder layers (with embeddings,
    final norm and head): every layer is merged by the same code, and loading two float32 copies of a whole 8B
    model was most of the check's time. Raises DataError when the difference exceeds ``tolerance``.
    """
    from peft import PeftModel

    free = _free_gpu_bytes()
    device = "cuda" if free and free > 1.3 * _first_layers_bytes(merged_dir, layers) else "cpu"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    with _exact_float32():
        reference = _logits(PeftModel.from_pretrained(_float32_model(base_dir, layers, device), adapter_dir).eval(),
                            dict(batch))
        merged_logits = _logits(_float32_model(merged_dir, layers, device), dict(batch))
    mask = batch["attention_mask"].cpu().bool()
    diff = float((merged_logits - reference).abs()[mask].max())
    scale = float(reference.abs()[mask].max()) or 1.0
    result = {"max_abs_logit_diff": diff, "relative_diff": diff / scale, "tolerance": tolerance,
              "compare_dtype": "float32", "device": device, "layers": layers or "all"}
    log.info("export.merge_check", **result)
    if diff / scale > tolerance:
        raise DataError(f"{merged_dir}: merged logits differ from base + adapter by {diff:.4g} "
                        f"({diff / scale:.3%} of scale, tolerance {tolerance:.3%}); the merge is wrong")
    return result


def public_id(uri: str) -> str:
    """How another machine names a model or dataset: ``hf://org/name`` is the Hub's ``org/name``; any other URI
    (``ms://``, ``s3://``, a ``pkg://`` file, a path) as given, never the cache folder it was pulled into."""
    return uri.removeprefix("hf://") if uri.startswith("hf://") else uri


def make_adapter_portable(adapter_dir: Path, base_uri: str, revision: str | None = None) -> None:
    """Rewrite ``adapter_config.json``'s ``base_model_name_or_path`` (PEFT writes the local folder it loaded the
    base from: a cache path no other machine has) to :func:`public_id` of the base, so ``PeftModel`` and the Hub
    find the base anywhere. medft itself never reads it as a path: :func:`job.inference.loading.load` pulls the
    base the version's record names into the cache and applies the adapter to that."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = public_id(base_uri)
    if revision and base_uri.startswith("hf://"):
        config["revision"] = revision  # PEFT's AutoPeftModel loads the base at this revision
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
