"""What an alias move must pass, and the event a change of a model sends (see :mod:`registry.webhooks`).

:func:`gated_move` applies one alias move to a model's state (:class:`~registry.model_state.ModelState`)
through the benchmark gate: the ``--require`` benchmarks of the move (:func:`alias_gates`) plus those the
alias is protected with, judged against the version the alias points at (:func:`holder_refusal`, which
:mod:`registry.precheck` runs too, before a job's run is registered). :func:`event` is the JSON body a
history entry is announced with.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from registry.compare import Contender, benchmark_scores, gate_refusal, required_benchmarks
from registry.errors import ConfigError, MedftError, NotFoundError
from registry.logs import get_logger
from registry.model_state import HistoryEntry, ModelState, current_user, parse_time
from registry.runs import now_iso

if TYPE_CHECKING:  # registry.registry imports this module
    from registry.registry import Registry
    from registry.versions import ModelVersion

log = get_logger(__name__)

EVENT_TYPES = {"set": "alias.set", "move": "alias.moved", "delete": "alias.deleted", "refused": "alias.refused",
               "register": "version.registered", "archive": "version.archived", "unarchive": "version.unarchived",
               "delete-version": "version.deleted", "protect": "alias.protected", "unprotect": "alias.unprotected"}


def refuse_while_aliased(state: ModelState, name: str, version: int, what: str) -> None:
    """ConfigError (exit 2) naming the aliases that point at ``name:version``, if any."""
    held = sorted(a for a, v in state.aliases.items() if v == version)
    if held:
        raise ConfigError(f"refused to {what} {name}:{version}: {', '.join(f'@{a}' for a in held)} "
                          f"point{'s' if len(held) == 1 else ''} at it; move or delete "
                          f"{'that alias' if len(held) == 1 else 'those aliases'} first; nothing changed")


def alias_gates(state: ModelState, alias: str, require: Sequence[str] = ()) -> tuple[str, ...]:
    """The benchmarks moving ``alias`` must pass: ``require`` plus those ``state`` protects it with (none: no
    gate). ConfigError (exit 2) for an empty or unknown name (:func:`~registry.compare.required_benchmarks`)."""
    return required_benchmarks([*require, *state.protected.get(alias, [])])


def holder_refusal(reg: Registry, state: ModelState, name: str, alias: str, candidate: ModelVersion | Contender,
                   gates: Sequence[str]) -> str | None:
    """The gate's refusal of pointing ``alias`` at ``candidate`` under ``gates`` (None: it may move), judged
    against the version the alias points at in ``state``, whose record is read now (an evaluation may have
    been appended). Raises what :func:`~registry.compare.gate_refusal` raises, and NotFoundError when that
    version cannot be read."""
    previous = state.aliases.get(alias)
    current = reg.get(f"{name}:{previous}") if previous is not None else None
    return gate_refusal(candidate, current, gates, alias, reg.uri)


def gated_move(reg: Registry, state: ModelState, name: str, version: int, alias: str, require: Sequence[str], *,
               force: bool, reason: str | None, via: str) -> tuple[dict[str, Any] | None, str | None]:
    """Point ``alias`` at ``version`` in ``state`` if the gate lets it: (history entry, the gate's refusal).

    The gate runs on ``require`` plus the alias's protection, against the version the alias points at in
    ``state`` (both records read now: an evaluation may have been appended). Refused and not ``force``: the
    state is unchanged and the entry is a ``refused`` one, for the caller to raise or record. Forced: the move
    is made and the override recorded in ``gate_overrides`` too. (None, None) when the alias already points
    there. NotFoundError for a deleted version, ConfigError for an archived one or ``force`` with no gate.
    """
    if version in state.deleted:
        raise NotFoundError(f"model version {name}:{version} was deleted from registry {reg.uri}")
    if version in state.archived:
        raise ConfigError(f"{name}:{version} is archived; `medft registry unarchive {name} {version}` before pointing "
                          f"@{alias} at it; nothing changed")
    gates = alias_gates(state, alias, require)
    if force and not gates:
        raise ConfigError(f"--force overrides a gate refusal, and moving {name}@{alias} has no gate: give "
                          "--require BENCHMARK (or protect the alias with `medft registry protect`)")
    previous = state.aliases.get(alias)
    if previous == version:
        return None, None
    gate, refusal = None, None
    if gates:
        refusal = holder_refusal(reg, state, name, alias, reg.get(f"{name}:{version}"), gates)
        gate = {"require": list(gates), "verdict": "passed" if refusal is None else "forced" if force else "refused",
                "refusal": refusal, "protected": list(state.protected.get(alias, []))}
    if refusal is not None and not force:
        return {"action": "refused", "alias": alias, "before": previous, "after": previous, "gate": gate,
                "reason": reason, "via": via}, refusal
    if refusal is not None:
        state.gate_overrides.append({"alias": alias, "version": version, "previous": previous, "require": list(gates),
                                     "refusal": refusal, "reason": reason, "at": now_iso(), "by": current_user()})
    state.aliases[alias] = version
    return {"action": "set" if previous is None else "move", "alias": alias, "before": previous, "after": version,
            "gate": gate, "reason": reason, "via": via}, refusal


def event(reg: Registry, name: str, entry: HistoryEntry) -> dict[str, Any]:
    """The JSON body announcing ``entry`` (README "Promotion events" lists its fields). The version's run,
    artifacts and scores are read now; a version that cannot be read gives none (logged)."""
    number = entry.after if entry.after is not None else entry.before
    body: dict[str, Any] = {
        "id": uuid.uuid4().hex, "type": EVENT_TYPES[entry.action], "time": entry.at,
        "timestamp": int(parse_time(entry.at, "at").timestamp()), "registry": reg.uri, "model": name,
        "version": number, "alias": entry.alias, "before": entry.before, "after": entry.after, "by": entry.by,
        "via": entry.via, "reason": entry.reason, "gate": entry.gate, "seq": entry.seq,
        "run_id": None, "run_uri": None, "artifacts": {}, "scores": {},
    }
    if number is not None:
        try:
            mv = reg.get(f"{name}:{number}")
            body.update(run_id=mv.run_id, run_uri=mv.run_uri,
                        artifacts={art: spec["uri"] for art, spec in sorted(mv.artifacts.items())},
                        scores={b: s.model_dump(mode="json", exclude_none=True)
                                for b, s in sorted(benchmark_scores(mv).items())})
        except MedftError as e:
            log.warning("webhook.version_unreadable", ref=f"{name}:{number}", error=e.message)
    return body
