"""`medft generate` and `medft chat` against models published by `medft train` to a moto S3 endpoint.

A tiny random Llama is trained and published once for the module (about 15 s); one slow test does the same
with the demo model, SmolLM2-135M-Instruct, and asks it through both commands.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from job import inference
from job.config import JobConfig
from job.data import Row, prepare
from job.inference import Sampling, fetch_artifact, load, resolve_ref
from job.templates import get_template
from registry.errors import DataError
from tests.cli import run_main
from tests.conftest import _new_bucket, make_s3_client
from tests.integration.conftest import ROOT, job_args, medft_cmd, run_medft

QUESTION = "A 30-year-old has fever, productive cough and right lower lobe crackles. Most likely diagnosis?"
GREEDY = Sampling(max_new_tokens=12, temperature=0.0)


@dataclass(frozen=True)
class Published:
    store: str
    bucket: str
    endpoint: str
    env: dict[str, str]
    """For medft subprocesses: this module's cache, the moto endpoint, test credentials, JSON logs."""

    @property
    def run_uri(self) -> str:
        return f"{self.store}/runs/run-gen"

    def medft(self, *args: str, cache: Path | None = None, stdin: str | None = None,
              timeout: float = 180) -> subprocess.CompletedProcess:
        env = dict(self.env, **({"MEDFT_CACHE": str(cache)} if cache else {}))
        return subprocess.run(medft_cmd(*args), check=False, cwd=ROOT, env=env, input=stdin, capture_output=True, text=True,
                              timeout=timeout)


def _env(cache: Path, endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDFT_")}
    env.update(MEDFT_CACHE=str(cache), MEDFT_LOG_FORMAT="json", MEDFT_LEASE_SECONDS="20", PYTHONUNBUFFERED="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", MEDFT_S3_ENDPOINT_URL=endpoint)
    return env


def _events(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("medft: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def published(s3_server: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    """The tiny model trained, published to moto and registered as tiny:1 (@candidate), merged in float32."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDFT_S3_ENDPOINT_URL", s3_server)  # for the in-process loads
    bucket = _new_bucket(s3_server)
    store = f"s3://{bucket}/medft"
    env = _env(tmp_path_factory.mktemp("generate-cache"), s3_server)
    # Sample rows outgrow job_args' 384 tokens with the tiny tokenizer: keep them, cut to a length that fits.
    proc = run_medft(*job_args(tiny_model_dir, store, "run-gen", "--set", "export.dtype=float32",
                               "--set", "model.max_seq_length=512", "--set", "data.too_long=truncate"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield Published(store=store, bucket=bucket, endpoint=s3_server, env=env)
    mp.undo()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh model cache for in-process loads."""
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_generate_json_downloads_once_then_reuses_the_cache(published: Published, tiny_model_dir: Path,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = ("generate", "tiny@candidate", "--store", published.store, "--question", QUESTION,
            "--temperature", "0", "--max-new-tokens", "12", "--json")
    first = published.medft(*args, cache=tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads(first.stdout)  # stdout is the JSON document alone; logs go to stderr
    assert set(result) == {"question", "reasoning", "answer", "prompt_tokens", "completion_tokens", "seconds",
                           "ref", "finish_reason"}
    assert result["ref"] == "tiny:1" and result["question"] == QUESTION
    from transformers import AutoTokenizer

    trained_prompt = get_template("r1-medical").encode_prompt(QUESTION, AutoTokenizer.from_pretrained(tiny_model_dir))
    assert result["prompt_tokens"] == len(trained_prompt)
    assert 1 <= result["completion_tokens"] <= 12 and result["seconds"] > 0
    assert result["finish_reason"] in ("stop", "length")
    assert result["finish_reason"] == "stop" or result["completion_tokens"] == 12
    assert isinstance(result["reasoning"], str) and isinstance(result["answer"], str)
    assert [e["event"] for e in _events(first.stderr) if e["event"].startswith("model.")] == [
        "model.download", "model.downloaded"]

    monkeypatch.setenv("MEDFT_LOG_FORMAT", "json")
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "cache"))
    code, out, err = run_main(list(args), capsys)
    assert code == 0, err[-3000:]
    assert [e["event"] for e in _events(err) if e["event"].startswith("model.")] == ["model.cached"]
    assert json.loads(out)["reasoning"] == result["reasoning"]  # greedy: the same answer again
    assert json.loads(out)["answer"] == result["answer"]


def test_compare_with_the_base_model_gives_two_results(published: Published, tiny_model_dir: Path, cache: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["generate", "tiny:1", "--store", published.store, "-q", QUESTION, "--compare", "base",
                               "--temperature", "0", "--max-new-tokens", "6", "--json"], capsys)
    assert code == 0, err[-3000:]
    results = json.loads(out)
    assert [r["ref"] for r in results] == ["tiny:1", f"base {tiny_model_dir}"]
    assert all(r["question"] == QUESTION for r in results)
    # Both were asked the same prompt: the version's template with the same tokenizer.
    assert results[0]["prompt_tokens"] == results[1]["prompt_tokens"]


def test_chat_answers_each_line_until_a_stop_word_or_end_of_input(published: Published, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    args = ("chat", "tiny@candidate", "--store", published.store, "--temperature", "0", "--max-new-tokens", "6")
    cache = tmp_path / "cache"
    proc = published.medft(*args, "--json", stdin=f"{QUESTION}\n\n   \nWhat causes anemia?\nexit\nNever asked?\n",
                           cache=cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    turns = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [t["question"] for t in turns] == [QUESTION, "What causes anemia?"]
    assert all(t["ref"] == "tiny:1" and 1 <= t["completion_tokens"] <= 6 for t in turns)

    # Text output, ended by end of input (Ctrl-D) after a line without a newline: no stop word needed.
    monkeypatch.setenv("MEDFT_CACHE", str(cache))
    monkeypatch.setattr("sys.stdin", io.StringIO("What causes anemia?\nstop now is a question, not a stop word"))
    code, out, err = run_main(list(args), capsys)
    assert code == 0, err[-3000:]
    assert out.count("Reasoning:\n") == 2 and out.count("\n\nAnswer:\n") == 2


def test_bad_refs_exit_4_with_one_line(published: Published, tmp_path: Path) -> None:
    refs = ["nosuch", "tiny:7", "tiny@prod", "bad name!", "bad/../ref", f"{published.store}/runs/not-a-run",
            "s3://no-such-bucket-medft-test/medft/runs/x"]
    for ref in refs:
        proc = published.medft("generate", ref, "--store", published.store, "-q", QUESTION, cache=tmp_path / "c")
        assert proc.returncode == 4, (ref, proc.stderr[-2000:])
        assert ref in _one_error_line(proc), ref
    proc = published.medft("chat", "tiny:7", "--store", published.store, stdin="hello\n", cache=tmp_path / "c")
    assert proc.returncode == 4 and "tiny:7" in _one_error_line(proc)
    proc = published.medft("generate", "tiny:1", "--store", published.store, "-q", QUESTION, "--compare", "tiny:9",
                           cache=tmp_path / "c")
    assert proc.returncode == 4 and "tiny:9" in _one_error_line(proc)
    assert not (tmp_path / "c" / "models").exists()  # refused before any download


def test_checksum_failure_exits_3_while_a_verified_cache_is_still_used(published: Published, cache: Path,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    version = resolve_ref("tiny:1", store=published.store)
    cached = fetch_artifact(version)
    s3 = make_s3_client(published.endpoint)
    key = "medft/runs/run-gen/merged/model.safetensors"
    original = s3.get_object(Bucket=published.bucket, Key=key)["Body"].read()
    tampered = bytearray(original)
    tampered[-1] ^= 0xFF  # one flipped bit in the last tensor: same size, different content
    s3.put_object(Bucket=published.bucket, Key=key, Body=bytes(tampered))
    try:
        # The verified cache is used as it is: the store is not read again (it would now fail).
        assert fetch_artifact(version) == cached
        assert (cached / "model.safetensors").read_bytes() == original

        fresh = tmp_path / "fresh-cache"
        proc = published.medft("generate", "tiny:1", "--store", published.store, "-q", QUESTION, cache=fresh)
        assert proc.returncode == 3, proc.stderr[-3000:]
        line = _one_error_line(proc)
        assert "merged/model.safetensors" in line and "checksum" in line
        assert [p.name for p in (fresh / "models").iterdir()] == []  # nothing half-downloaded is kept
        monkeypatch.setenv("MEDFT_CACHE", str(tmp_path / "fresh-in-process"))
        with pytest.raises(DataError, match="model.safetensors"):
            fetch_artifact(resolve_ref(published.run_uri))  # the run URI route verifies the same way
    finally:
        s3.put_object(Bucket=published.bucket, Key=key, Body=original)


def _prompt_logits(loaded: inference.Loaded, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=torch.tensor([ids])).logits.float()


def test_adapter_on_its_base_answers_as_the_merged_weights_do(published: Published, cache: Path) -> None:
    version = resolve_ref("tiny@candidate", store=published.store)
    merged, adapter, base = load(version, "merged"), load(version, "adapter"), inference.load_base(version)
    ids = merged.prompt_ids(QUESTION)
    assert adapter.prompt_ids(QUESTION) == ids == base.prompt_ids(QUESTION)
    torch.testing.assert_close(_prompt_logits(adapter, ids), _prompt_logits(merged, ids), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_prompt_logits(base, ids), _prompt_logits(merged, ids), atol=1e-3)
    a = inference.generate(merged, QUESTION, GREEDY)
    b = inference.generate(adapter, QUESTION, GREEDY)
    assert (a.reasoning, a.answer, a.completion_tokens) == (b.reasoning, b.answer, b.completion_tokens)

    # An adapter is refused on base weights other than the ones it was trained on.
    recorded = dict(version.base_model, sha256={"model.safetensors": "0" * 64})
    with pytest.raises(DataError, match="model.safetensors differs from the weights it was trained on"):
        load(inference.Version(version.label, version.artifacts, recorded, version.config), "adapter")


def test_run_uri_prompt_equals_the_training_prompt_prefix(published: Published, tiny_model_dir: Path,
                                                          cache: Path) -> None:
    from job.model import load_tokenizer

    version = resolve_ref(published.run_uri)
    assert version.label == published.run_uri
    assert version.artifacts == resolve_ref("tiny:1", store=published.store).artifacts
    loaded = load(version)
    cfg = JobConfig.model_validate(version.config)
    assert cfg.data.template == "r1-medical" == loaded.template.name
    # Every sample row, kept whole (truncation only cuts completions) and all in the training split.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval_fraction": 0.0, "too_long": "truncate"})})
    lines = (ROOT / "data" / "sample.jsonl").read_text().splitlines()
    rows = [Row(question=r["Question"], reasoning=r["Complex_CoT"], answer=r["Response"], source_row=n + 1)
            for n, r in enumerate(json.loads(line) for line in lines if line.strip())]
    examples = prepare(rows, load_tokenizer(tiny_model_dir, cfg), cfg).train
    assert len(examples) == len(rows) > 10
    for row, example in zip(rows, examples, strict=True):
        head = example["input_ids"][:example["completion_mask"].index(1)]
        assert loaded.prompt_ids(row.question) == head


class _Terminal(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_tokens_stream_to_a_terminal_and_print_whole_elsewhere(published: Published, cache: Path) -> None:
    sampling = Sampling(max_new_tokens=16, temperature=0.0)
    terminal = _Terminal()
    [streamed] = inference.generate_command("tiny:1", QUESTION, sampling=sampling, store=published.store,
                                            out=terminal)
    assert terminal.getvalue() == streamed.to_text() + "\n"
    assert len([w for w in terminal.writes if w.strip()]) > 3  # written piece by piece as tokens came

    piped = io.StringIO()
    [printed] = inference.generate_command("tiny:1", QUESTION, sampling=sampling, store=published.store, out=piped)
    assert piped.getvalue() == printed.to_text() + "\n" == terminal.getvalue()

    compared = io.StringIO()
    inference.generate_command("tiny:1", QUESTION, sampling=sampling, store=published.store, compare="tiny@candidate",
                               out=compared)
    text = compared.getvalue()
    assert text.startswith("=== tiny:1 ===\nReasoning:\n") and text.count("=== tiny:1 ===") == 2
    assert text.count("\n\nAnswer:\n") == 2


def test_seeded_sampling_is_reproducible(published: Published, cache: Path) -> None:
    loaded = load(resolve_ref("tiny:1", store=published.store))
    runs = [inference.generate(loaded, QUESTION, Sampling(max_new_tokens=16, temperature=1.0, seed=s))
            for s in (7, 7, 8)]
    texts = [(r.reasoning, r.answer) for r in runs]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]  # a random tiny model samples differently under another seed


@pytest.mark.slow
def test_demo_model_generate_and_chat(s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SmolLM2-135M-Instruct (configs/demo.yaml), fine-tuned one step, published to moto, then asked."""
    from job.model import load_tokenizer, pull_weights

    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", s3_server)
    store = f"s3://{_new_bucket(s3_server)}/medft"
    cache = tmp_path / "cache"
    env = _env(cache, s3_server)
    train = subprocess.run(medft_cmd(
        "train", "--config", "configs/demo.yaml", "--set", f"output.store={store}", "--set", "output.run_id=demo-1",
        "--set", "train.max_steps=1", "--set", "train.batch_size=1", "--set", "train.grad_accum=1",
        "--set", "train.warmup_steps=0", "--set", "eval.enabled=false", "--set", "data.eval_fraction=0",
        "--set", "export.merge=true"), check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]

    question = "What is the first-line treatment for an uncomplicated urinary tract infection?"
    gen = subprocess.run(medft_cmd("generate", "smollm2-medical-demo@demo", "--store", store, "-q", question,
                                   "--temperature", "0", "--max-new-tokens", "8", "--json"),
                         check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-3000:]
    result = json.loads(gen.stdout)
    assert result["ref"] == "smollm2-medical-demo:1" and 1 <= result["completion_tokens"] <= 8

    # The prompt it was asked is the trained one, token for token, with the real tokenizer.
    monkeypatch.setenv("MEDFT_CACHE", str(cache))
    version = resolve_ref("smollm2-medical-demo:1", store=store)
    cfg = JobConfig.model_validate(version.config)
    merged_dir = fetch_artifact(version)  # cached by the generate above
    from transformers import AutoTokenizer

    served = get_template(version.template_name).encode_prompt(question, AutoTokenizer.from_pretrained(merged_dir))
    row = Row(question=question, reasoning="Cystitis in a healthy woman.", answer="Nitrofurantoin.", source_row=1)
    trained_tokenizer = load_tokenizer(pull_weights(cfg.model.base, cfg.model.revision).path, cfg)
    [example] = prepare([row], trained_tokenizer, cfg).train
    assert served == example["input_ids"][:example["completion_mask"].index(1)]
    assert result["prompt_tokens"] == len(served)

    chat = subprocess.run(medft_cmd("chat", "smollm2-medical-demo@demo", "--store", store, "--temperature", "0",
                                    "--max-new-tokens", "6", "--json"),
                          check=False, cwd=ROOT, env=env, input=f"{question}\nstop\n", capture_output=True, text=True,
                          timeout=300)
    assert chat.returncode == 0, chat.stderr[-3000:]
    [turn] = [json.loads(line) for line in chat.stdout.splitlines()]
    assert turn["question"] == question and turn["prompt_tokens"] == len(served)
    assert [e["event"] for e in _events(chat.stderr) if e["event"].startswith("model.")] == ["model.cached"]


def test_at_a_terminal_generate_shows_medfts_lines_then_the_answer_alone(published: Published, tmp_path: Path) -> None:
    """A real terminal (a pty): no library progress bar or warning, no JSON, every loading line before
    ``Reasoning:``, nothing between the streamed text's lines, medft's closing event after the answer."""
    import re

    from tests.terminal import run_in_terminal

    code, screen = run_in_terminal("generate", "tiny:1", "--store", published.store, "-q", QUESTION,
                                   "--temperature", "0", "--max-new-tokens", "12",
                                   env=dict(published.env, MEDFT_CACHE=str(tmp_path / "cache")))
    assert code == 0, screen
    lines = screen.splitlines()
    assert "Loading weights" not in screen and "[transformers" not in screen, screen
    assert not any(re.match(r"\d\d:\d\d:\d\d (warning|error): ", line) for line in lines), screen
    assert not any(line.startswith("{") for line in lines), screen
    logged = [n for n, line in enumerate(lines) if re.match(r"\d\d:\d\d:\d\d \S+", line)]
    start, answer = lines.index("Reasoning:"), lines.index("Answer:")
    assert lines[start - 1].split()[1] == "inference.loaded" and start < answer
    assert [lines[n].split()[1] for n in logged if n > start] == ["inference.answered"], screen
    assert logged[-1] == len(lines) - 1 > answer  # the closing event comes after the whole answer
