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
