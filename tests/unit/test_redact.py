"""No secret in any URL medft logs, raises, records or writes (registry/redact.py), and secret keys and values
masked whatever their case and whether or not the variable is one medft knows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry import logs
from registry.errors import ConfigError, MedftError, TransientError
from registry.redact import redact, redact_text, redact_url, redact_urls, url_origin
from registry.store import open_store
from tests.cli import error_lines, run_main
from tests.conftest import _free_port

SECRET = "s3cr3t-Value-0f-42"


@pytest.mark.parametrize("url, kept", [
    (f"http://user:{SECRET}@127.0.0.1:5000/mlflow", "http://***@127.0.0.1:5000/mlflow"),
    (f"https://user:p@ss{SECRET}@host/x", "https://***@host/x"),  # a raw "@" inside the password
    (f"https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}"
     f"&X-AMZ-SECURITY-TOKEN={SECRET}&X-Amz-Date=20260101",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=***"
     "&X-AMZ-SECURITY-TOKEN=***&X-Amz-Date=20260101"),
    (f"https://hub/api?revision=main&Token={SECRET}&access_token={SECRET}&API_KEY={SECRET}&apikey={SECRET}",
     "https://hub/api?revision=main&Token=***&access_token=***&API_KEY=***&apikey=***"),
    (f"https://acct.blob.core.windows.net/c?sv=2024&sig={SECRET}&Signature={SECRET}&se=2027",
     "https://acct.blob.core.windows.net/c?sv=2024&sig=***&Signature=***&se=2027"),
    (f"https://hooks.example/x?client_secret={SECRET}&password={SECRET}&Key={SECRET}&credential={SECRET}#a=1",
     "https://hooks.example/x?client_secret=***&password=***&Key=***&credential=***#a=1"),
    (f"https://app/cb#access_token={SECRET}&state=9", "https://app/cb#access_token=***&state=9"),
    ("https://hub/api?max_new_tokens=5&page=2", "https://hub/api?max_new_tokens=5&page=2"),
    ("s3://bucket/runs/run-1/adapter", "s3://bucket/runs/run-1/adapter"),
])
def test_redact_url_cuts_userinfo_and_secret_parameters_in_any_case(url, kept):
    assert redact_url(url) == kept and SECRET not in redact_url(url)


def test_urls_inside_free_text_and_bare_queries_are_redacted():
    message = (f'Could not connect to the endpoint URL: "http://AKIA:{SECRET}@127.0.0.1:9/b?x-id=PutObject"; '
               f"Retrying after NewConnectionError: /mlflow?access_token={SECRET}/api/2.0/runs/create. "
               f"see <https://x/y?sig={SECRET}> and (http://u:{SECRET}@h/)")
    out = redact_text(message)
    assert SECRET not in out
    assert '"http://***@127.0.0.1:9/b?x-id=PutObject"' in out and "<https://x/y?sig=***>" in out


def test_every_expected_error_and_every_stored_record_loses_url_credentials():
    assert SECRET not in ConfigError(f"MLFLOW_TRACKING_URI=http://u:{SECRET}@h is down").message
    assert SECRET not in str(TransientError(f"cannot reach https://h/x?token={SECRET}"))
    record = {"config": {"model": {"base": f"https://u:{SECRET}@h/m"}}, "eos_token_id": 2,
              "trackers": [{"url": f"http://h/?api_key={SECRET}"}]}
    stored = redact_urls(record)
    assert SECRET not in json.dumps(stored) and stored["eos_token_id"] == 2  # data, not masked by its name


def test_secret_keys_match_in_any_case_and_unlisted_secret_values_are_masked(monkeypatch):
    """Upper- and mixed-case keys, and the value of a variable medft has no list entry for (only its name
    looks secret), are masked like the lowercase, listed ones."""
    monkeypatch.setenv("Db_Password", "unlisted-db-password-771")
    monkeypatch.setenv("MY_SERVICE_API_KEY", "unlisted-api-key-9e2b")
    event = {"HF_TOKEN": "hf_x", "Aws_Secret_Access_Key": "y", "X-Api-Key": "z", "Authorization": "Bearer q",
             "MAX_NEW_TOKENS": 5, "Eos_Token": "</s>",
             "msg": "connecting with unlisted-db-password-771 and unlisted-api-key-9e2b"}
    out = logs.redact(event)
    assert out["HF_TOKEN"] == out["Aws_Secret_Access_Key"] == out["X-Api-Key"] == out["Authorization"] == "***"
    assert out["MAX_NEW_TOKENS"] == 5 and out["Eos_Token"] == "</s>"
    assert out["msg"] == "connecting with *** and ***"
    assert redact("x", secrets=None) == "x"


def test_webhook_urls_are_named_by_their_origin():
    """A webhook's secret is often its path (Slack, Discord): name the hook by its origin alone."""
    hook = f"https://u:{SECRET}@hooks.example.com:8443/services/T0/B0/{SECRET}?token={SECRET}"
    assert url_origin(hook) == "https://hooks.example.com:8443"
    assert SECRET not in redact_url(hook.split("/services")[0] + f"/x?token={SECRET}")
    from registry import webhooks

    shown = webhooks.label(hook)
    assert shown.startswith("https://hooks.example.com:8443/...#") and SECRET not in shown and "services" not in shown
    assert webhooks.label(hook) != webhooks.label(hook.replace("B0", "B1"))  # two hooks on one host stay apart


def test_a_library_traceback_loses_url_credentials(monkeypatch, capsys):
    """A library logging an exception (``exc_info``) whose text quotes a URL with credentials: the traceback is
    rendered before redaction, so neither the message nor the traceback keeps them."""
    import logging

    monkeypatch.setenv("MEDFT_LOG_FORMAT", "json")
    logs.configure()
    try:
        raise ConnectionError(f"cannot reach https://user:{SECRET}@s3.example.com/b?token={SECRET}")
    except ConnectionError:
        logging.getLogger("botocore.endpoint").error("request to %s failed", f"https://h/x?sig={SECRET}", exc_info=True)
    err = capsys.readouterr().err
    assert "ConnectionError" in err and "Traceback" in err
    assert SECRET not in err


def _s3_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """An S3 store at ``endpoint`` (credentials in it), tried once, with test credentials of its own."""
    monkeypatch.setenv("MEDFT_CACHE", str(tmp_path))
    monkeypatch.setenv("MEDFT_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("MEDFT_S3_ENDPOINT_URL", endpoint)


def test_store_errors_quote_the_endpoint_without_its_credentials(monkeypatch, capsys, tmp_path):
    """An S3 endpoint with credentials in it: malformed (exit 2) or down (exit 75), one line, no secret."""
    _s3_endpoint(monkeypatch, tmp_path, f"http://AKIA:{SECRET}@127.0.0.1:port/?X-Amz-Signature={SECRET}")
    code, _, err = run_main(["registry", "list", "--store", "s3://bucket/medft"], capsys)
    assert code == 2 and SECRET not in err and "MEDFT_S3_ENDPOINT_URL" in error_lines(err)[0], err
    with pytest.raises(MedftError) as e:  # the store's own error, raised where it is written
        open_store("s3://bucket/medft")
    assert SECRET not in e.value.message


def test_a_store_that_is_down_is_named_without_its_credentials(monkeypatch, capsys, tmp_path):
    _s3_endpoint(monkeypatch, tmp_path, f"http://AKIA:{SECRET}@127.0.0.1:{_free_port()}")  # nobody listens there
    code, _, err = run_main(["registry", "list", "--store", "s3://bucket/medft"], capsys)
    assert code == 75 and len(error_lines(err)) == 1 and SECRET not in err, err


def test_a_model_card_quotes_sources_without_their_credentials():
    from job.config import load_config
    from job.model_card import model_card

    lineage = {"base_model": {"uri": f"https://u:{SECRET}@models.example/base?token={SECRET}"},
               "dataset": {"source": f"https://data.example/rows.jsonl?X-Amz-Signature={SECRET}", "rows": 10,
                           "content_sha256": "b" * 64}}
    card = model_card(load_config(None, env={}), lineage, {"train_loss": 1.0}, {})
    assert SECRET not in card and "https://data.example/rows.jsonl?X-Amz-Signature=***" in card
