"""The one place secrets are cut out of anything medft prints, logs, raises, records or writes.

Three kinds of secret, three rules:

* **Secret-named keys** in a mapping (``hf_token``, ``AWS_Secret_Access_Key``, ``api-key``; matched as whole
  words, case-insensitively) have their value replaced by ``***`` (:func:`redact`, for log events).
* **Secret values** from the environment (the AWS and Hugging Face credentials, and the value of any variable
  whose name is secret-looking, listed here or not) are cut out of every string (:func:`redact`).
* **URLs**: the userinfo (``user:password@``) and the value of every secret-looking query or fragment
  parameter (``token``, ``sig``, ``X-Amz-Signature``, ``access_token``, ``api_key``, ...) are replaced by
  ``***``, in a lone URL (:func:`redact_url`) and in URLs inside free text such as exception messages
  (:func:`redact_text`); :func:`redact_urls` does the same to every string of a record before it is stored.

The log processor chain (:mod:`registry.logs`), the CLI's one-line error, tracker reasons, run and version
records, ``metrics.json``, ``config.yaml`` and model cards all go through here; webhooks should too.
Imports nothing of medft, so every layer can use it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "***"

# Whole words only: "hf_token" and "aws_secret_access_key" are secrets, "max_new_tokens" is not.
_SECRET_KEY = re.compile(r"(^|[_-])(token|secret|password|passwd|credentials?|api[_-]?key|access[_-]?key|"
                         r"authorization)($|[_-])", re.I)
_NOT_SECRET = {"pad_token", "eos_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token"}
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
               "HUGGING_FACE_HUB_TOKEN")

# A URL: a scheme, "://", then everything up to white space or a quote/bracket that ends it in prose.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# userinfo: greedy up to the last "@" before the path, so a raw "@" inside a password goes too.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#\s]*@")
# One query or fragment parameter: separator, name, "=", value up to the next separator.
_PARAM = re.compile(r"([?&;#])([^=&;#\s'\"<>]+)=([^&;#\s'\"<>]*)")
# A parameter is secret when one of these is a word of its name (split at "-", "_" and "."), in any case.
_SECRET_WORDS = {"token", "sig", "signature", "key", "secret", "password", "passwd", "pwd", "pass", "credential",
                 "credentials", "auth", "authorization", "apikey", "accesskey", "accesskeyid", "awsaccesskeyid",
                 "session", "sas", "code"}


def is_secret_key(key: object) -> bool:
    """Whether a mapping key or variable name names a secret (whole words, any case)."""
    return isinstance(key, str) and key.lower() not in _NOT_SECRET and _SECRET_KEY.search(key) is not None


def _is_secret_param(name: str) -> bool:
    words = re.split(r"[-_.]", name.lower())
    return any(w in _SECRET_WORDS for w in words) or name.lower().replace("-", "_") in (
        "x_amz_signature", "x_amz_credential", "x_amz_security_token") or is_secret_key(name)


def _secret_params(text: str) -> str:
    return _PARAM.sub(lambda m: f"{m[1]}{m[2]}={REDACTED}" if _is_secret_param(m[2]) else m[0], text)


def redact_url(url: str) -> str:
    """``url`` without its userinfo and with every secret-looking query/fragment parameter's value ``***``.

    Everything else is left byte for byte (no re-encoding), so the result still says where it points.
    Never raises; a string that is not a URL comes back unchanged but for secret parameters.
    """
    return _secret_params(_USERINFO.sub(rf"\g<1>{REDACTED}@", url))


def redact_text(text: str) -> str:
    """Free text (an exception message, a log line, a model card) with the userinfo of every URL in it cut
    out, and the value of every secret-looking ``?name=``/``&name=`` parameter, also where a library quotes
    only a URL's path and query (urllib3 does). Never raises."""
    if "://" in text:
        text = _URL.sub(lambda m: _USERINFO.sub(rf"\g<1>{REDACTED}@", m[0]), text)
    return _secret_params(text) if "=" in text else text


def url_origin(url: str) -> str:
    """``scheme://host[:port]`` of ``url``, nothing else: how to name a URL whose path itself is the secret (a
    Slack or Discord webhook). A string that is no URL comes back through :func:`redact_text`."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*://)(?:[^/?#\s]*@)?([^/?#\s]*)", url)
    return f"{m[1]}{m[2]}" if m else redact_text(url)


def redact_urls(value: Any) -> Any:
    """``value`` (a record: mappings, lists, strings) with :func:`redact_text` applied to every string value.

    Keys are kept as they are, and nothing is masked by key name: a stored record's ``eos_token_id`` is data.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact_urls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_urls(v) for v in value)
    return value


def secret_values() -> list[str]:
    """The values of the environment's credentials (listed variables, and any variable with a secret-looking
    name in any case), longest first; values under 8 characters are left out."""
    values = [os.environ.get(name, "") for name in _SECRET_ENV]
    values += [v for k, v in os.environ.items() if is_secret_key(k)]
    # Short values would blank out ordinary words; real credentials are long.
    return sorted({v for v in values if len(v) >= 8}, key=len, reverse=True)


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """Return ``value`` with secret-named keys masked, known secret values cut out of strings and URLs in
    strings passed through :func:`redact_url`. For log events and anything else shown to people."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "", False) else redact(v, secrets))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    if isinstance(value, str):
        for s in secrets:
            if s in value:
                value = value.replace(s, REDACTED)
        return redact_text(value)
    return value


def printable(text: Any) -> str:
    """``text`` on one line without control characters: what a record or a model wrote must not move the
    terminal's cursor or change its colours (ESC sequences), whoever wrote the record."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
