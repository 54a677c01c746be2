"""job.inference without a published model: splitting, streaming, refs, the artifact cache, prompts."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from job import inference
from job.inference import (
    CUT_OFF,
    Answer,
    Sampling,
    SectionWriter,
    TokenStream,
    Version,
    cache_key,
    fetch_artifact,
    resolve_ref,
    split_completion,
)
from job.inference.generate import decoder
from registry.errors import ConfigError, DataError, NotFoundError
from tests import data_factory

COMPLETIONS = [
    # (completion after "<think>\n", why generation stopped)
    ("The cough and fever point to infection.\nCheck the chest.\n</think>\nPneumonia; treat with antibiotics.",
     "stop"),
    ("  Lead with spaces.  \n\n</think>\n\n  Spaced answer.  \n", "stop"),
    ("Still thinking about the differential diagnosis and the next test", "length"),
    ("Still thinking, almost closed </thi", "length"),  # a cut-off tag prefix is reasoning text
    ("</think>No reasoning at all.", "stop"),
    ("Reasoning only, then EOS.", "stop"),
    ("Reasoning done.\n</think>\n", "length"),  # closed, answer cut off before it began
    ("Not a close tag: </thing> nor </ think>.\n</think>\nAnswer with </think> inside.", "stop"),
]


def _answer(completion: str, finish: str) -> Answer:
    reasoning, answer = split_completion(completion)
    return Answer(question="q", reasoning=reasoning, answer=answer, prompt_tokens=1, completion_tokens=1,
                  seconds=0.0, ref="r:1", finish_reason=finish)


def test_split_completion_separates_reasoning_from_answer() -> None:
    assert split_completion("a\nb\n</think>\nthe answer\n") == ("a\nb", "the answer")
    assert split_completion("cut off while reasonin") == ("cut off while reasonin", "")
    assert split_completion("x</think>y</think>z") == ("x", "y</think>z")  # the first close ends reasoning
    assert split_completion("") == ("", "")


def test_answer_text_says_when_the_reasoning_was_cut_off() -> None:
    cut = _answer("half a thought", "length").to_text()
    assert cut == f"Reasoning:\nhalf a thought\n\nAnswer:\n{CUT_OFF}"
    assert _answer("done\n</think>\nyes", "stop").to_text() == "Reasoning:\ndone\n\nAnswer:\nyes"
    assert set(_answer("a</think>b", "stop").to_dict()) == {
        "question", "reasoning", "answer", "prompt_tokens", "completion_tokens", "seconds", "ref", "finish_reason"}


@pytest.mark.parametrize(("completion", "finish"), COMPLETIONS)
def test_streamed_sections_equal_the_final_text_for_every_chunking(completion: str, finish: str) -> None:
    expected = _answer(completion, finish).to_text() + "\n"
    chunkings = [[completion], list(completion)]  # whole, and one character at a time
    chunkings += [[completion[:i], completion[i:j], completion[j:]]  # every split in two or three
                  for i in range(len(completion) + 1) for j in range(i, len(completion) + 1, 3)]
    for chunks in chunkings:
        out = io.StringIO()
        writer = SectionWriter(out)
        writer.open()
        for chunk in chunks:
            writer.feed(chunk)
        writer.close(finish)
        assert out.getvalue() == expected, chunks


def test_section_writer_shows_reasoning_before_the_answer_arrives() -> None:
    out = io.StringIO()
    writer = SectionWriter(out)
    writer.open()
    writer.feed("First the history. Then the exam")
    assert out.getvalue() == "Reasoning:\nFirst the history. Then the exam"  # streamed, not buffered
    writer.feed(".\n</th")
    assert out.getvalue().endswith("exam.")  # the possible tag start and the newline wait
    writer.feed("ink>\nAnswer text")
    assert out.getvalue().endswith("exam.\n\nAnswer:\nAnswer text")


def test_token_stream_decodes_multibyte_characters_whole() -> None:
    tok = data_factory.tiny_tokenizer()
    text = "Fièvre et toux 发热咳嗽 for 3 days.\nThink again.\n</think>\nPneumonie — 肺炎."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 20  # byte-level BPE splits the CJK characters into several byte tokens
    eos = tok.eos_token_id
    decode = decoder(tok)
    out = io.StringIO()
    writer = SectionWriter(out)
    writer.open()
    stream = TokenStream(decode, writer)
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt, as generate passes it first: skipped
    pieces = []
    for i in [*ids, eos]:  # one token per step, as generate passes them
        before = out.getvalue()
        stream.put(torch.tensor([i]))
        pieces.append(out.getvalue()[len(before):])
    stream.end()
    writer.close("stop")
    assert "\ufffd" not in out.getvalue()
    assert out.getvalue() == _answer(text, "stop").to_text() + "\n"
    assert sum(1 for p in pieces if p) > 5  # it streamed as tokens came, not all at the end
    assert decode([*ids, eos]) == text  # the EOS (a special token) is not part of the text


def test_decoder_keeps_think_tags_a_tokenizer_marks_special() -> None:
    tok = data_factory.tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["</think>"]})
    ids = tok("why\n</think>\nbecause", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tok.convert_tokens_to_ids("</think>") in ids
    assert split_completion(decoder(tok)(ids)) == ("why", "because")


def test_stop_ids_join_the_tokenizer_eos_and_the_generation_config_eos() -> None:
    tokenizer = SimpleNamespace(eos_token_id=1)  # what training appended to every example
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[2, 1]))
    loaded = inference.Loaded(label="x", model=model, tokenizer=tokenizer, template=None, backend="t")  # type: ignore[arg-type]
    assert inference.stop_ids(loaded) == [1, 2]
    model.generation_config.eos_token_id = None
    assert inference.stop_ids(loaded) == [1]


def test_sampling_refuses_bad_settings() -> None:
    assert Sampling() == Sampling(max_new_tokens=512, temperature=0.6, top_p=0.95, seed=None)
    for bad in ({"max_new_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ConfigError):
            Sampling(**bad)


def test_bad_refs_are_not_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = str(tmp_path / "store")
    for ref in ("", "  ", "bad name", "tiny:0", "tiny:x", "tiny@", "@alias", "tiny", "tiny:3", "tiny@prod",
                "x/../y", str(tmp_path / "no-run"), "gs://bucket/runs/x", "file://host/x"):
        with pytest.raises(NotFoundError) as err:
            resolve_ref(ref, store=store)
        assert "\n" not in err.value.message
        if ref.strip():
            assert ref.strip() in err.value.message or repr(ref.strip()) in err.value.message, err.value.message


def test_is_run_uri() -> None:
    for uri in ("s3://b/p/runs/x", "file:///tmp/x", "./runs/x", "/abs/runs/x", "runs\\x", "~/runs/x"):
        assert inference.is_run_uri(uri), uri
    for ref in ("tiny", "tiny:2", "tiny@prod", "base"):
        assert not inference.is_run_uri(ref), ref


def test_cache_key_follows_the_content_not_the_order() -> None:
    a = {"model.safetensors": "a" * 64, "config.json": "b" * 64}
    assert cache_key(a) == cache_key(dict(reversed(a.items())))
    assert cache_key(a) != cache_key({**a, "config.json": "c" * 64})
    assert cache_key(a) != cache_key({**a, "extra.json": "b" * 64})


def _local_artifact(root: Path, files: dict[str, bytes]) -> Version:
    for rel, data in files.items():
        (root / "merged" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "merged" / rel).write_bytes(data)
    sums = {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}
    return Version(label="demo:1", artifacts={"merged": {"uri": str(root / "merged"), "files": sums}})


def test_fetch_artifact_downloads_once_verified_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    files = {"config.json": b'{"a": 1}', "sub/model.safetensors": b"\x00" * 5000}
    version = _local_artifact(tmp_path / "store", files)
    first = fetch_artifact(version)
    assert first.parent == tmp_path / "cache" / "models"
    assert {rel: (first / rel).read_bytes() for rel in files} == files
    assert json.loads((first / inference.COMPLETE_MARKER).read_text())["ref"] == "demo:1"

    # Change the stored file behind the record's back: the cache is used, so nothing is read (or refused).
    (tmp_path / "store" / "merged" / "config.json").write_bytes(b'{"a": 2}')
    assert fetch_artifact(version) == first
    assert (first / "config.json").read_bytes() == b'{"a": 1}'

    # A fresh cache must download, and the changed file fails its checksum: nothing is left behind.
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache2"))
    with pytest.raises(DataError) as err:
        fetch_artifact(version)
    assert "config.json" in err.value.message and "checksum" in err.value.message
    assert list((tmp_path / "cache2" / "models").iterdir()) == []

    # A cache entry missing a file (deleted by hand) is fetched again rather than loaded broken.
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "store" / "merged" / "config.json").write_bytes(files["config.json"])
    (first / "sub" / "model.safetensors").unlink()
    assert fetch_artifact(version) == first
    assert (first / "sub" / "model.safetensors").read_bytes() == files["sub/model.safetensors"]


def test_fetch_artifact_names_what_the_version_has(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    version = _local_artifact(tmp_path / "store", {"config.json": b"{}"})
    with pytest.raises(NotFoundError, match=r"demo:1 has no 'adapter' artifact \(it has: merged\); use --artifact merged"):
        fetch_artifact(version, "adapter")
    (tmp_path / "store" / "merged" / "config.json").unlink()
    with pytest.raises(NotFoundError, match="config.json"):
        fetch_artifact(version)


def test_template_comes_from_the_record() -> None:
    assert Version("x:1", {}, config={"data": {"template": "r1-medical-zh"}}).template_name == "r1-medical-zh"
    assert Version("x:1", {}, config={}).template_name == "r1-medical"  # a record from before templates
    with pytest.raises(NotFoundError, match="x:1 records no base model"):
        Version("x:1", {}).base_uri()
    assert Version("x:1", {}, base_model={"uri": "hf://o/m", "revision": "abc"}).base_uri() == ("hf://o/m", "abc")
    assert Version("x:1", {}, config={"model": {"base": "/m"}}).base_uri() == ("/m", None)


@pytest.mark.parametrize("template", ["r1-medical", "chat"])
def test_prompt_ids_equal_the_training_prompt_prefix(template: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With a tokenizer that adds BOS and has a chat template: the published run's prompt is the trained one."""
    from job.data import Row, prepare
    from registry.runs import publish_dir
    from registry.store import open_store
    from tests.model_factory import save_tiny_model

    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    tokenizer = data_factory.tiny_tokenizer()
    run = tmp_path / "run"
    save_tiny_model(run / "merged", tokenizer)
    cfg = data_factory.config_for("rows.jsonl", f"data.template={template}", "data.eval_fraction=0")
    publish_dir(open_store(str(tmp_path / "store")), "run-1", run, {"artifacts": {"merged": "merged"},
                                                                     "config": cfg.to_dict()})
    loaded = inference.load(resolve_ref(str(tmp_path / "store" / "runs" / "run-1")), "merged")
    rows = [Row(question=r["Question"], reasoning=r["Complex_CoT"], answer=r["Response"], source_row=i + 1)
            for i, r in enumerate(data_factory.records(3))]
    rows.append(Row(question="Fièvre et toux depuis 3 jours : 肺炎 ?", reasoning="r", answer="a", source_row=4))
    for row, example in zip(rows, prepare(rows, tokenizer, cfg).train, strict=True):
        head = example["input_ids"][:example["completion_mask"].index(1)]
        assert loaded.prompt_ids(row.question) == head
    if template == "r1-medical":
        assert head[0] == tokenizer.bos_token_id  # the BOS the tokenizer adds is part of the prompt
    assert loaded.tokenizer.decode(head).endswith("<think>\n")


def test_chat_questions_end_at_a_stop_word_or_end_of_input() -> None:
    lines = "first question\n\n   \n  second one  \n EXIT \nnever asked\n"
    assert list(inference.questions(io.StringIO(lines))) == ["first question", "second one"]
    assert list(inference.questions(io.StringIO("a\nstop\nb\n"))) == ["a"]
    assert list(inference.questions(io.StringIO("a\nstop here\nb"))) == ["a", "stop here", "b"]  # EOF ends it
    prompt = io.StringIO()
    assert list(inference.questions(io.StringIO("q\n"), prompt)) == ["q"]
    assert prompt.getvalue().count("Question (stop, exit or Ctrl-D to end)> ") == 2  # asked again, then EOF


def test_an_empty_question_is_refused_before_any_lookup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--question is empty"):
        inference.generate_command("nosuch", "   ", sampling=Sampling(), store=str(tmp_path / "nowhere"))
    assert not (tmp_path / "nowhere").exists()


def test_an_adapter_loads_on_the_base_precision_it_trained_against() -> None:
    # The plan recorded with the run decides; `auto` in the config says nothing by itself.
    assert Version("m:1", {}, config={"model": {"load_in_4bit": "auto"}}, plan={"load_in_4bit": True}).trained_in_4bit
    assert not Version("m:1", {}, config={"model": {"load_in_4bit": True}},
                       plan={"load_in_4bit": False}).trained_in_4bit
    assert not Version("m:1", {}, config={"model": {"load_in_4bit": "auto"}}).trained_in_4bit
    assert Version("m:1", {}, config={"model": {"load_in_4bit": True}}).trained_in_4bit  # records before plans
