import json
import subprocess
import sys

from registry.logs import redact


def test_secret_keys_and_values_are_redacted(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_verysecretvalue123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    event = {"hf_token": "x", "aws_secret_access_key": "y", "password": "p", "max_new_tokens": 5,
             "tokens_per_s": 1.5, "msg": "calling with hf_verysecretvalue123 and wJalrXUtnFEMI/K7MDENG",
             "nested": {"api_key": "k", "values": ["hf_verysecretvalue123"]}}
    out = redact(event)
    assert out["hf_token"] == out["aws_secret_access_key"] == out["password"] == "***"
    assert out["max_new_tokens"] == 5 and out["tokens_per_s"] == 1.5
    assert "hf_verysecretvalue123" not in json.dumps(out) and "wJalrXUtnFEMI" not in json.dumps(out)
    assert out["nested"]["api_key"] == "***"


def test_logs_are_json_lines_off_a_terminal_and_hold_no_secret():
    code = ("from registry import logs; logs.configure(); "
            "logs.get_logger('t').info('hello', token='abcdefgh12345678', n=3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"HF_TOKEN": "hf_secretvalue_987654", "PATH": "/usr/bin"})
    line = json.loads(proc.stderr.strip().splitlines()[-1])
    assert line["event"] == "hello" and line["n"] == 3 and line["token"] == "***" and line["level"] == "info"


def test_library_warnings_are_json_events_too_and_hold_no_secret():
    """transformers writes through a handler of its own ("[transformers] ..."), and other libraries through
    the stdlib root logger; off a terminal each must still be one JSON event, redacted (also under CI=true,
    where transformers both prints and propagates)."""
    code = ("from registry import logs; logs.configure(); logs.route_library_logs(); "
            "from transformers.utils import logging as t; t.get_logger('transformers.trainer').warning('mtime odd'); "
            "import logging; logging.getLogger('botocore').warning('using %s', 'hf_secretvalue_987654')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"HF_TOKEN": "hf_secretvalue_987654", "PATH": "/usr/bin", "CI": "true"})
    events = [json.loads(line) for line in proc.stderr.strip().splitlines()]  # every line is JSON
    assert [(e["logger"], e["event"], e["level"]) for e in events] == [
        ("transformers.trainer", "mtime odd", "warning"), ("botocore", "using ***", "warning")]


_LIBRARY_NOISE = (
    "import logging, os, warnings; from registry import logs; logs.configure(); logs.set_verbose({verbose}); "
    "logging.getLogger('transformers.tokenization_utils_base').warning('clean_up_tokenization_spaces was not set'); "
    "warnings.warn('torch would like a word'); logging.getLogger('peft').error('adapter broken'); "
    "logs.get_logger('medft').info('stage.start', stage='pull'); "
    "print('bars off:', os.environ.get('HF_DATASETS_DISABLE_PROGRESS_BARS'))"
)


def _library_noise(fmt: str, verbose: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LIBRARY_NOISE.format(verbose=verbose)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin", "MEDFT_LOG_FORMAT": fmt}, timeout=60)


def test_readable_logs_show_library_warnings_only_with_verbose_json_logs_keep_them_all():
    """Lines for a person hold medft's own events and the libraries' errors; ``--verbose`` adds the libraries'
    warnings (transformers', Python warnings) and their progress bars. JSON logs always keep every one."""
    quiet = _library_noise("console", verbose=False)
    assert "stage.start stage=pull" in quiet.stderr and "error: [peft] adapter broken" in quiet.stderr
    assert "clean_up_tokenization_spaces" not in quiet.stderr and "torch would like" not in quiet.stderr
    assert quiet.stdout.strip() == "bars off: 1"
    verbose = _library_noise("console", verbose=True)
    assert "warning: [transformers.tokenization_utils_base] clean_up_tokenization_spaces" in verbose.stderr
    assert "torch would like a word" in verbose.stderr and verbose.stdout.strip() == "bars off: None"
    events = [json.loads(line) for line in _library_noise("json", verbose=False).stderr.splitlines()]
    assert [(e.get("logger"), e["level"]) for e in events] == [
        ("transformers.tokenization_utils_base", "warning"), ("py.warnings", "warning"), ("peft", "error"),
        (None, "info")]


def test_log_lines_wait_while_an_answer_streams():
    """A library message during a streamed answer (a warning at the first decode) comes after the answer, whole."""
    code = ("import logging, sys; from registry import logs; logs.configure(json_logs=False); "
            "from job.inference.console import SectionWriter; w = SectionWriter(sys.stdout); w.open(); "
            "w.feed('thinking'); logging.getLogger('transformers').error('mid-stream'); "
            "w.feed(' more</think>the answer'); w.close()")
    interleaved = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, timeout=60, env={"PATH": "/usr/bin", "PYTHONUNBUFFERED": "1"})
    out = interleaved.stdout  # stdout and stderr in one pipe, in the order they were written
    assert interleaved.returncode == 0, out
    assert out.startswith("Reasoning:\nthinking more\n\nAnswer:\nthe answer\n"), out
    assert out.rstrip().endswith("[transformers] mid-stream")
