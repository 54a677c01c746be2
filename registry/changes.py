"""The changes of a model after registration: its aliases (through the benchmark gate), their protection,
archive marks, deleted versions and the history of all of it, each one compare-and-swap of the model's state
document (:mod:`registry.model_state`), followed by its promotion events (:mod:`registry.webhooks`).

:class:`ModelChanges` is a part of :class:`registry.registry.Registry` (its base class), kept apart so each
module stays readable; it uses the registry's store, keys and reads (``state``, ``get``, ``_versions``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from registry import webhooks
from registry.compare import required_benchmarks
from registry.errors import ConfigError, ConflictError, MedftError, NotFoundError
from registry.logs import get_logger
from registry.model_state import (
    HistoryEntry,
    ModelState,
    current_user,
    full_history,
    holder_at,
    move_old_entries,
    parse_time,
)
from registry.names import check_alias, check_name
from registry.promotion import event, gated_move, refuse_while_aliased
from registry.runs import now_iso
from registry.store import PreconditionFailed

if TYPE_CHECKING:
    from registry.store import Store
    from registry.versions import ModelVersion

log = get_logger(__name__)
CAS_ATTEMPTS = 200


def jitter(attempt: int) -> None:
    time.sleep(random.uniform(0, min(0.5, 0.005 * 2 ** min(attempt, 10))))


class ModelChanges:
    """Alias moves, protection, archive and delete, and the history (see the module docstring)."""

    store: Store
    uri: str
    state: Callable[[str], ModelState]
    get: Callable[[str], ModelVersion]
    _versions: Callable[[str], list[int]]
    _version_key: Callable[[str, int], str]
    _aliases_key: Callable[[str], str]

    # the model's state: aliases, protection, archive marks, history (one compare-and-swap each) -------------
    def _cas_state(self, name: str, change: Callable[[ModelState], list[dict[str, Any]] | None]
                   ) -> tuple[ModelState, list[HistoryEntry]]:
        """Apply ``change`` to the model's state and write it with compare-and-swap, re-reading and re-applying
        it when a concurrent update won. ``change`` edits the state in place and returns the history entries of
        what it did (written in the same swap), or None when there is nothing to write. Returns the state as
        written and the entries, numbered."""
        key = self._aliases_key(name)
        for attempt in range(CAS_ATTEMPTS):
            state = self.state(name)
            etag = state.etag
            entries = change(state)
            if entries is None:
                return state, []
            now = now_iso()
            added = state.append(entries, now, current_user())
            move_old_entries(self.store, state)
            try:
                if etag is None:
                    self.store.put_bytes(key, state.to_bytes(now), if_absent=True)
                else:
                    self.store.put_bytes(key, state.to_bytes(now), if_match=etag)
                return state, added
            except PreconditionFailed:
                jitter(attempt)  # a concurrent update won: re-read and apply ours on top of it
        raise ConflictError(f"could not update aliases of {name}: {CAS_ATTEMPTS} concurrent updates won; retry")

    def _change(self, name: str, change: Callable[[ModelState], list[dict[str, Any]] | None]) -> list[HistoryEntry]:
        """:meth:`_cas_state`, then the promotion events of its entries (:meth:`_announce`); the webhook list is
        read first, so a bad one refuses the change before it is made."""
        hooks = webhooks.targets(self.store)
        _, entries = self._cas_state(name, change)
        self._announce(name, entries, hooks)
        return entries

    def _announce(self, name: str, entries: list[HistoryEntry], hooks: list[str]) -> None:
        """Send ``entries`` to ``hooks`` and record each one's outcomes in its history entry (``deliveries``).
        The change is made already: a receiver that is down, or a failure to record its outcome, is logged only."""
        if not hooks or not entries:
            return
        outcomes = dict(zip((e.seq for e in entries),
                            webhooks.deliver(hooks, [event(self, name, e) for e in entries]), strict=True))

        def change(state: ModelState) -> list[dict[str, Any]]:
            # An entry moved to a page in the seconds since (HISTORY_KEPT changes later) keeps no outcome; the
            # outcomes were logged by webhooks.deliver all the same.
            for raw in state.history:
                if isinstance(raw, dict) and raw.get("seq") in outcomes:
                    raw["deliveries"] = outcomes[raw["seq"]]
            return []

        try:
            self._cas_state(name, change)
        except MedftError as e:
            log.warning("webhook.outcome_not_recorded", model=name, error=e.message)

    def set_alias(self, name: str, version: int, alias: str, *, require: Sequence[str] = (), force: bool = False,
                  reason: str | None = None, via: str = "cli") -> ModelVersion:
        """Point ``name@alias`` at ``version`` (compare-and-swap, retried on a concurrent update), recorded in
        the model's history in the same write.

        The gate (:func:`registry.compare.gate_refusal`) runs on ``require`` plus the benchmarks the alias is
        protected with (:meth:`protect`): refused with ConfigError (exit 2, nothing written) when ``version``
        has no score on one, or scores lower than the version the alias points at when the swap is made
        (checked again on every attempt, so a concurrent move is gated too). ``force`` moves it anyway and
        records the override, the refusal and ``reason`` (required) in the same write. ConfigError too for an
        archived version, ``force`` without a reason or without any gate; NotFoundError for a missing version.
        """
        check_name(name)
        check_alias(alias)
        version = int(version)
        require = required_benchmarks(require)
        if force and not (reason or "").strip():
            raise ConfigError("--force needs --reason TEXT: a move forced past the gate is recorded with why")
        if version < 1 or not self.store.exists(self._version_key(name, version)):
            raise NotFoundError(f"model version {name}:{version} not found in registry {self.uri}")

        def change(state: ModelState) -> list[dict[str, Any]] | None:
            entry, refusal = gated_move(self, state, name, version, alias, require, force=force, reason=reason, via=via)
            if refusal is not None and not force:
                raise ConfigError(f"refused to move {name}@{alias}: {refusal}; or pass --force --reason TEXT to move "
                                  "it anyway; nothing changed")
            return None if entry is None else [entry]

        self._change(name, change)
        return self.get(f"{name}:{version}")

    def delete_alias(self, name: str, alias: str, *, version: int | None = None, reason: str | None = None,
                     via: str = "cli") -> int:
        """Remove ``name@alias`` (only while it points at ``version``, when given), recorded in the history;
        returns the version it pointed at. NotFoundError when there is no such alias, ConfigError when it points
        elsewhere (nothing changed)."""
        check_name(name)
        check_name(alias, "alias")
        was: list[int] = []

        def change(state: ModelState) -> list[dict[str, Any]]:
            if alias not in state.aliases:
                raise NotFoundError(f"model ref '{name}@{alias}' not found: no such alias in registry {self.uri}")
            if version is not None and state.aliases[alias] != version:
                raise ConfigError(f"{name}@{alias} points at version {state.aliases[alias]}, not {version}; "
                                  "nothing deleted")
            was[:] = [state.aliases.pop(alias)]
            return [{"action": "delete", "alias": alias, "before": was[0], "after": None, "reason": reason, "via": via}]

        self._change(name, change)
        return was[0]

    def protect(self, name: str, alias: str, require: Sequence[str], *, reason: str | None = None) -> tuple[str, ...]:
        """Protect ``name@alias``: from now on every move of it, whoever makes it (``registry alias``, a training
        job's ``output.aliases``, ``register --alias``), must pass the gate on ``require`` against the version
        it points at. Replaces an earlier protection of it; recorded in the history. ConfigError (exit 2) for
        no or an unknown benchmark."""
        check_name(name)
        check_alias(alias)
        names = required_benchmarks(require)
        if not names:
            raise ConfigError("protect needs --require BENCHMARK (medqa, medmcqa, pubmedqa): the benchmarks a "
                              "version must pass to take the alias")
        if not self._versions(name):
            raise NotFoundError(f"no model named {name!r} in registry {self.uri}")

        def change(state: ModelState) -> list[dict[str, Any]] | None:
            if state.protected.get(alias) == list(names):
                return None
            state.protected[alias] = list(names)
            return [{"action": "protect", "alias": alias, "gate": {"require": list(names)}, "reason": reason,
                     "via": "cli"}]

        self._cas_state(name, change)
        return names

    def unprotect(self, name: str, alias: str, *, reason: str | None = None) -> None:
        """Lift :meth:`protect`; NotFoundError when the alias is not protected."""
        check_name(name)

        def change(state: ModelState) -> list[dict[str, Any]]:
            if alias not in state.protected:
                raise NotFoundError(f"{name}@{alias} is not protected in registry {self.uri}")
            was = state.protected.pop(alias)
            return [{"action": "unprotect", "alias": alias, "gate": {"require": was}, "reason": reason, "via": "cli"}]

        self._cas_state(name, change)

    def archive(self, name: str, version: int, *, archived: bool = True, reason: str | None = None) -> bool:
        """Mark ``name:version`` archived (hidden from ``registry list`` unless ``--all``; no alias may point at
        it) or, with ``archived=False``, not; recorded in the history. Returns whether anything changed.
        ConfigError (exit 2) while an alias points at it, NotFoundError when there is no such version."""
        self._check_version(name, version)

        def change(state: ModelState) -> list[dict[str, Any]] | None:
            if (version in state.archived) == archived:
                return None
            if archived:
                refuse_while_aliased(state, name, version, "archive")
                state.archived.append(version)
            else:
                state.archived.remove(version)
            return [{"action": "archive" if archived else "unarchive", "after": version, "reason": reason,
                     "via": "cli"}]

        return bool(self._change(name, change))

    def delete_version(self, name: str, version: int, *, reason: str | None = None) -> None:
        """Delete the record of ``name:version`` (not the run's published files, which stay where its run_uri
        says): first recorded in the history with its number marked deleted (never reused), then the record is
        removed. ConfigError (exit 2, nothing changed) while an alias points at it; NotFoundError when there is
        no such version. A delete cut short between the two steps finishes when run again."""
        key = self._version_key(check_name(name), int(version))
        if not self.store.exists(key):
            raise NotFoundError(f"model version {name}:{version} not found in registry {self.uri}")

        def change(state: ModelState) -> list[dict[str, Any]] | None:
            if version in state.deleted:
                return None  # recorded by a delete cut short before removing the record
            refuse_while_aliased(state, name, version, "delete")
            state.deleted.append(version)
            if version in state.archived:
                state.archived.remove(version)
            return [{"action": "delete-version", "after": version, "reason": reason, "via": "cli"}]

        self._change(name, change)
        self.store.delete(key)

    def _check_version(self, name: str, version: int) -> None:
        if int(version) < 1 or not self.store.exists(self._version_key(check_name(name), int(version))):
            raise NotFoundError(f"model version {name}:{version} not found in registry {self.uri}")
        if int(version) in self.state(name).deleted:
            raise NotFoundError(f"model version {name}:{version} was deleted from registry {self.uri}")

    def history(self, name: str, alias: str | None = None) -> list[HistoryEntry]:
        """The model's history (of ``alias`` only, when given), newest first, pages included. DataError (exit 3)
        naming the first corrupt entry; NotFoundError when the model does not exist."""
        state = self.state(check_name(name))
        if state.etag is None and not self._versions(name):
            raise NotFoundError(f"no model named {name!r} in registry {self.uri}")
        entries = full_history(self.store, state)
        return [e for e in reversed(entries) if alias is None or e.alias == alias]

    def holder_at(self, name: str, alias: str, when: str) -> tuple[int, HistoryEntry]:
        """The version ``name@alias`` pointed at, at the ISO time ``when``, and the history entry that put it there.

        Reads history pages only when ``when`` is older than the oldest entry ``aliases.json`` holds. ConfigError
        (exit 2) for a bad time, NotFoundError (exit 4) when the alias pointed at no version then, DataError
        (exit 3) for a corrupt entry.
        """
        moment = parse_time(when, "--at")
        state = self.state(check_name(name))
        entries = state.entries()
        if state.history_paged and (not entries or parse_time(entries[0].at, "at") > moment):
            entries = full_history(self.store, state)
        version, entry = holder_at(entries, alias, moment)
        if version is None or entry is None:
            first = next((e for e in entries if e.alias == alias and e.action in ("set", "move", "delete")), None)
            since = f" (its first recorded change is at {first.at})" if first else " (no change of it is recorded)"
            raise NotFoundError(f"{name}@{alias} pointed at no version at {moment.isoformat()}{since}")
        return version, entry

