"""What registering a job's run is expected to do with its ``output.aliases``, judged before it is published.

A training job writes its model cards before it publishes and registers, so the card can only say what the
gate is expected to decide: :func:`expected_aliases` runs the gate registration runs
(:func:`registry.promotion.alias_gates` and :func:`~registry.promotion.holder_refusal`) on the run's scores
after training, against the versions the aliases point at now. Registration runs it again; when another change
moved an alias in between, what registration printed and recorded (``alias_refusals``) is what happened.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from registry.compare import Contender
from registry.errors import MedftError
from registry.logs import get_logger
from registry.promotion import alias_gates, holder_refusal
from registry.records import RunMetrics
from registry.registry import Registry

log = get_logger(__name__)

#: Stands for the run's version number in a refusal judged before registration gives it one (``NAME:VERSION``).
UNNUMBERED = "VERSION"


@dataclass(frozen=True)
class AliasOutlook:
    """One alias of ``output.aliases`` as judged before registration: the version it points at now (None:
    unset), the benchmarks protecting it (empty: no gate), and either the gate's refusal (it is expected to
    stay at ``holder``) or why the gate could not be judged (``unchecked``); neither: expected to move."""

    alias: str
    holder: int | None
    require: tuple[str, ...] = ()
    refusal: str | None = None
    unchecked: str | None = None

    @property
    def moves(self) -> bool:
        """Whether registration is expected to point the alias at the run's version."""
        return self.refusal is None and self.unchecked is None


def expected_aliases(registry_uri: str, name: str, aliases: Sequence[str], metrics: RunMetrics) -> list[AliasOutlook]:
    """Each of ``aliases`` (in order) as registering a run scored ``metrics`` as the next version of ``name``
    in ``registry_uri`` is expected to leave it.

    The run is the gate's candidate as it computed its scores (:meth:`Contender.unpublished`), named
    ``NAME:VERSION`` (:data:`UNNUMBERED`) since registration gives it its number. Never raises a MedftError: the
    card is advice, and a registry that cannot be read now (or a holder whose scores fail their answers files)
    must not fail a job that has trained; each such alias says why in ``unchecked`` (and is logged), and
    registration, which runs the gate again, fails or decides then.
    """
    if not aliases:
        return []  # nothing to judge: the registry is not read
    try:
        reg = Registry.open(registry_uri)
        state = reg.state(name)
    except MedftError as e:
        log.warning("precheck.unreadable", registry=registry_uri, model=name, error=e.message)
        return [AliasOutlook(alias, None, unchecked=e.message) for alias in aliases]
    candidate = Contender.unpublished(f"{name}:{UNNUMBERED}", metrics)
    out = []
    for alias in aliases:
        holder = state.aliases.get(alias)
        gates: tuple[str, ...] = ()
        try:
            gates = alias_gates(state, alias)
            refusal = holder_refusal(reg, state, name, alias, candidate, gates) if gates else None
        except MedftError as e:
            log.warning("precheck.unchecked", model=name, alias=alias, error=e.message)
            out.append(AliasOutlook(alias, holder, gates, unchecked=e.message))
            continue
        out.append(AliasOutlook(alias, holder, gates, refusal=refusal))
    return out
