"""Property-based tests: generated configs, ``--set`` values, MEDFT_* variables, data files and refs at the CLI.

Hypothesis draws the inputs (YAML documents built from the real config keys and hostile values, free-form
text, bytes) and each goes through ``medft`` in-process (``job.cli.main``): ``train --dry-run``, ``data
validate``, ``generate`` and ``registry show``. Whatever the input, the properties are the README's promises:

* the exit code is a documented one (0, 2, 3, 4, 5), never 1 (a bug);
* no traceback; a failure prints exactly one ``medft: error:`` line;
* an error caused by an environment variable names the variable, not the config file;
* nothing is published: no MANIFEST.json, no run folder, no downloaded model anywhere under the test's folder.

Runs are derandomized (the same examples every run, no example database), with bounded ``max_examples`` so the
whole file stays well under a minute on two cores.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from job.config import JobConfig
from registry.runs import publish_dir
from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.data_factory import SAMPLE

DOCUMENTED = {0, 2, 3, 4, 5}
PROPERTY = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _keys(model: type, prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and hasattr(sub, "model_fields"):
            out += _keys(sub, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


KEYS = _keys(JobConfig)
#: Keys whose values would point the test at the real hub or at paths outside its folder; the environment
#: (MEDFT_STORE, which wins) and the base file fix them, and the hostile values below still reach them.
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
HOSTILE = [
    "hf://a/../b", "hf://a/b/c", "s3://bucket/../other", "s3://", "../../etc/passwd", "/etc/hostname", "~",
    "auto", "latest", "v1", "7", "adamw_torch", "adamw_torchh", "cosine_with_min_lr", "reduce_lr_on_plateau",
    "q_proj", "mlp", "[q_proj, nope]", "{a: 1}", "[]", "", " ", "\t", "null", "~", ".nan", "-.inf", ".inf",
    "1e999", "-1", "0", "18446744073709551616", "true", "on", "no", "!!python/object/apply:os.system [x]",
    "&a [*a, *a]", "*a", "a: b: c", "a\nb", "é😀", "\u202e", "r1-medical-zh", "chat", "drop", "truncate",
]
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT, st.sampled_from(HOSTILE))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["q_proj", "a", "base", "x"]), inner, max_size=2),
                      max_leaves=5)


def _document(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in pairs:
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p, {}), dict) else node
        node[leaf] = value
    return tree


DOCUMENTS = st.one_of(
    st.lists(st.tuples(st.sampled_from([*KEYS, "train.bogus", "bogus.key", "model"]), VALUES), max_size=6)
    .map(lambda pairs: yaml.safe_dump(_document(pairs), allow_unicode=True)),
    st.lists(st.sampled_from(HOSTILE), max_size=4).map("\n".join),  # not a mapping, or not YAML at all
    st.sampled_from(SECTIONS).map(lambda s: f"{s}:\n  a: 1\n  a: 2\n"),  # a duplicate key
)


@pytest.fixture
def place(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The test's folder as working directory, its store and cache in the environment, a valid base file."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("MEDFT_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MEDFT_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    (tmp_path / "base.yaml").write_text(
        f"model:\n  base: {tiny_model_dir}\n  backend: hf\ndata:\n  source: {SAMPLE}\n  subset: null\n"
        "  split: train\n")
    yield tmp_path


def _check(code: int, err: str, root: Path) -> list[str]:
    """The promises every input keeps; returns the error lines."""
    event(f"exit {code}")  # --hypothesis-show-statistics shows how the examples spread over the outcomes
    assert code in DOCUMENTED, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = error_lines(err)
    assert len(errors) == (0 if code == 0 else 1), err[-3000:]
    published = [p for p in root.rglob("*") if p.name == "MANIFEST.json" or p.name == "runs"]
    assert not published or published == [root / "store" / "runs"] and not any(published[0].rglob("*")), published
    assert not (root / "cache" / "models").exists() or not any((root / "cache" / "models").iterdir())
    return errors


@PROPERTY
@given(document=DOCUMENTS)
def test_generated_config_files_through_dry_run(place: Path, document: str, capsys: pytest.CaptureFixture) -> None:
    path = place / "job.yaml"
    path.write_text(document, encoding="utf-8")
    code, out, err = run_main(["train", "--config", str(path), "--dry-run"], capsys)
    errors = _check(code, err, place)
    if errors and "MEDFT_" not in errors[0]:
        assert str(path) in errors[0] or errors[0].startswith("medft: error: config"), errors


@PROPERTY
@given(sets=st.lists(st.tuples(st.one_of(st.sampled_from([*KEYS, "train.bogus", "a..b", ".", "model"]), TEXT),
                               st.one_of(TEXT, st.sampled_from(HOSTILE))), min_size=1, max_size=4))
def test_generated_set_values_through_dry_run(place: Path, sets: list[tuple[str, str]],
                                              capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--config", str(place / "base.yaml"), "--dry-run"]
    for key, value in sets:
        argv += ["--set", f"{key}={value}"]
    code, _, err = run_main(argv, capsys)
    errors = _check(code, err, place)
    if errors:
        assert "--set" in errors[0] or "MEDFT_" in errors[0] or str(place / "base.yaml") not in errors[0], errors


ENV_NAMES = [f"MEDFT_{k.replace('.', '__').upper()}" for k in KEYS if not k.startswith("output.store")]
ENV_NAMES += ["MEDFT_RUN_ID", "MEDFT_REGISTRY", "MEDFT_LOG_LEVEL", "MEDFT_LOG_FORMAT", "MEDFT_BOGUS__KEY"]
ENV_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24)


@PROPERTY
@given(env=st.dictionaries(st.sampled_from(ENV_NAMES), st.one_of(ENV_TEXT, st.sampled_from(HOSTILE)),
                           min_size=1, max_size=4),
       store=st.sampled_from([None, "s3://bucket/../x", "s3://", "not a url", "ftp://host/x", "file://host/x",
                              "relative-store", "  "]))
def test_generated_environment_values_are_named_by_their_variable(place: Path, env: dict[str, str],
                                                                 store: str | None,
                                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        if store is not None:
            mp.setenv("MEDFT_STORE", store)
        code, _, err = run_main(["train", "--config", str(place / "base.yaml"), "--dry-run"], capsys)
    errors = _check(code, err, place)
    if errors:  # the file is valid: whatever is wrong came from a variable, and the line names it
        assert "MEDFT_" in errors[0] and str(place / "base.yaml") not in errors[0], errors


SAMPLE_BYTES = SAMPLE.read_bytes()[:6000]  # the first rows of the bundled sample, whole lines
SAMPLE_BYTES = SAMPLE_BYTES[:SAMPLE_BYTES.rfind(b"\n") + 1]


@PROPERTY
@given(content=st.one_of(st.binary(max_size=600), TEXT.map(str.encode),
                         # valid rows with a few bytes spliced in: mostly kept, one row broken somewhere
                         st.tuples(st.integers(0, len(SAMPLE_BYTES)), st.binary(max_size=6))
                         .map(lambda cut: SAMPLE_BYTES[:cut[0]] + cut[1] + SAMPLE_BYTES[cut[0]:]),
                         st.lists(st.dictionaries(st.sampled_from(["Question", "Complex_CoT", "Response", "x"]),
                                                  SCALARS, max_size=4), max_size=4)
                         .map(lambda rows: "\n".join(json.dumps(r, default=str) for r in rows).encode())),
       suffix=st.sampled_from([".jsonl", ".jsonl", ".jsonl", ".json", ".csv", ".parquet", ".txt"]),
       sets=st.just([]) | st.lists(st.tuples(st.sampled_from([k for k in KEYS if k.startswith("data.") and k != "data.source"]),
                               st.one_of(TEXT, st.sampled_from(HOSTILE))), max_size=2))
def test_generated_data_files_through_data_validate(place: Path, content: bytes, suffix: str,
                                                    sets: list[tuple[str, str]],
                                                    capsys: pytest.CaptureFixture) -> None:
    path = place / f"rows{suffix}"
    path.write_bytes(content)
    argv = ["data", "validate", "--config", str(place / "base.yaml"), "--no-tokenizer", "--set", f"data.source={path}"]
    for key, value in sets:
        argv += ["--set", f"{key}={value}"]
    code, _, err = run_main(argv, capsys)
    _check(code, err, place)


@pytest.fixture
def registered(place: Path, tiny_model_dir: Path, s3_server: str, capsys: pytest.CaptureFixture,
               monkeypatch: pytest.MonkeyPatch) -> str:
    """A store holding one published, registered run (tiny:1 @candidate); refs reach S3 only on moto."""
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", s3_server)
    folder = place / "published"
    shutil.copytree(tiny_model_dir, folder / "merged")
    store = str(place / "store")
    publish_dir(open_store(store), "run-1", folder, {"artifacts": {"merged": "merged"},
                                                     "config": {"data": {"template": "r1-medical"}}})
    code, _, err = run_main(["registry", "register", "tiny", f"{store}/runs/run-1", "--alias", "candidate",
                             "--store", store], capsys)
    assert code == 0, err
    return store


REFS = st.one_of(TEXT, st.sampled_from([
    "tiny:0", "tiny:2", "tiny@prod", "tiny@v1", "tiny:99999999999999999999999", "tiny:-1", "../tiny",
    "tiny/../tiny", "s3://no-such-bucket-medft/runs/x", "s3://../x", "hf://org/model", "file:///etc", "/", "~",
    "runs/run-1", "\\\\host\\share", "tiny@", "@candidate", ":1", "tiny:1:1", "tiny@candidate@x",
]))


def _names_the_version(store: str, ref: str) -> bool:
    from registry.errors import MedftError
    from registry.registry import Registry

    try:
        Registry(open_store(store).child("registry")).get(ref.strip())
        return True
    except MedftError:
        return False


def _published(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("MANIFEST.json")}


@PROPERTY
@given(ref=REFS, question=st.one_of(st.text(max_size=20), st.sampled_from(["hi", "\udcff", " "])))
def test_generated_refs_through_generate_and_registry_show(registered: str, place: Path, ref: str, question: str,
                                                          capsys: pytest.CaptureFixture) -> None:
    if ref.startswith("-") or _names_the_version(registered, ref):
        return  # an option, or the one real version: answered, which other tests cover
    before = _published(place)
    code, _, err = run_main(["generate", ref, "--store", registered, "-q", question, "--max-new-tokens", "1"], capsys)
    event(f"generate exit {code}")
    assert code in (2, 4) and "Traceback" not in err, (ref, code, err[-3000:])
    assert len(error_lines(err)) == 1
    code, _, err = run_main(["registry", "show", ref, "--store", registered], capsys)
    assert code in (2, 4) and "Traceback" not in err and len(error_lines(err)) == 1, (ref, code, err[-3000:])
    assert _published(place) == before
    assert not (place / "cache" / "models").exists() or not any((place / "cache" / "models").iterdir())
