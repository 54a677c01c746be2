"""prepare: exactly the tokens and the loss mask the model should learn, on a real and a tiny tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from job import data
from job.data import DataReport, PreparedData, Row, examples, load_rows, prepare, split_indices, validate
from job.templates import get_template
from registry.errors import ConfigError, DataError
from tests.data_factory import (
    SAMPLE,
    config_for,
    record,
    smollm2_tokenizer,
    synthetic_rows,
    tiny_tokenizer,
    write_jsonl,
)

TOKENIZERS = {"smollm2": smollm2_tokenizer, "tiny": tiny_tokenizer}


@pytest.fixture(scope="module")
def sample_rows() -> list[Row]:
    return load_rows(config_for(SAMPLE))[0]


def _examples(p: PreparedData) -> list[tuple[dict[str, list[int]], Row]]:
    """Every example with its row (eval rows are given; train rows are the rest, in order)."""
    return list(zip(p.eval, p.eval_rows))


@pytest.mark.parametrize("tok_name", ["smollm2", "tiny"])
@pytest.mark.parametrize("template_name", ["r1-medical", "r1-medical-zh", "chat"])
def test_the_mask_starts_right_after_the_prompt_and_eos_is_trained(sample_rows: list[Row], tok_name: str,
                                                                   template_name: str) -> None:
    tok = TOKENIZERS[tok_name]()
    template = get_template(template_name)
    cfg = config_for(SAMPLE, f"data.template={template_name}", "data.eval_fraction=0.5",
                     "model.max_seq_length=4096")
    p = prepare(sample_rows, tok, cfg)
    assert len(p.train) + len(p.eval) == len(sample_rows) == 40
    for ex, row in _examples(p):
        ids, mask = ex["input_ids"], ex["completion_mask"]
        prompt_ids = template.encode_prompt(row.question, tok)
        n = len(prompt_ids)
        assert len(mask) == len(ids)
        # Token by token: the example starts with exactly the inference prompt, masked out...
        assert ids[:n] == prompt_ids
        assert mask[:n] == [0] * n
        # ...and every token after it is trained, ending with EOS.
        assert mask[n:] == [1] * (len(ids) - n)
        assert ids[-1] == tok.eos_token_id and mask[-1] == 1
        assert ids.count(tok.eos_token_id) == 1 or template_name == "chat"  # chat prompts may hold <|im_end|>
        # The trained part decodes back to exactly the completion the template defines.
        assert tok.decode(ids[n:]) == template.completion(row.reasoning, row.answer, tok)
        assert tok.decode(ids[:n]).endswith("<think>\n")


def test_the_smollm2_eos_is_im_end_as_in_its_gguf_metadata() -> None:
    # transformers' GGUF conversion sets eos to <|im_start|>; the factory restores the file's own EOS.
    tok = smollm2_tokenizer()
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


def test_train_on_prompt_trains_every_token_of_the_same_ids(sample_rows: list[Row]) -> None:
    tok = tiny_tokenizer()
    masked = prepare(sample_rows, tok, config_for(SAMPLE))
    full = prepare(sample_rows, tok, config_for(SAMPLE, "data.train_on_prompt=true"))
    assert [e["input_ids"] for e in full.train] == [e["input_ids"] for e in masked.train]
    assert all(set(e["completion_mask"]) == {1} for e in full.train + full.eval)
    assert all(set(e["completion_mask"]) == {0, 1} for e in masked.train)


def _lengths(rows: list[Row], tok: Any, template: str = "r1-medical") -> list[int]:
    t = get_template(template)
    return [len(t.encode_prompt(r.question, tok)) + len(tok(t.completion(r.reasoning, r.answer, tok),
                                                            add_special_tokens=False)["input_ids"]) for r in rows]


def test_too_long_rows_are_dropped_and_counted(sample_rows: list[Row]) -> None:
    tok = smollm2_tokenizer()
    lengths = _lengths(sample_rows, tok)
    limit = sorted(lengths)[len(lengths) // 2]
    over = sum(n > limit for n in lengths)
    p = prepare(sample_rows, tok, config_for(SAMPLE, f"model.max_seq_length={limit}"))
    assert p.report.dropped["too_long"] == over > 0
    assert len(p.train) + len(p.eval) == len(sample_rows) - over == p.report.rows_kept
    assert max(len(e["input_ids"]) for e in p.train + p.eval) <= limit
    assert all(e["input_ids"][-1] == tok.eos_token_id for e in p.train + p.eval)
    assert p.report.truncated == 0


def test_truncation_keeps_the_prompt_and_cuts_the_completion_at_the_limit(sample_rows: list[Row]) -> None:
    tok = tiny_tokenizer()
    lengths = _lengths(sample_rows, tok)
    prompts = [len(get_template("r1-medical").encode_prompt(r.question, tok)) for r in sample_rows]
    limit = max(prompts) + 5  # every prompt fits, no completion does
    cfg = config_for(SAMPLE, f"model.max_seq_length={limit}", "data.too_long=truncate", "data.eval_fraction=0.5")
    p = prepare(sample_rows, tok, cfg)
    assert p.report.truncated == sum(n > limit for n in lengths) == 40
    assert p.report.dropped["too_long"] == 0 and p.report.rows_kept == 40
    for ex, row in _examples(p):
        n = len(get_template("r1-medical").encode_prompt(row.question, tok))
        assert len(ex["input_ids"]) == limit
        assert ex["input_ids"][:n] == get_template("r1-medical").encode_prompt(row.question, tok)
        assert ex["completion_mask"] == [0] * n + [1] * (limit - n)
        # A cut row has lost its EOS: it must not teach the model to stop mid-reasoning.
        assert tok.eos_token_id not in ex["input_ids"]


def test_rows_whose_prompt_alone_fills_the_limit_are_dropped_when_truncating(sample_rows: list[Row]) -> None:
    tok = tiny_tokenizer()
    prompts = sorted(len(get_template("r1-medical").encode_prompt(r.question, tok)) for r in sample_rows)
    limit = prompts[10]
    p = prepare(sample_rows, tok, config_for(SAMPLE, f"model.max_seq_length={limit}", "data.too_long=truncate"))
    assert p.report.dropped["prompt_too_long"] == sum(n >= limit for n in prompts) > 0
    assert p.report.truncated == 40 - p.report.dropped["prompt_too_long"]


def test_no_row_left_is_a_data_error_naming_the_source_and_the_fix(sample_rows: list[Row]) -> None:
    with pytest.raises(DataError) as e:
        prepare(sample_rows, tiny_tokenizer(), config_for(SAMPLE, "model.max_seq_length=50"))
    assert e.value.exit_code == 3
    msg = e.value.message
    assert msg.startswith(f"{SAMPLE}: no row is left: all 40 rows are longer than model.max_seq_length=50 tokens")
    assert "data.too_long=truncate" in msg and "\n" not in msg
    with pytest.raises(DataError, match="no row is left: every prompt alone fills model.max_seq_length=20"):
        prepare(sample_rows, tiny_tokenizer(),
                config_for(SAMPLE, "model.max_seq_length=20", "data.too_long=truncate"))
    with pytest.raises(DataError, match="no rows to train on"):
        prepare([], tiny_tokenizer(), config_for(SAMPLE))


def test_a_tokenizer_without_eos_or_chat_template_is_a_config_error(sample_rows: list[Row]) -> None:
    with pytest.raises(ConfigError, match="no eos_token"):
        prepare(sample_rows, tiny_tokenizer(eos=None), config_for(SAMPLE))
    with pytest.raises(ConfigError, match="no chat template"):
        prepare(sample_rows, tiny_tokenizer(chat_template=None), config_for(SAMPLE, "data.template=chat"))


def test_the_split_is_deterministic_disjoint_and_sized_by_eval_fraction(sample_rows: list[Row]) -> None:
    tok = tiny_tokenizer()
    cfg = config_for(SAMPLE, "data.eval_fraction=0.25", "train.seed=7")
    a, b = prepare(sample_rows, tok, cfg), prepare(sample_rows, tok, cfg)
    assert a.eval_rows == b.eval_rows and a.train == b.train
    assert len(a.eval) == len(a.eval_rows) == 10 and len(a.train) == 30
    assert a.report.train_rows == 30 and a.report.eval_rows == 10
    other = prepare(sample_rows, tok, config_for(SAMPLE, "data.eval_fraction=0.25", "train.seed=8"))
    assert other.eval_rows != a.eval_rows
    train_ids = {tuple(e["input_ids"]) for e in a.train}
    assert not train_ids & {tuple(e["input_ids"]) for e in a.eval}
    assert len(train_ids) == 30
    assert [r.source_row for r in a.eval_rows] == sorted(r.source_row for r in a.eval_rows)


def test_split_edge_cases_and_questions_never_cross_sides() -> None:
    rows = [Row(f"q{i // 2}", f"r{i}", f"a{i}", i + 1) for i in range(20)]  # each question twice
    train, ev = split_indices(rows, list(range(20)), 0.2, seed=1)
    assert len(ev) == 4 and sorted(train + ev) == list(range(20))
    assert not {rows[i].question for i in train} & {rows[i].question for i in ev}
    assert split_indices(rows, list(range(20)), 0.0, seed=1) == (list(range(20)), [])
    assert split_indices(rows, [3], 0.5, seed=1) == ([3], [])
    tr, ev = split_indices(rows, [0, 2], 0.01, seed=1)  # tiny fraction: still one eval row
    assert len(ev) == 1 and len(tr) == 1
    same = [Row("q", f"r{i}", "a", i + 1) for i in range(5)]  # one question throughout: split rows
    tr, ev = split_indices(same, list(range(5)), 0.4, seed=1)
    assert len(ev) == 2 and len(tr) == 3


def test_the_report_carries_load_counts_and_token_statistics(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [record(i) for i in range(12)] + [record(3)])
    cfg = config_for(path, "data.eval_fraction=0.25")
    rows, _, loaded = load_rows(cfg)
    tok = smollm2_tokenizer()
    report = prepare(rows, tok, cfg, report=loaded).report
    assert (report.rows_read, report.rows_kept, report.dropped["duplicate"]) == (13, 12, 1)
    assert loaded.token_stats is None  # the load report is not modified in place
    assert report.template == "r1-medical" and report.max_seq_length == 2048
    stats = report.token_stats
    assert set(stats) == {"prompt", "reasoning", "answer", "total"}
    for s in stats.values():
        assert s["min"] <= s["median"] <= s["p95"] <= s["max"]
    lengths = _lengths(rows, tok)
    assert (stats["total"]["min"], stats["total"]["max"]) == (min(lengths), max(lengths))
    answers = [len(tok(r.answer, add_special_tokens=False)["input_ids"]) for r in rows]
    assert (stats["answer"]["min"], stats["answer"]["max"]) == (min(answers), max(answers))
    text = report.to_text()
    for fragment in ("rows read        13", "rows kept        12", "dropped          duplicate 1",
                     "split            train 9 / eval 3", "median", "reasoning", report.content_sha256):
        assert fragment in text, fragment
    as_json = json.loads(report.to_json())
    assert as_json["dropped"] == {"duplicate": 1, "too_long": 0, "prompt_too_long": 0}
    assert as_json["token_stats"]["total"]["max"] == max(lengths)


def test_validate_reports_without_a_tokenizer_and_measures_with_one() -> None:
    cfg = config_for(SAMPLE)
    plain = validate(cfg)
    assert plain.rows_kept == 40 and plain.token_stats is None
    assert "not measured (no tokenizer given)" in plain.to_text()
    measured = validate(cfg, tiny_tokenizer())
    assert measured.token_stats is not None and measured.train_rows + measured.eval_rows == 40
    rows, identity, report = load_rows(cfg)
    reused = validate(cfg, tiny_tokenizer(), loaded=(rows[:10], identity, report))  # no second read
    assert reused.train_rows + reused.eval_rows == 10 and report.token_stats is None


def test_the_fast_backend_path_gives_the_ids_of_the_tokenizers_own_call(sample_rows: list[Row]) -> None:
    tok = smollm2_tokenizer()
    texts = [r.reasoning for r in sample_rows]
    encoder = examples._Encoder(tok)
    assert encoder.ids(texts) == tok(texts, add_special_tokens=False)["input_ids"]
    assert encoder._backend is not None  # the fast path was verified and kept


def test_a_tokenizer_whose_python_call_differs_from_its_backend_is_tokenized_its_own_way(
        sample_rows: list[Row]) -> None:
    tok = tiny_tokenizer()

    class Lowercasing(type(tok)):  # type: ignore[misc]
        def __call__(self, text: Any, *a: Any, **k: Any) -> Any:  # preprocessing the backend knows nothing of
            return super().__call__([t.lower() for t in text] if isinstance(text, list) else text.lower(), *a, **k)

    lower = Lowercasing(tokenizer_object=tok.backend_tokenizer, eos_token="</s>", bos_token="<s>")
    encoder = examples._Encoder(lower)
    texts = [r.reasoning for r in sample_rows]
    assert encoder.ids(texts) == lower(texts, add_special_tokens=False)["input_ids"]
    assert encoder._backend is None


def test_preparing_many_rows_costs_seconds_not_minutes() -> None:
    # 2,000 rows shaped like the real set (~800 tokens each) on the real tokenizer. Measured in CPU time so
    # a busy machine does not fail it; docs/benchmarks.md has the 20,000-row number.
    tok = smollm2_tokenizer()
    rows = synthetic_rows(2000)
    cfg = config_for("unused.jsonl", "model.max_seq_length=4096")
    cpu = time.process_time()
    p = prepare(rows, tok, cfg)
    cpu = time.process_time() - cpu
    assert p.report.token_stats["total"]["median"] > 600
    assert cpu < 20, f"{cpu:.1f} CPU-s for 2,000 rows"


def test_prepared_data_is_what_the_trainer_expects(sample_rows: list[Row]) -> None:
    p = prepare(sample_rows, tiny_tokenizer(), config_for(SAMPLE))
    assert isinstance(p.report, DataReport)
    for ex in p.train + p.eval:
        assert set(ex) == {"input_ids", "completion_mask"}
        assert all(isinstance(t, int) for t in ex["input_ids"])
        assert set(ex["completion_mask"]) <= {0, 1}


def test_lineage_names_the_rows_actually_used_and_the_rows_loaded() -> None:
    cfg = config_for(SAMPLE)
    rows, identity, _ = load_rows(cfg)
    tok = tiny_tokenizer()
    everything = data.used_identity(identity, prepare(rows, tok, config_for(SAMPLE, "model.max_seq_length=4096")))
    assert (everything.rows, everything.content_sha256) == (identity.rows, identity.content_sha256)

    lengths = sorted(len(x["input_ids"]) for x in prepare(rows, tok, config_for(SAMPLE, "model.max_seq_length=4096")).train)
    limit = lengths[len(lengths) // 2]  # about half the rows are longer than this and get dropped
    narrowed = data.used_identity(identity, prepare(rows, tok, config_for(SAMPLE, f"model.max_seq_length={limit}")))
    assert 0 < narrowed.rows < identity.rows
    assert narrowed.content_sha256 != identity.content_sha256
    assert (narrowed.loaded_rows, narrowed.loaded_sha256) == (identity.rows, identity.content_sha256)
