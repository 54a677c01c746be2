"""job.model's weights-directory checks: safetensors only, every weight file named by what loads it, no code.

The directories are real: a tiny Llama config.json from transformers and safetensors files written by the
safetensors library. A pickle here is a real ``torch.save`` file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from job.model import pull_weights
from job.weights import check_weights_dir, hash_weights, remote_code
from registry.errors import DataError, NotFoundError
from tests.model_factory import tiny_config


def _weights_dir(root: Path, *shards: str) -> Path:
    """A model directory: config.json and one small safetensors file per name (an index when several)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(tiny_config().to_json_string())
    for n, name in enumerate(shards or ("model.safetensors",)):
        save_file({f"t{n}": torch.full((4, 4), float(n))}, str(root / name))
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": {f"t{n}": name for n, name in enumerate(shards)}}
        (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def _pickle(path: Path) -> None:
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, path)


def test_a_plain_or_sharded_directory_passes_and_names_what_loads(tmp_path: Path) -> None:
    single = _weights_dir(tmp_path / "single")
    assert check_weights_dir(single, "m") == [single / "model.safetensors"]
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    sharded = _weights_dir(tmp_path / "sharded", *shards)
    assert check_weights_dir(sharded, "m") == [sharded / s for s in shards]


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "model.pt", "weights.pth", "x.ckpt", "w.pkl"])
def test_a_pickle_beside_safetensors_is_refused_naming_it(tmp_path: Path, pickle_name: str) -> None:
    # The decoy: a valid safetensors file satisfied the old check while transformers loaded the pickle.
    for layout in (("extra.safetensors",), ("model.safetensors",)):
        d = tmp_path / f"{pickle_name}-{layout[0]}"
        _weights_dir(d, *layout)
        _pickle(d / pickle_name)
        with pytest.raises(DataError) as e:
            check_weights_dir(d, str(d))
        assert pickle_name in e.value.message and "pickle" in e.value.message and str(d) in e.value.message


def test_a_pickle_index_is_refused_even_without_the_shards(tmp_path: Path) -> None:
    d = _weights_dir(tmp_path / "m")
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "pytorch_model-1.bin"}}))
    with pytest.raises(DataError, match="pytorch_model.bin.index.json"):
        check_weights_dir(d, "m")


def test_pickle_only_keeps_its_message(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    _pickle(d / "pytorch_model.bin")
    with pytest.raises(DataError, match=r"only pickle weights \(pytorch_model.bin\)"):
        check_weights_dir(d, "m")


@pytest.mark.parametrize("weight_map, words", [
    ({"t0": "model-00001-of-00002.safetensors", "t1": "pytorch_model-00002.bin"}, "not a safetensors file"),
    ({"t0": "model-00001-of-00002.safetensors", "t1": "model-00009-of-00009.safetensors"}, "which is missing"),
    ({"t0": "../model-00001-of-00002.safetensors"}, "not a safetensors file"),
    ({"t0": "sub/model.safetensors"}, "not a safetensors file"),
    ({}, "lists no weight files"),
    ("not a map", "not a safetensors index"),
])
def test_an_index_naming_anything_but_present_safetensors_is_refused(tmp_path: Path, weight_map, words) -> None:
    d = _weights_dir(tmp_path / "m", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(DataError) as e:
        check_weights_dir(d, "m")
    assert words in e.value.message and "model.safetensors.index.json" in e.value.message


def test_safetensors_no_loader_would_read_are_refused(tmp_path: Path) -> None:
    d = _weights_dir(tmp_path / "m", "extra.safetensors")
    with pytest.raises(DataError, match="extra.safetensors but neither model.safetensors nor"):
        check_weights_dir(d, "m")
    (d / "extra.safetensors").unlink()
    with pytest.raises(NotFoundError, match="no \\*.safetensors"):
        check_weights_dir(d, "m")


def test_an_unused_safetensors_with_a_lying_header_is_refused_too(tmp_path: Path) -> None:
    d = _weights_dir(tmp_path / "m")
    (d / "spare.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(DataError, match="spare.safetensors"):
        check_weights_dir(d, "m")


def test_lineage_hashes_every_weight_file_a_load_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    d = _weights_dir(tmp_path / "m", *shards)
    weights = pull_weights(str(d), None)
    assert weights.files == {s: hashlib.sha256((d / s).read_bytes()).hexdigest() for s in shards}
    assert set(check_weights_dir(d, "m")) <= {d / name for name in hash_weights(d)}


def test_remote_code_names_auto_maps_and_python_files(tmp_path: Path) -> None:
    d = _weights_dir(tmp_path / "m")
    assert remote_code(d) == []
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.T", None]}}))
    (d / "sub").mkdir()
    (d / "sub" / "helper.py").write_text("")
    found = remote_code(d)
    assert found[0].startswith("config.json auto_map (AutoConfig)")
    assert found[1].startswith("tokenizer_config.json auto_map") and found[2:] == ["sub/helper.py"]
    (d / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="tokenizer_config.json: not a JSON object"):
        remote_code(d)
