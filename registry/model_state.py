"""A model's state document, ``models/<name>/aliases.json``, and its change history.

One JSON object holds everything about a model that changes after registration and must change atomically
with its record of the change::

    aliases          {alias: version}
    protected        {alias: [benchmark, ...]}  aliases only a version passing the gate on these may take
    archived         [version, ...]            hidden from ``registry list`` unless --all; no alias may point at one
    deleted          [version, ...]            records removed by ``registry delete``; their numbers are never reused
    gate_overrides   [{...}]                   moves forced past the gate (kept for readers of older medft)
    history          [entry, ...]              every change, oldest first (the newest HISTORY_KEPT at most)
    history_seq      the seq of the newest entry
    history_paged    how many of the oldest entries were moved out to history pages

The registry rewrites the whole document with compare-and-swap (``Registry._cas_state``), so an alias move
and its history entry are one write: a crash leaves both or neither.

The history stays bounded in what every alias change reads and writes: when the document holds more than
:data:`HISTORY_KEPT` entries, the oldest :data:`HISTORY_PAGE` are first written, create-only, to a page
``models/<name>/history/<first position>.json`` and then dropped from the document in the swap. A crash
between the two leaves a page whose entries the document still holds; readers skip an entry already seen (by
``seq``). Only ``registry history`` and a ``show --at`` older than the document's oldest entry read pages.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from registry.errors import ConfigError, DataError, NotFoundError
from registry.store import BucketNotFound, PreconditionFailed, Store

FORMAT = 1
HISTORY_KEPT = 400
HISTORY_PAGE = 200
#: Entry actions: alias changes, the gate refusing a training job's move, protection, and version lifecycle.
ALIAS_ACTIONS = ("set", "move", "delete")
ACTIONS = (*ALIAS_ACTIONS, "refused", "protect", "unprotect", "register", "archive", "unarchive", "delete-version")


@dataclass(frozen=True)
class HistoryEntry:
    """One change of a model, as appended to its history."""

    seq: int
    """Position in the model's history, from 1; never reused."""
    at: str
    """UTC time of the write (ISO 8601)."""
    action: str
    """One of :data:`ACTIONS`."""
    by: str | None = None
    """Who made it, as the operating system names them."""
    alias: str | None = None
    before: int | None = None
    """The version the alias pointed at before (None: it did not exist)."""
    after: int | None = None
    """The version it points at after (None: deleted); for version actions, the version."""
    gate: dict[str, Any] | None = None
    """``{"require": [...], "verdict": "passed" | "refused" | "forced", "refusal": str | None}`` when gated."""
    reason: str | None = None
    """Why: the ``--reason`` of a forced move, or what moved it (``output.aliases of run R``)."""
    via: str | None = None
    """``cli``, ``register`` or ``job <run id>``."""
    deliveries: list[dict[str, Any]] | None = None
    """Webhook outcomes, filled in after the change (see :mod:`registry.webhooks`)."""

    def to_dict(self) -> dict[str, Any]:
        """Fields that are set; ``before`` and ``after`` always (null: no version)."""
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("before", "after")}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> HistoryEntry:
        """Checked: DataError (exit 3) naming ``where`` and the field."""
        def bad(why: str) -> DataError:
            return DataError(f"{where} is corrupt ({why}); fix or remove that entry by hand")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        if not isinstance(d.get("seq"), int) or isinstance(d["seq"], bool) or d["seq"] < 1:
            raise bad("'seq' must be a positive integer")
        if d.get("action") not in ACTIONS:
            raise bad(f"'action' must be one of {', '.join(ACTIONS)}, got {d.get('action')!r}")
        try:
            parse_time(d.get("at"), "at")
        except ConfigError:
            raise bad(f"'at' must be an ISO 8601 time, got {d.get('at')!r}") from None
        for name in ("before", "after"):
            v = d.get(name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise bad(f"'{name}' must be a version number or null, got {v!r}")
        for name in ("by", "alias", "reason", "via"):
            if d.get(name) is not None and not isinstance(d[name], str):
                raise bad(f"'{name}' must be a string")
        gate = d.get("gate")
        if gate is not None and not isinstance(gate, dict):
            raise bad("'gate' must be an object")
        require = (gate or {}).get("require")
        if require is not None and (not isinstance(require, list) or not all(isinstance(x, str) for x in require)):
            raise bad("'gate.require' must be a list of benchmark names")
        for name in ("verdict", "refusal"):
            if (gate or {}).get(name) is not None and not isinstance(gate[name], str):
                raise bad(f"'gate.{name}' must be a string")
        deliveries = d.get("deliveries")
        if deliveries is not None and (not isinstance(deliveries, list) or not all(isinstance(x, dict) for x in deliveries)):
            raise bad("'deliveries' must be a list of objects")
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})


def current_user() -> str | None:
    """Who is running this (who moved an alias, who recorded an evaluation), as the operating system names
    them (best effort)."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


def parse_time(text: Any, what: str) -> datetime:
    """An ISO 8601 time (``2026-12-06T10:00:00Z``, a date, or without a zone: UTC) as an aware datetime.

    Raises ConfigError (exit 2) naming ``what`` when it is not one.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what}: expected an ISO 8601 time such as 2026-12-06T10:00:00Z, got {text!r}")
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not an ISO 8601 time; use e.g. 2026-12-06T10:00:00Z "
                          "(UTC when no zone is given)") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _version_list(doc: dict[str, Any], key: str) -> list[int]:
    value = doc.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"'{key}' must be a list of version numbers")
    return sorted(set(value))


@dataclass
class ModelState:
    """``aliases.json`` read (see the module docstring); ``etag`` None when there is none yet."""

    name: str
    aliases: dict[str, int] = field(default_factory=dict)
    protected: dict[str, list[str]] = field(default_factory=dict)
    archived: list[int] = field(default_factory=list)
    deleted: list[int] = field(default_factory=list)
    gate_overrides: list[dict[str, Any]] = field(default_factory=list)
    history: list[Any] = field(default_factory=list)
    """Entries as stored (checked only when read: :meth:`entries`), so one bad entry never blocks a move."""
    history_seq: int = 0
    history_paged: int = 0
    etag: str | None = None
    where: str = ""

    @classmethod
    def parse(cls, name: str, data: bytes, etag: str | None, where: str) -> ModelState:
        """Raises DataError (exit 3) naming ``where`` when the document is not one."""
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            aliases = doc["aliases"]
            if not isinstance(aliases, dict) or not all(isinstance(v, int) for v in aliases.values()):
                raise ValueError("'aliases' must map alias -> integer version")
            overrides = doc.get("gate_overrides") or []
            if not isinstance(overrides, list) or not all(isinstance(o, dict) for o in overrides):
                raise ValueError("'gate_overrides' must be a list of objects")
            protected = doc.get("protected") or {}
            if not isinstance(protected, dict) or not all(
                    isinstance(v, list) and v and all(isinstance(b, str) for b in v) for v in protected.values()):
                raise ValueError("'protected' must map alias -> list of benchmark names")
            history = doc.get("history") or []
            if not isinstance(history, list):
                raise ValueError("'history' must be a list")
            counters = [doc.get("history_seq") or 0, doc.get("history_paged") or 0]
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counters):
                raise ValueError("'history_seq' and 'history_paged' must be counts")
            return cls(name=name, aliases=dict(aliases), protected={k: list(v) for k, v in protected.items()},
                       archived=_version_list(doc, "archived"), deleted=_version_list(doc, "deleted"),
                       gate_overrides=list(overrides), history=list(history), history_seq=counters[0],
                       history_paged=counters[1], etag=etag, where=where)
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where} is corrupt ({e}); fix it by hand (deleting it drops every alias of {name}, its "
                            "protected aliases, archive marks and change history)") from None

    def to_bytes(self, now: str) -> bytes:
        doc: dict[str, Any] = {"format": FORMAT, "name": self.name, "aliases": dict(sorted(self.aliases.items())),
                               "updated_at": now}
        if self.protected:
            doc["protected"] = dict(sorted(self.protected.items()))
        if self.archived:
            doc["archived"] = sorted(set(self.archived))
        if self.deleted:
            doc["deleted"] = sorted(set(self.deleted))
        if self.gate_overrides:
            doc["gate_overrides"] = self.gate_overrides
        if self.history or self.history_seq:
            doc.update(history=self.history, history_seq=self.history_seq, history_paged=self.history_paged)
        return (json.dumps(doc, indent=2) + "\n").encode()

    def append(self, entries: list[dict[str, Any]], now: str, by: str | None) -> list[HistoryEntry]:
        """Number ``entries`` (dicts of :class:`HistoryEntry` fields but seq and at) and add them."""
        out = []
        for e in entries:
            self.history_seq += 1
            entry = HistoryEntry(**{"by": by, **e, "seq": self.history_seq, "at": now})
            self.history.append(entry.to_dict())
            out.append(entry)
        return out

    def entry_where(self, position: int) -> str:
        """How a message names the history entry at ``position`` (0-based) of this document."""
        raw = self.history[position]
        seq = raw.get("seq") if isinstance(raw, dict) else None
        return f"{self.where}: history entry {self.history_paged + position + 1}" + (f" (seq {seq})" if seq else "")

    def entries(self) -> list[HistoryEntry]:
        """The document's own entries, oldest first; DataError (exit 3) naming the first corrupt one."""
        return [HistoryEntry.from_dict(raw, self.entry_where(i)) for i, raw in enumerate(self.history)]


def page_key(name: str, first: int) -> str:
    return f"models/{name}/history/{first:09d}.json"


def move_old_entries(store: Store, state: ModelState) -> None:
    """When ``state`` holds more than HISTORY_KEPT entries, write the oldest HISTORY_PAGE to a page (create-only;
    one already there from an earlier attempt holds the same entries) and drop them from ``state``."""
    if len(state.history) <= HISTORY_KEPT:
        return
    first = state.history_paged + 1
    page = {"format": FORMAT, "name": state.name, "first": first, "entries": state.history[:HISTORY_PAGE]}
    try:
        store.put_bytes(page_key(state.name, first), (json.dumps(page, indent=1) + "\n").encode(), if_absent=True)
    except PreconditionFailed:
        pass  # written by an attempt whose swap lost; its entries at these positions are the same
    state.history = state.history[HISTORY_PAGE:]
    state.history_paged += HISTORY_PAGE


def paged_entries(store: Store, state: ModelState) -> list[HistoryEntry]:
    """Every entry moved out to pages, oldest first; DataError (exit 3) naming a corrupt page or entry."""
    out: list[HistoryEntry] = []
    first = 1
    while first <= state.history_paged:
        key = page_key(state.name, first)
        where = store.url(key)
        try:
            data, _ = store.get_bytes(key)
        except BucketNotFound:
            raise
        except NotFoundError:
            raise DataError(f"{where} is missing: {state.where} says {state.history_paged} history entries were "
                            "moved to pages") from None
        try:
            page = json.loads(data)
            entries = page["entries"]
            if not isinstance(entries, list) or not entries:
                raise ValueError("'entries' must be a non-empty list")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{where} is corrupt ({e}); fix it by hand") from None
        out += [HistoryEntry.from_dict(raw, f"{where}: history entry {first + i}") for i, raw in enumerate(entries)]
        first += len(entries)
    return out


def full_history(store: Store, state: ModelState) -> list[HistoryEntry]:
    """Pages, then the document's entries, oldest first, each ``seq`` once."""
    seen: set[int] = set()
    out = []
    for entry in [*paged_entries(store, state), *state.entries()]:
        if entry.seq not in seen:
            seen.add(entry.seq)
            out.append(entry)
    return out


def holder_at(entries: list[HistoryEntry], alias: str, when: datetime) -> tuple[int | None, HistoryEntry | None]:
    """(version ``alias`` pointed at, at ``when``; the entry that put it there), from ``entries`` oldest first;
    (None, None) when no entry of the alias is that old."""
    holder: tuple[int | None, HistoryEntry | None] = (None, None)
    for entry in entries:
        if entry.alias == alias and entry.action in ALIAS_ACTIONS and parse_time(entry.at, "at") <= when:
            holder = (entry.after, entry)
    return holder
