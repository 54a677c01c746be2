"""Promotion events: a signed JSON POST to every webhook of a registry after each change of a model.

Where the URLs come from: the registry's ``config.json`` (``medft registry webhooks add|list|remove``) and
``$MEDFT_REGISTRY_WEBHOOKS`` (URLs separated by commas or spaces), both. The shared secret comes only from
``$MEDFT_WEBHOOK_SECRET``: it is never written to the store, logged or recorded. Each body is signed with
HMAC-SHA256 of the exact bytes sent, in ``X-Medft-Signature-256: sha256=<hex>`` (as GitHub's
``X-Hub-Signature-256``); ``X-Medft-Event``, ``X-Medft-Delivery`` (the event id) and ``X-Medft-Timestamp``
(unix seconds of the event) come with it.

A delivery runs after the change is written and never undoes or blocks it: each URL gets at most
:data:`ATTEMPTS` tries, ``$MEDFT_WEBHOOK_TIMEOUT`` seconds each (default 2), with 0.5 s then 1 s between
them, all URLs at once, the whole within :data:`DEADLINE_S` seconds. 2xx is delivered; 5xx, 408, 429, a
timeout or a refused connection is tried again; any other answer (4xx, a redirect) is not. The outcome of each
URL (as :func:`label` shows it) is returned for the registry to record in the history entry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from registry.errors import ConfigError, DataError, NotFoundError
from registry.logs import get_logger
from registry.redact import redact_url, url_origin
from registry.store import BucketNotFound, PreconditionFailed, Store

log = get_logger(__name__)

CONFIG = "config.json"
ENV_URLS = "MEDFT_REGISTRY_WEBHOOKS"
ENV_SECRET = "MEDFT_WEBHOOK_SECRET"
ENV_TIMEOUT = "MEDFT_WEBHOOK_TIMEOUT"
SIGNATURE_HEADER = "X-Medft-Signature-256"
ATTEMPTS = 3
BACKOFF_S = (0.5, 1.0)
DEADLINE_S = 9.0
_RETRIED = {408, 429}


def label(url: str) -> str:
    """How a webhook URL is shown, logged and recorded: its origin and a short hash of the whole URL, never
    its path, query or userinfo (a Slack or Discord webhook's path is its secret); ``webhooks remove`` takes
    this form too."""
    return f"{url_origin(url)}/...#{hashlib.sha256(url.strip().encode()).hexdigest()[:8]}"


def check_url(url: str, what: str) -> str:
    """An http(s) URL with a host; ConfigError (exit 2) naming ``what`` otherwise."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: {redact_url(url)!r} is not an http:// or https:// URL with a host")
    return url


def timeout_s() -> float:
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return 2.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 30:
        raise ConfigError(f"{ENV_TIMEOUT}={raw!r} must be a number of seconds from 0.05 to 30 (default 2)")
    return value


# --------------------------------------------------------------------------- the registry's webhook list

def _read_config(store: Store) -> tuple[dict[str, Any], str | None]:
    try:
        data, etag = store.get_bytes(CONFIG)
    except BucketNotFound:
        raise
    except NotFoundError:
        return {"format": 1, "webhooks": []}, None
    try:
        doc = json.loads(data)
        hooks = doc["webhooks"]
        if not isinstance(hooks, list) or not all(isinstance(h, dict) and isinstance(h.get("url"), str) for h in hooks):
            raise ValueError("'webhooks' must be a list of {url, ...} objects")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{store.url(CONFIG)} is corrupt ({e}); fix it by hand or remove it (it holds only the "
                        "registry's webhook URLs)") from None
    return doc, etag


def stored_urls(store: Store) -> list[str]:
    """The webhook URLs in the registry's config.json, in the order added."""
    return [h["url"] for h in _read_config(store)[0]["webhooks"]]


def env_urls() -> list[str]:
    raw = os.environ.get(ENV_URLS, "")
    return [check_url(u, ENV_URLS) for u in re.split(r"[,\s]+", raw) if u.strip()]


def targets(store: Store) -> list[str]:
    """Every URL to notify (config.json's, then $MEDFT_REGISTRY_WEBHOOKS's, each once). Raises ConfigError for a
    bad URL in the variable and DataError for a corrupt config.json, so a change is refused before it is made."""
    out: list[str] = []
    for url in [*stored_urls(store), *env_urls()]:
        if url not in out:
            out.append(url)
    if out:
        timeout_s()
    return out


def change_urls(store: Store, add: str | None = None, remove: str | None = None, by: str | None = None) -> list[str]:
    """Add or remove one URL of config.json with compare-and-swap; returns the URLs after. Removing a URL it does
    not hold is NotFoundError (exit 4)."""
    from registry.runs import now_iso

    for _ in range(50):
        doc, etag = _read_config(store)
        hooks = list(doc["webhooks"])
        if add is not None:
            url = check_url(add, "webhook URL")
            if any(h["url"] == url for h in hooks):
                return [h["url"] for h in hooks]
            hooks.append({"url": url, "added_at": now_iso(), "by": by})
        if remove is not None:
            kept = [h for h in hooks if h["url"] != remove.strip() and label(h["url"]) != remove.strip()]
            if len(kept) == len(hooks):
                raise NotFoundError(f"no webhook {label(remove)!r} in {store.url(CONFIG)} (see `medft registry "
                                    "webhooks list`)")
            hooks = kept
        data = (json.dumps({**doc, "format": 1, "webhooks": hooks}, indent=2) + "\n").encode()
        try:
            if etag is None:
                store.put_bytes(CONFIG, data, if_absent=True)
            else:
                store.put_bytes(CONFIG, data, if_match=etag)
            return [h["url"] for h in hooks]
        except PreconditionFailed:
            time.sleep(0.05)
    raise PreconditionFailed(f"could not update {store.url(CONFIG)}: too many concurrent updates; retry")


# ------------------------------------------------------------------------------------------ delivery

def sign(secret: str, body: bytes) -> str:
    """The ``X-Medft-Signature-256`` value of ``body``: ``sha256=`` and the HMAC-SHA256 hex digest."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirected POST could land anywhere: report the 3xx instead


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post_once(url: str, body: bytes, headers: dict[str, str], timeout: float) -> tuple[int | None, str | None]:
    """(HTTP status, error) of one POST; status None when no answer came. A user and password in the URL go
    as HTTP basic authentication (urllib would take them for part of the host)."""
    parts = urlsplit(url)
    if parts.username is not None:
        token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
        headers = {**headers, "Authorization": f"Basic {token}"}
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, None
    except urllib.error.HTTPError as e:
        return e.code, f"HTTP {e.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None, f"{type(reason).__name__}: {reason}"[:200]


def deliver_one(url: str, body: bytes, headers: dict[str, str], *, timeout: float, deadline: float) -> dict[str, Any]:
    """POST ``body`` to ``url`` with retries (see the module docstring); the outcome, URL redacted."""
    status, error, attempts = None, None, 0
    for attempt in range(ATTEMPTS):
        left = deadline - time.monotonic()
        if left <= 0.05:
            error = (error or "") + " (out of time)"
            break
        attempts += 1
        status, error = _post_once(url, body, headers, min(timeout, left))
        if status is not None and 200 <= status < 300:
            break
        if status is not None and status < 500 and status not in _RETRIED:
            break  # the receiver refused it; sending it again changes nothing
        if attempt < ATTEMPTS - 1:
            time.sleep(min(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)], max(0.0, deadline - time.monotonic())))
    ok = status is not None and 200 <= status < 300
    return {"url": label(url), "ok": ok, "status": status, "attempts": attempts,
            **({} if ok else {"error": error or f"HTTP {status}"})}


def deliver(urls: list[str], events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Send every event to every URL, all at once within one deadline; per event, the outcome at each URL, in
    order. Never raises for a receiver's failure."""
    if not urls or not events:
        return [[] for _ in events]
    secret = os.environ.get(ENV_SECRET)
    if not secret:
        log.warning("webhook.unsigned", hint=f"set {ENV_SECRET} so receivers can verify events")
    jobs = []
    for ev in events:
        body = json.dumps(ev, sort_keys=True, default=str).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "medft-registry",
                   "X-Medft-Event": str(ev.get("type")), "X-Medft-Delivery": str(ev.get("id")),
                   "X-Medft-Timestamp": str(int(ev.get("timestamp") or time.time()))}
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, body)
        jobs += [(url, body, headers, ev) for url in urls]
    timeout, deadline = timeout_s(), time.monotonic() + DEADLINE_S

    def one(job: tuple[str, bytes, dict[str, str], dict[str, Any]]) -> dict[str, Any]:
        url, body, headers, ev = job
        outcome = deliver_one(url, body, headers, timeout=timeout, deadline=deadline)
        (log.info if outcome["ok"] else log.warning)("webhook.delivered" if outcome["ok"] else "webhook.failed",
                                                     event_type=ev.get("type"), event_id=ev.get("id"), **outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as ex:
        outcomes = list(ex.map(one, jobs))
    return [outcomes[i * len(urls):(i + 1) * len(urls)] for i in range(len(events))]
