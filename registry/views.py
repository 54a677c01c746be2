"""What ``registry list`` and ``registry show`` print for a person: rounded figures in short sections, a table
that fits 100 columns. ``--json`` prints the records themselves, every digit kept; nothing here is parsed back.

Also the "does it exist" answers both commands give: a store or registry folder that is not there, and a model
name the registry does not hold, are :class:`NotFoundError` (exit 4) rather than an empty listing.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from registry.compare import answers_files, format_score, text_table
from registry.errors import NotFoundError
from registry.records import dump
from registry.redact import printable
from registry.registry import Registry
from registry.store import LocalStore, Store
from registry.versions import ModelVersion

#: ``registry list`` stays within this many columns unless ``--wide``.
TABLE_COLUMNS = 100
_ANSWER_CHARS = 240  # of each before/after answer in `show`; the model card has them whole


def missing_store(store: Store, reg: Registry, registry_given: bool) -> str | None:
    """Why nothing can be there, when a local store (or ``--registry`` folder) does not exist: a typo in
    ``--store`` must not read as an empty registry. None when it exists (a store that holds no registry yet is
    empty, not missing). An S3 bucket that does not exist is refused by the store on the first request."""
    target = reg.store if registry_given else store
    if isinstance(target, LocalStore) and not Path(target.uri).is_dir():
        what = "registry" if registry_given else "store"
        return f"{what} {target.uri} does not exist; check --{what} (or MEDFT_{what.upper()})"
    return None


def unknown_name(reg: Registry, name: str) -> NotFoundError:
    """The error for ``--name NAME`` that the registry does not hold, naming the nearest and the known ones."""
    known = reg.names()
    if not known:
        return NotFoundError(f"no model named {name!r} in registry {reg.uri}: it holds no models yet")
    near = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean {near[0]}? " if near else ""
    shown = ", ".join(known[:10]) + (f" and {len(known) - 10} more" if len(known) > 10 else "")
    return NotFoundError(f"no model named {name!r} in registry {reg.uri}; {hint}it holds {shown}")


def _loss(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _when(stamp: str, *, seconds: bool = False) -> str:
    """``2026-12-06T03:54:47.323Z`` as ``2026-12-06 03:54`` (or with seconds), in UTC as recorded."""
    text = stamp.replace("T", " ")[:19 if seconds else 16]
    return text + (" UTC" if seconds else "")


def _cut(text: str, width: int) -> str:
    """``text`` in ``width`` characters, its middle replaced by ``…`` when longer (both ends name things)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def _base(mv: ModelVersion) -> str:
    b = mv.base_model
    return str(b.get("uri") or b.get("name") or b.get("source") or "-")


def version_table(versions: list[ModelVersion], *, wide: bool = False) -> str:
    """NAME VERSION ALIASES CREATED EVAL LOSS (before -> after) RUN, within :data:`TABLE_COLUMNS` (the run id
    and the name are cut in the middle when needed); ``wide`` adds the base model and the artifacts, uncut."""
    header = ["NAME", "VERSION", "ALIASES", "CREATED", "EVAL LOSS", "RUN"]
    rows = []
    for mv in versions:
        m = mv.metrics
        before, after = m.get("eval_loss_before"), m.get("eval_loss_after", m.get("eval_loss"))
        loss = f"{_loss(before)} -> {_loss(after)}" if before is not None else _loss(after)
        row = [mv.name, str(mv.version), ",".join(mv.aliases) or "-", _when(mv.created_at), loss, mv.run_id]
        if wide:
            row += [_base(mv), ",".join(sorted(mv.artifacts))]
        rows.append(row)
    if wide:
        return text_table(rows, [*header, "BASE MODEL", "ARTIFACTS"])
    for column, floor in ((5, 12), (2, 12), (0, 16)):  # RUN, ALIASES, NAME: cut the longest first
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        over = sum(widths) + 2 * (len(widths) - 1) - TABLE_COLUMNS
        if over <= 0:
            break
        keep = max(floor, widths[column] - over)
        rows = [[_cut(c, keep) if i == column else c for i, c in enumerate(r)] for r in rows]
    return text_table(rows, header)


def _section(title: str, lines: list[str]) -> list[str]:
    return ["", title, *lines] if lines else []


def _pairs(items: list[tuple[str, str]], min_width: int = 0) -> list[str]:
    width = max([min_width, *(len(k) for k, _ in items)])
    return [f"  {k.ljust(width)}  {v}" for k, v in items]


def _number(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.{digits}g}" if isinstance(value, float) else f"{value:,}"


def _results(m: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if _loss(m.get("eval_loss_before")) != "-" or _loss(m.get("eval_loss_after")) != "-":
        out.append(("eval loss", f"{_loss(m.get('eval_loss_before'))} -> {_loss(m.get('eval_loss_after'))} "
                                 "(before -> after training)"))
    if m.get("train_loss") is not None:
        out.append(("train loss", _loss(m["train_loss"]) + (f" after {m['steps']:,} steps" if m.get("steps") else "")
                    + (f", resumed at step {m['resumed_from_step']}" if m.get("resumed_from_step") else "")))
    speed = [f"{round(m['tokens_per_s']):,} tokens/s" if m.get("tokens_per_s") else "",
             f"{_number(m['trained_tokens'])} tokens trained" if m.get("trained_tokens") else ""]
    if any(speed):
        out.append(("throughput", ", ".join(s for s in speed if s)))
    memory = [f"GPU {m['peak_gpu_mem_gib']:.2f} GiB" if isinstance(m.get("peak_gpu_mem_gib"), (int, float)) else "",
              f"host {m['peak_host_mem_gib']:.2f} GiB" if isinstance(m.get("peak_host_mem_gib"), (int, float)) else ""]
    if any(memory):
        out.append(("peak memory", ", ".join(s for s in memory if s)))
    check = m.get("merge_check")
    if isinstance(check, dict) and check:
        rel, tol = check.get("relative_diff"), check.get("tolerance")
        verdict = ("within" if rel <= tol else "over") if isinstance(rel, (int, float)) and isinstance(
            tol, (int, float)) else "vs"
        out.append(("merge check", f"logits differ by {_number(rel, 2)} of their scale, {verdict} tolerance "
                                   f"{_number(tol, 2)} ({check.get('compare_dtype', '?')} on {check.get('device', '?')})"))
    for name in sorted(set(m.get("benchmarks_before") or {}) | set(m.get("benchmarks_after") or {})):
        before = format_score((m.get("benchmarks_before") or {}).get(name))
        after = (m.get("benchmarks_after") or {}).get(name) or {}
        out.append((name, f"{before} -> {format_score(after)}"
                          + (f" ({after['scored']} questions)" if after.get("scored") else "")))
    stages = m.get("stage_seconds")
    if isinstance(stages, dict) and stages:
        out.append(("stage times", ", ".join(f"{k} {_number(v, 3)}s" for k, v in stages.items())))
    return out


def _plan(m: dict[str, Any]) -> list[tuple[str, str]]:
    plan = m.get("plan")
    if not isinstance(plan, dict) or not plan:
        return []
    reasons = plan.get("reasons") or {}
    out = [("backend", str(m.get("backend") or "-"))]
    for key, value in plan.items():
        if key == "reasons":
            continue
        shown = "on" if value is True else "off" if value is False else _number(value)
        out.append((key.replace("_", " "), shown + (f"  ({reasons[key]})" if key in reasons else "")))
    return out


def _answers(answers: dict[str, Any] | None) -> list[str]:
    if not isinstance(answers, dict):
        return []
    before, after = answers.get("before") or [], answers.get("after") or []
    lines = []
    for n in range(max(len(before), len(after))):
        b = before[n] if n < len(before) and isinstance(before[n], dict) else {}
        a = after[n] if n < len(after) and isinstance(after[n], dict) else {}
        question = str(a.get("question") or b.get("question") or "")
        lines.append(f"  Q{n + 1}  {_cut(printable(question), _ANSWER_CHARS // 2)}")
        for label, answer in (("before", b), ("after", a)):
            text = printable(answer.get("output") or "-")
            lines.append(f"      {label:<6}  {_cut(text, _ANSWER_CHARS)}")
    return lines


def version_text(mv: ModelVersion, answers: dict[str, Any] | None = None) -> str:
    """``registry show``: the version, its artifacts and lineage, results before and after training (rounded),
    the training plan, the eval answers before and after (``answers``, from the run's manifest) and the
    environment, in titled sections."""
    head = (f"{mv.name}:{mv.version}" + (f"  ({', '.join('@' + a for a in mv.aliases)})" if mv.aliases else "")
            + ("  [archived]" if mv.archived else ""))
    lines = [head, f"  created      {_when(mv.created_at, seconds=True)}", f"  run          {mv.run_id}",
             f"  run uri      {mv.run_uri}"]
    if mv.description:
        lines.append(f"  description  {printable(mv.description)}")
    for art, spec in sorted(mv.artifacts.items()):
        lines.append(f"  {art:<12} {spec['uri']}  ({len(spec['files'])} files)")
    for r in mv.alias_refusals:
        lines.append(f"  not @{r.get('alias')}  the gate refused it at registration: {printable(r.get('refusal'))}")
    for p in mv.pushes:
        lines.append(f"  pushed       hf://{p.repo}@{p.revision}  commit {p.commit}  ({p.artifact}, {p.pushed_at})")
    for e in mv.evaluations:
        scores = ", ".join(f"{name} {format_score(dump(s))}" for name, s in (e.benchmarks or {}).items())
        lines.append(f"  evaluated    {scores or '-'}  ({e.artifact}, {e.evaluated_at}, by {e.by or '?'})")
    lines += [f"  answers      {line}" for line in answers_files(mv)]
    base = mv.base_model
    if base:
        weights = base.get("sha256") or {}
        lines += _section("Base model", _pairs([
            ("uri", _base(mv)), ("revision", str(base.get("revision") or "unpinned")),
            ("weights", f"{len(weights)} file(s), sha256 recorded" if weights else "-")]))
    d = mv.dataset
    if d:
        rows = f"{_number(d.get('rows'))} rows used" + (f" of {_number(d['loaded_rows'])} read"
                                                        if d.get("loaded_rows") else "")
        where = ", ".join(f"{k} {d[k]}" for k in ("subset", "split", "revision") if d.get(k))
        lines += _section("Data", _pairs([("source", str(d.get("source") or "-") + (f" ({where})" if where else "")),
                                          ("rows", rows),
                                          ("sha256", str(d.get("content_sha256") or "-")[:16] + "…")]))
    lines += _section("Results", _pairs(_results(mv.metrics), min_width=11))
    lines += _section("Answers to eval.questions, before -> after training", _answers(answers))
    lines += _section("Training plan", _pairs(_plan(mv.metrics)))
    env = {k: v for k, v in mv.environment.items() if v not in (None, "")}
    if env:
        lines += _section("Environment", ["  " + ", ".join(f"{k} {v}" for k, v in env.items())])
    if mv.tags:
        lines += _section("Tags", _pairs([(printable(k), printable(v)) for k, v in sorted(mv.tags.items())]))
    lines += ["", "Every figure in full: --json"]
    return "\n".join(lines)
