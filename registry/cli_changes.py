"""``medft registry`` commands for what happens after registration: ``history``, ``protect``/``unprotect``,
``archive``/``unarchive``/``delete``, ``tag``, ``describe``, ``webhooks`` and ``runs`` (README "Registry").

Imported by :mod:`registry.cli`, which they are added to; options and failures as there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from registry.cli import _echo_json, _open, _open_existing, registry_group, store_options
from registry.compare import text_table
from registry.model_state import HistoryEntry
from registry.redact import printable


def _entry_line(e: HistoryEntry) -> str:
    what = {"set": f"@{e.alias} -> {e.after}", "move": f"@{e.alias} {e.before} -> {e.after}",
            "delete": f"@{e.alias} deleted (was {e.before})", "refused": f"@{e.alias} stays at {e.before}",
            "protect": f"@{e.alias} protected", "unprotect": f"@{e.alias} unprotected"}.get(e.action, f"version {e.after}")
    gate = e.gate or {}
    bits = [f"require {','.join(gate['require'])}: {gate.get('verdict', '-')}" if gate.get("require") else "",
            f"reason: {e.reason}" if e.reason else "", f"refusal: {gate['refusal']}" if gate.get("refusal") else ""]
    if e.deliveries:
        ok = sum(1 for d in e.deliveries if d.get("ok"))
        bits.append(f"webhooks {ok}/{len(e.deliveries)} delivered")
    # Who, how, reasons and refusals are stored text: no control character of theirs reaches the terminal.
    return (f"{e.seq:>5}  {e.at}  {e.action:<14} {what:<24} by {printable(e.by or '?')} via {printable(e.via or '?')}"
            + "".join(f"; {printable(b)}" for b in bits if b))


@registry_group.command("history")
@click.argument("ref", metavar="NAME[@ALIAS]")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def history_cmd(ref: str, store_uri: str, registry_uri: str | None, as_json: bool) -> None:
    """Every change of NAME (or of NAME@ALIAS), newest first: time, user, version before and after, the gate's
    verdict, the reason and the webhook deliveries. A corrupt entry is exit 3 naming it."""
    from registry.errors import ConfigError
    from registry.registry import parse_ref

    name, version, alias = parse_ref(ref)
    if version is not None:
        raise ConfigError(f"history takes NAME or NAME@ALIAS, got {ref!r}")
    _, reg = _open_existing(store_uri, registry_uri)
    entries = reg.history(name, alias)
    if as_json:
        _echo_json([e.to_dict() for e in entries])
    elif not entries:
        click.echo(f"no recorded changes of {ref} in {reg.uri}")
    else:
        click.echo("\n".join(_entry_line(e) for e in entries))


@registry_group.command("protect")
@click.argument("name")
@click.argument("alias")
@click.option("--require", "require", multiple=True, required=True, metavar="BENCHMARK",
              help="The benchmarks a version must pass against the alias's current version (repeatable, or "
                   "comma-separated).")
@click.option("--reason", default=None, metavar="TEXT", help="Recorded in the history.")
@store_options
def protect_cmd(name: str, alias: str, require: tuple[str, ...], reason: str | None, store_uri: str,
                registry_uri: str | None) -> None:
    """Protect NAME@ALIAS: every move of it (`registry alias`, `register --alias`, a training job's
    output.aliases) must pass the gate on these benchmarks; only `registry alias --force --reason` overrides."""
    _, reg = _open(store_uri, registry_uri)
    names = reg.protect(name, alias, require, reason=reason)
    click.echo(f"{name}@{alias} protected: a version must pass {', '.join(names)} to take it")


@registry_group.command("unprotect")
@click.argument("name")
@click.argument("alias")
@click.option("--reason", default=None, metavar="TEXT", help="Recorded in the history.")
@store_options
def unprotect_cmd(name: str, alias: str, reason: str | None, store_uri: str, registry_uri: str | None) -> None:
    """Lift the protection of NAME@ALIAS (recorded in the history)."""
    _, reg = _open(store_uri, registry_uri)
    reg.unprotect(name, alias, reason=reason)
    click.echo(f"{name}@{alias} is no longer protected")


def _version_number(text: str) -> int:
    from registry.errors import ConfigError

    if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ConfigError(f"VERSION must be a version number (1, 2, ...), got {text!r}")
    return int(text)


def _version_command(verb: str, doc: str) -> Callable[[Callable[..., Any]], Any]:
    def decorate(fn: Callable[..., Any]) -> Any:
        fn.__doc__ = doc
        fn = store_options(fn)
        fn = click.option("--reason", default=None, metavar="TEXT", help="Recorded in the history.")(fn)
        fn = click.argument("version")(fn)
        fn = click.argument("name")(fn)
        return registry_group.command(verb)(fn)
    return decorate


@_version_command("archive", "Archive NAME:VERSION: hidden from `registry list` unless --all, and no alias may point at "
                             "it. Refused (exit 2) while an alias points at it; recorded in the history.")
def archive_cmd(name: str, version: str, reason: str | None, store_uri: str, registry_uri: str | None) -> None:
    _, reg = _open(store_uri, registry_uri)
    changed = reg.archive(name, _version_number(version), reason=reason)
    click.echo(f"{'archived' if changed else 'already archived:'} {name}:{version}")


@_version_command("unarchive", "Undo `registry archive` of NAME:VERSION (recorded in the history).")
def unarchive_cmd(name: str, version: str, reason: str | None, store_uri: str, registry_uri: str | None) -> None:
    _, reg = _open(store_uri, registry_uri)
    changed = reg.archive(name, _version_number(version), archived=False, reason=reason)
    click.echo(f"{'unarchived' if changed else 'not archived:'} {name}:{version}")


@_version_command("delete", "Delete the registry record of NAME:VERSION. The run's published files stay where its "
                            "run URI says (delete those from the store yourself); the version number is never reused. "
                            "Refused (exit 2) while an alias points at it; recorded in the history.")
def delete_cmd(name: str, version: str, reason: str | None, store_uri: str, registry_uri: str | None) -> None:
    _, reg = _open(store_uri, registry_uri)
    number = _version_number(version)
    run_uri = reg.get(f"{name}:{number}").run_uri if reg.state(name).deleted.count(number) == 0 else None
    reg.delete_version(name, number, reason=reason)
    click.echo(f"deleted {name}:{number}" + (f" (its run's files stay at {run_uri})" if run_uri else ""))


def _tag_pairs(items: tuple[str, ...], what: str) -> dict[str, str]:
    from registry.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} {item!r} must be KEY=VALUE")
        out[key.strip()] = value
    return out


@registry_group.command("tag")
@click.argument("name")
@click.argument("version")
@click.argument("tags", nargs=-1, metavar="KEY=VALUE...")
@click.option("--remove", "remove", multiple=True, metavar="KEY", help="Drop this tag (repeatable).")
@store_options
def tag_cmd(name: str, version: str, tags: tuple[str, ...], remove: tuple[str, ...], store_uri: str,
            registry_uri: str | None) -> None:
    """Set tags of NAME:VERSION (KEY=VALUE...), or drop them with --remove KEY."""
    from registry.errors import ConfigError

    if not tags and not remove:
        raise ConfigError("give KEY=VALUE tags to set or --remove KEY")
    _, reg = _open(store_uri, registry_uri)
    mv = reg.set_metadata(name, _version_number(version), tags=_tag_pairs(tags, "tag"), remove_tags=remove)
    click.echo(f"{mv.ref} tags: " + (", ".join(f"{k}={v}" for k, v in sorted(mv.tags.items())) or "none"))


@registry_group.command("describe")
@click.argument("name")
@click.argument("version")
@click.argument("description")
@store_options
def describe_cmd(name: str, version: str, description: str, store_uri: str, registry_uri: str | None) -> None:
    """Replace the description of NAME:VERSION."""
    _, reg = _open(store_uri, registry_uri)
    mv = reg.set_metadata(name, _version_number(version), description=description)
    click.echo(f"{mv.ref} description set")


@registry_group.group("webhooks")
def webhooks_group() -> None:
    """The URLs promotion events are POSTed to (README "Promotion events"); also $MEDFT_REGISTRY_WEBHOOKS."""


@webhooks_group.command("add")
@click.argument("url")
@store_options
def webhooks_add(url: str, store_uri: str, registry_uri: str | None) -> None:
    """Send every change of every model to URL (stored in the registry's config.json)."""
    from registry import webhooks
    from registry.registry import current_user

    _, reg = _open(store_uri, registry_uri)
    webhooks.change_urls(reg.store, add=url, by=current_user())
    click.echo(f"webhook added: {webhooks.label(url)}")


@webhooks_group.command("remove")
@click.argument("url")
@store_options
def webhooks_remove(url: str, store_uri: str, registry_uri: str | None) -> None:
    """Stop sending events to URL (as added, or as `webhooks list` shows it)."""
    from registry import webhooks

    _, reg = _open(store_uri, registry_uri)
    webhooks.change_urls(reg.store, remove=url)
    click.echo(f"webhook removed: {webhooks.label(url)}")


@webhooks_group.command("list")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def webhooks_list(store_uri: str, registry_uri: str | None, as_json: bool) -> None:
    """The webhook URLs (credentials and query values hidden), and whether $MEDFT_WEBHOOK_SECRET is set."""
    import os

    from registry import webhooks

    _, reg = _open_existing(store_uri, registry_uri)
    rows = [(webhooks.label(u), "config.json") for u in webhooks.stored_urls(reg.store)]
    rows += [(webhooks.label(u), webhooks.ENV_URLS) for u in webhooks.env_urls()]
    signed = bool(os.environ.get(webhooks.ENV_SECRET))
    if as_json:
        _echo_json({"webhooks": [{"url": u, "from": f} for u, f in rows], "signed": signed})
        return
    click.echo(text_table([list(r) for r in rows], ["URL", "FROM"]) if rows else "no webhooks")
    click.echo(f"events are {'signed' if signed else f'NOT signed (set {webhooks.ENV_SECRET})'}")


@registry_group.command("runs")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def runs_cmd(store_uri: str, registry_uri: str | None, as_json: bool) -> None:
    """Every run in the store, finished or not: registered, published, running (its lease is held),
    interrupted (a checkpoint, no manifest) or failed (stopped before its first checkpoint), with its last
    step and where it stopped."""
    from registry.run_list import list_runs

    store, reg = _open_existing(store_uri, registry_uri)
    runs = list_runs(store, reg)
    if as_json:
        _echo_json([asdict(r) for r in runs])
    elif not runs:
        click.echo(f"no runs in {store.uri}")
    else:
        click.echo(text_table([[r.run_id, r.state, "-" if r.step is None else str(r.step),
                                ",".join(r.versions) or "-", printable(r.stopped)] for r in runs],
                              ["RUN", "STATE", "STEP", "VERSIONS", "WHERE IT STOPPED"]))
    corrupt = [r for r in runs if r.state == "corrupt"]
    if corrupt:  # listed with the rest, then named: exit 3
        from registry.errors import DataError

        raise DataError(f"run {corrupt[0].run_id}: {corrupt[0].stopped}" + (
            f" (and {len(corrupt) - 1} more corrupt run(s))" if len(corrupt) > 1 else ""))
