"""``medft registry ...``: look up, register, alias, download, verify and push (to the Hugging Face Hub) model
versions.

``--store`` defaults to ``$MEDFT_STORE``, else ``./medft-store``; the registry lives at ``<store>/registry``
unless ``--registry`` (or ``$MEDFT_REGISTRY``) names another URI. Output is a table, or JSON with
``--json``. Failures raise :mod:`registry.errors` exceptions; ``job.cli.main`` prints their one line and
exits with their code (an unknown ref exits 4 and names it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import click

from registry.names import ARTIFACTS, DEFAULT_STORE
from registry.registry import Registry
from registry.store import Store, check_writable_file, open_store
from registry.store.transfer import os_errors
from registry.versions import ModelVersion


def store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--registry", "registry_uri", envvar="MEDFT_REGISTRY", metavar="URI",
                      help="Registry URI [env MEDFT_REGISTRY; default <store>/registry].")(fn)
    fn = click.option("--store", "store_uri", envvar="MEDFT_STORE", default=DEFAULT_STORE, show_default=True,
                      metavar="URI", help="Store URI: s3://bucket/prefix, file:///path or a path [env MEDFT_STORE].")(fn)
    return fn


def _open(store_uri: str, registry_uri: str | None) -> tuple[Store, Registry]:
    store = open_store(store_uri or DEFAULT_STORE)
    return store, Registry.at(store, registry_uri)


def _open_existing(store_uri: str, registry_uri: str | None) -> tuple[Store, Registry]:
    """:func:`_open` for commands that only read: a local store (or ``--registry``) that does not exist is
    NotFoundError (exit 4), so a typo in ``--store`` never reads as an empty registry or a clean verify."""
    from registry.errors import NotFoundError
    from registry.views import missing_store

    store, reg = _open(store_uri, registry_uri)
    missing = missing_store(store, reg, registry_given=bool(registry_uri))
    if missing:
        raise NotFoundError(missing)
    return store, reg


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group("registry")
def registry_group() -> None:
    """Find, register, alias, download and push model versions (refs: NAME, NAME:VERSION, NAME@ALIAS)."""


@registry_group.command("list")
@store_options
@click.option("--name", default=None, help="Only this model's versions.")
@click.option("--all", "show_all", is_flag=True, help="Archived versions too.")
@click.option("--wide", is_flag=True, help="Also the base model and artifacts, past 100 columns.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table (every field, every digit).")
def list_cmd(store_uri: str, registry_uri: str | None, name: str | None, show_all: bool, wide: bool,
             as_json: bool) -> None:
    """List registered model versions (archived ones only with --all).

    \b
    A store (or --registry) that does not exist, or a --name the registry does not hold, exits 4 naming the
    known models; an existing registry with no versions lists nothing (exit 0). A corrupt record does not hide
    the others: they are listed, then the first corrupt one is named (exit 3).
    """
    from registry.errors import DataError
    from registry.views import unknown_name, version_table

    _, reg = _open_existing(store_uri, registry_uri)
    versions, corrupt = reg.scan(name)
    if name is not None and not versions and not corrupt:
        raise unknown_name(reg, name)
    versions = [mv for mv in versions if show_all or not mv.archived]
    if as_json:
        _echo_json([mv.to_dict() for mv in versions])
    elif not versions:
        click.echo(f"no model versions in {reg.uri}")
    else:
        click.echo(version_table(versions, wide=wide))
    if corrupt:
        more = f" (and {len(corrupt) - 1} more corrupt record(s))" if len(corrupt) > 1 else ""
        raise DataError(f"{corrupt[0].message}{more}")


def _run_answers(store: Store, mv: ModelVersion) -> dict[str, Any] | None:
    """The eval answers before and after training, from the version's run manifest (None when unreadable:
    ``show`` still shows the version; ``registry verify`` is where a damaged run is judged)."""
    from registry.errors import MedftError
    from registry.runs import manifest_record, read_manifest

    try:
        return manifest_record(read_manifest(store, mv.run_uri), mv.run_uri).answers
    except MedftError:
        return None


@registry_group.command("show")
@click.argument("ref")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON (every digit).")
@click.option("--at", "at", default=None, metavar="TIME",
              help="With NAME@ALIAS: the version the alias pointed at then (ISO 8601; UTC without a zone).")
def show_cmd(ref: str, store_uri: str, registry_uri: str | None, as_json: bool, at: str | None) -> None:
    """Show one model version: REF is NAME (latest), NAME:VERSION or NAME@ALIAS.

    Text: rounded figures in sections (results before and after training, the eval answers, the plan);
    --json: the version's record as stored.
    """
    from registry.errors import NotFoundError
    from registry.views import missing_store, version_text

    store, reg = _open(store_uri, registry_uri)
    try:
        if at is not None:
            ref = _version_at(reg, ref, at)
        mv = reg.get(ref)
    except NotFoundError as e:
        missing = missing_store(store, reg, registry_given=bool(registry_uri))
        if missing and type(e) is NotFoundError:
            raise NotFoundError(f"{e.message}: {missing}") from None
        raise
    click.echo(json.dumps(mv.to_dict(), indent=2, default=str) if as_json
               else version_text(mv, _run_answers(store, mv)))


ARTIFACT_OPTION = click.option("--artifact", type=click.Choice(list(ARTIFACTS)), default="merged",
                               show_default=True, help="Which artifact.")


@registry_group.command("resolve")
@click.argument("ref")
@ARTIFACT_OPTION
@store_options
def resolve_cmd(ref: str, artifact: str, store_uri: str, registry_uri: str | None) -> None:
    """Print the URI of a model version's artifact."""
    _, reg = _open(store_uri, registry_uri)
    click.echo(reg.artifact_uri(ref, artifact))


@registry_group.command("register")
@click.argument("name")
@click.argument("run_uri")
@click.option("--alias", "aliases", multiple=True, metavar="ALIAS", help="Point this alias at the new version "
              "(repeatable).")
@click.option("--tag", "tags", multiple=True, metavar="KEY=VALUE", help="Tag the version (repeatable).")
@click.option("--description", default=None, help="Free text stored with the version.")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print the new record as JSON.")
def register_cmd(name: str, run_uri: str, aliases: tuple[str, ...], tags: tuple[str, ...],
                 description: str | None, store_uri: str, registry_uri: str | None, as_json: bool) -> None:
    """Register a published run as the next version of NAME.

    RUN_URI is the run's folder (s3://bucket/prefix/runs/ID or a path), or a bare run id inside --store.
    """
    from registry.errors import ConfigError

    tag_map = {}
    for t in tags:
        if "=" not in t:
            raise ConfigError(f"--tag {t!r} must be KEY=VALUE")
        k, v = t.split("=", 1)
        tag_map[k] = v
    store, reg = _open(store_uri, registry_uri)
    mv = reg.register(name, run_uri, aliases=aliases, tags=tag_map, description=description, store=store)
    if as_json:
        _echo_json(mv.to_dict())
    else:
        click.echo(f"registered {mv.name}:{mv.version}" + (f" ({', '.join('@' + a for a in mv.aliases)})"
                                                           if mv.aliases else "") + f" from {mv.run_uri}")
    for refusal in mv.alias_refusals:  # the registration stands; the protected alias stays where it was
        where = "unset" if refusal["stays_at"] is None else f"at version {refusal['stays_at']}"
        click.echo(f"{name}@{refusal['alias']} stays {where}: {refusal['refusal']}", err=True)


def _version_and_alias(first: str, second: str) -> tuple[int, str]:
    """VERSION ALIAS or ALIAS VERSION (an alias is never all digits, so the order is unambiguous)."""
    from registry.errors import ConfigError

    for version, alias in ((first, second), (second, first)):
        if re.fullmatch(r"[0-9]+", version) and not re.fullmatch(r"[0-9]+", alias):  # isdigit() takes "²"
            if int(version) < 1:
                break
            return int(version), alias
    if "latest" in (first, second):
        raise ConfigError("'latest' is not an alias to set: NAME@latest always means the highest version; give a "
                          "version number (1, 2, ...) and an alias name")
    raise ConfigError(f"give a version number (1, 2, ...) and an alias name, got {first!r} and {second!r}")


@registry_group.command("alias")
@click.argument("name")
@click.argument("version_or_alias", metavar="VERSION")
@click.argument("alias_or_version", metavar="ALIAS")
@click.option("--delete", is_flag=True, help="Remove the alias (it must point at VERSION).")
@click.option("--require", "require", multiple=True, metavar="BENCHMARK",
              help="Move only if VERSION has a score on BENCHMARK (medqa, medmcqa, pubmedqa; from training or "
                   "`medft eval --record`) no lower than the version the alias points at now, scored the same way "
                   "(repeatable, or comma-separated).")
@click.option("--force", is_flag=True, help="Move past a gate refusal (--require or the alias's protection); "
              "needs --reason. The override is recorded in the history and in aliases.json (gate_overrides).")
@click.option("--reason", default=None, metavar="TEXT", help="Why; recorded in the history (needed with --force).")
@store_options
def alias_cmd(name: str, version_or_alias: str, alias_or_version: str, delete: bool, require: tuple[str, ...],
              force: bool, reason: str | None, store_uri: str, registry_uri: str | None) -> None:
    """Point NAME@ALIAS at VERSION, or remove it with --delete. VERSION and ALIAS may come in either order.

    \b
    With --require medqa, or when ALIAS is protected (`registry protect`), the move is refused (exit 2,
    nothing changed) when VERSION has no score on a required benchmark or scores lower than the version
    ALIAS points at now; the check, the move and its history entry are one compare-and-swap.
    """
    from registry.compare import required_benchmarks
    from registry.errors import ConfigError

    version, alias = _version_and_alias(version_or_alias, alias_or_version)
    names = required_benchmarks(require)
    if force and not (reason or "").strip():
        raise ConfigError("--force needs --reason TEXT: a move forced past the gate is recorded with why")
    _, reg = _open(store_uri, registry_uri)
    if delete:
        if names or force:
            raise ConfigError("--require and --force gate a move; they do not apply to --delete")
        was = reg.delete_alias(name, alias, version=version, reason=reason)
        click.echo(f"deleted {name}@{alias} (was version {was})")
        return
    before = len(reg.gate_overrides(name)) if force else 0
    reg.set_alias(name, version, alias, require=names, force=force, reason=reason)
    overrides = reg.gate_overrides(name) if force else []
    forced = [o for o in overrides[before:] if o.get("alias") == alias and o.get("version") == version]
    click.echo(f"{name}@{alias} -> {name}:{version}" + (
        f" (forced past: {forced[-1]['refusal']}; recorded in the history)" if forced else ""))


def _version_at(reg: Registry, ref: str, at: str) -> str:
    """``show --at``: the ref of the version ``ref`` (NAME@ALIAS) pointed at, at ``at``; says so on stderr."""
    from registry.errors import ConfigError
    from registry.registry import parse_ref

    name, _, alias = parse_ref(ref)
    if alias is None or alias == "latest":
        raise ConfigError(f"--at needs REF as NAME@ALIAS (the alias whose history answers it), got {ref!r}")
    version, entry = reg.holder_at(name, alias, at)
    click.echo(f"{name}@{alias} at {at}: {name}:{version} (since {entry.at}, {entry.action} by {entry.by or '?'})",
               err=True)
    return f"{name}:{version}"


@registry_group.command("compare")
@click.argument("refs", nargs=-1, required=True)
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--image", "image", default=None, metavar="PATH.png|PATH.svg",
              help="Also draw the benchmark scores (accuracy with 95% intervals, a bar per version) into PATH.")
def compare_cmd(refs: tuple[str, ...], store_uri: str, registry_uri: str | None, as_json: bool,
                image: str | None) -> None:
    """Versions side by side: benchmark accuracy with 95% intervals, eval loss, data, base model and the
    config settings that differ. REF as for show (two or more). Every score is first recomputed from its
    answers file: exit 3 naming the version when one does not match; one without a file is marked unverified."""
    from registry.compare import check_image_path, comparison, comparison_text, draw_scores, verify_scores
    from registry.errors import ConfigError

    if len(refs) < 2:
        raise ConfigError("compare needs two or more refs, e.g. medft registry compare NAME:6 NAME:7")
    dest = check_image_path(image) if image else None
    if dest is not None:
        check_writable_file(dest, "--image")
    _, reg = _open(store_uri, registry_uri)
    versions = [reg.get(ref) for ref in refs]
    verified = verify_scores(versions, reg.store)  # before anything is drawn or printed
    if dest is not None:
        with os_errors(dest, "writing"):
            draw_scores(versions, dest)
    click.echo(json.dumps(comparison(versions, verified), indent=2, default=str) if as_json
               else comparison_text(versions, verified))
    if dest is not None:
        click.echo(f"benchmark scores drawn to {dest}", err=True)


@registry_group.command("download")
@click.argument("ref")
@click.argument("dest", type=click.Path(file_okay=False))
@ARTIFACT_OPTION
@store_options
def download_cmd(ref: str, dest: str, artifact: str, store_uri: str, registry_uri: str | None) -> None:
    """Download a model version's artifact into DEST, every file verified by sha256."""
    _, reg = _open(store_uri, registry_uri)
    path = reg.download(ref, dest, artifact)
    click.echo(str(path))


@registry_group.command("verify")
@click.argument("ref", required=False)
@click.option("--all", "check_all", is_flag=True, help="Every version in the registry.")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print each version's findings as JSON.")
def verify_cmd(ref: str | None, check_all: bool, store_uri: str, registry_uri: str | None, as_json: bool) -> None:
    """Re-hash every stored file of a version (REF) or of every version (--all) against its run's MANIFEST.json,
    read back from the store, and check the records and the artifacts' loading checks. Exit 3 if any problem."""
    from registry.errors import ConfigError, DataError
    from registry.verify import verify_versions

    if (ref is None) == (not check_all):
        raise ConfigError("registry verify takes a REF or --all, e.g. medft registry verify med@production")
    _, reg = _open_existing(store_uri, registry_uri)
    checks, unreadable = verify_versions(reg, ref)
    problems = [p for c in checks for p in c.problems] + unreadable
    if as_json:
        _echo_json({"registry": reg.uri, "ok": not problems, "versions": [c.to_dict() for c in checks],
                    "unreadable": [asdict(p) for p in unreadable]})
    else:
        for c in checks:
            click.echo(f"{c.ref}: {'ok' if not c.problems else 'PROBLEMS'} ({c.files} files re-hashed, {c.run_uri})")
            for p in c.problems:
                click.echo(f"  {p.path}: {p.problem}")
        for p in unreadable:
            click.echo(f"unreadable record {p.path}: {p.problem}")
    if problems:
        bad = sum(1 for c in checks if c.problems) + len(unreadable)
        raise DataError(f"registry verify: {len(problems)} problem(s) in {bad} version(s) or record(s) of {reg.uri}, "
                        f"first: {problems[0].path}: {problems[0].problem}")


@registry_group.command("push")
@click.argument("ref")
@click.argument("target", metavar="hf://ORG/NAME")
@ARTIFACT_OPTION
@click.option("--create", is_flag=True, help="Create the Hub repo if it does not exist.")
@click.option("--private", is_flag=True, help="With --create: make the new repo private.")
@click.option("--revision", default=None, metavar="BRANCH",
              help="Commit to this branch (created from main if missing) [default: main].")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print the push record as JSON.")
def push_cmd(ref: str, target: str, artifact: str, create: bool, private: bool, revision: str | None,
             store_uri: str, registry_uri: str | None, as_json: bool) -> None:
    """Upload a model version's artifact (with its model card) to a Hugging Face Hub repo in one commit.

    Needs HF_TOKEN in the environment (a token with write access). The repo, branch and commit are recorded
    in the version (see `registry show`).
    """
    from registry.push import push

    _, reg = _open(store_uri, registry_uri)
    mv, record = push(reg, ref, target, artifact=artifact, create=create, private=private, revision=revision)
    if as_json:
        _echo_json({"ref": mv.ref, **asdict(record)})
    else:
        click.echo(f"pushed {mv.ref} ({artifact}) to hf://{record.repo}@{record.revision}: commit {record.commit} "
                   f"{record.url}")


# The commands that change a model after registration, and list runs, live in their own module; importing it
# adds them to registry_group.
from registry import cli_changes  # noqa: E402,F401
