"""One test per defence that a planted one-line bug once slipped past (issue 23): each plants the attack or the
wrong value, so it fails when the defence is removed or weakened, not only when it is gone.

* the alias gate at its boundary: an EQUAL accuracy moves the alias (README: refused only when lower), one
  question fewer is refused (``<`` turned into ``<=``, or the comparison dropped, fails here);
* the merge check given a wrong merge whose error is far below 100x the tolerance (a loosened tolerance fails);
* ``Checkpointer.restore`` itself screens ``optimizer.pt`` for pickled code, with the payload's sha256 recorded
  in COMPLETE.json so the checksum cannot catch it first (removing the screen from ``restore`` fails).
Secret keys in any case and unlisted secret values: tests/unit/test_redact.py.
"""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from registry.errors import ConfigError, DataError
from registry.registry import Registry
from registry.store import open_store
from tests.conftest import SAMPLE_RECORD
from tests.eval_factory import answers_and_score
from tests.model_factory import tiny_config


def test_the_gate_lets_an_equal_accuracy_through_and_refuses_one_question_less(
        tmp_path: Path, publish_sample_run: Callable[..., str]) -> None:
    store = str(tmp_path / "store")
    registry = Registry.open(store + "/registry")
    for n, correct in enumerate([110, 110, 109], start=1):
        record = copy.deepcopy(SAMPLE_RECORD)
        answers, score = answers_and_score(correct / 200)  # the gate recomputes each score from its answers
        record["metrics"]["benchmarks_after"] = {"medqa": score}
        run = publish_sample_run(store, run_id=f"run-{n}", record=record, files={"benchmarks/after/medqa.jsonl": answers})
        registry.register("m", run, aliases=["production"] if n == 1 else [])
    with pytest.raises(ConfigError, match="m:3 scores 54.5% .* lower than m:1"):
        registry.set_alias("m", 3, "production", require=["medqa"])
    assert registry.get("m@production").version == 1
    registry.set_alias("m", 2, "production", require=["medqa"])  # 55.0% == 55.0%: not lower, so it moves
    assert registry.get("m@production").version == 2 and registry.gate_overrides("m") == []


class _Tokens:
    """What check_merge asks of a tokenizer: ids and a mask for a padded batch of prompts."""

    def __call__(self, prompts: list[str], **_: Any) -> Any:
        from transformers import BatchEncoding

        ids = torch.tensor([[(7 * i + len(p)) % 500 + 3 for i in range(12)] for p in prompts])
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


@pytest.mark.parametrize("layers", [0, 1])
def test_the_merge_check_refuses_a_merge_off_by_a_wrong_lora_scale(tmp_path: Path, layers: int) -> None:
    """A merge that applies the adapter at 1.5x its scale (an alpha/r mix-up) differs from base + adapter by a
    few percent of the logits' scale: far over the 2% tolerance, far under 100x it. Seen by the whole-model
    check and by the one cut to the first layer (``export.merge_check_layers``)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from job.config import load_config
    from job.export import check_merge, merge

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    cfg = load_config(None, ["export.dtype=float32"], env={})
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", cfg)
    tolerance = cfg.export.merge_tolerance
    prompts = ["a fever and a stiff neck", "chest pain on exertion"]
    good = check_merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", _Tokens(), prompts, tolerance,
                       layers=layers)
    assert good["relative_diff"] < tolerance / 100 and good["layers"] == (layers or "all")

    wrong = tmp_path / "wrong"
    merge(tmp_path / "base", tmp_path / "adapter", wrong, cfg)
    base_tensors = load_file(tmp_path / "base" / "model.safetensors")
    merged = load_file(wrong / "model.safetensors")
    save_file({k: base_tensors[k] + 1.5 * (v - base_tensors[k]) for k, v in merged.items()},
              wrong / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match="the merge is wrong") as refused:
        check_merge(tmp_path / "base", tmp_path / "adapter", wrong, _Tokens(), prompts, tolerance, layers=layers)
    off = float(re.search(r"\(([0-9.]+)% of scale", refused.value.message)[1]) / 100
    assert off < 100 * tolerance  # the error a loosened check would let through


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_restore_itself_screens_optimizer_pt_whose_checksum_is_valid(tmp_path: Path) -> None:
    from job.checkpoints import COMPLETE, Checkpointer

    marker = tmp_path / "ran"
    local = tmp_path / "checkpoint-4"
    local.mkdir()
    torch.save({"state": {}, "param_groups": [{"lr": 1e-4}]}, local / "scheduler.pt")
    (local / "optimizer.pt").write_bytes(pickle.dumps({"state": _Payload(marker)}))
    (local / "trainer_state.json").write_text('{"global_step": 4}')
    store = open_store(str(tmp_path / "store")).child("runs/run-1")
    checkpointer = Checkpointer(store)
    ref = checkpointer.upload(local, 4)  # COMPLETE.json records the payload's true sha256
    assert store.exists(f"checkpoints/checkpoint-4/{COMPLETE}") and "optimizer.pt" in ref.files
    with pytest.raises(DataError, match=r"optimizer\.pt: pickle imports 'builtins\.exec'"):
        checkpointer.restore(checkpointer.latest(), tmp_path / "restored")
    assert not marker.exists()
    pickle.loads((tmp_path / "restored" / "checkpoint-4" / "optimizer.pt").read_bytes())  # noqa: S301
    assert marker.exists()  # the payload is live: unpickled without the screen, it runs
