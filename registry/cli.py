"""``medft registry ...``: look up, register, alias, download and push (to the Hugging Face Hub) model versions.

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

from registry.compare import answers_files, format_score, text_table
from registry.names import ARTIFACTS, DEFAULT_STORE
from registry.records import dump
from registry.registry import Registry
from registry.store import Store, open_store
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


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _metric(mv: ModelVersion, *names: str) -> str:
    for n in names:
        v = mv.metrics.get(n)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{v:.4g}"
    return "-"


def _base(mv: ModelVersion) -> str:
    b = mv.base_model
    return str(b.get("uri") or b.get("name") or b.get("source") or "-")


@click.group("registry")
def registry_group() -> None:
    """Find, register, alias, download and push model versions (refs: NAME, NAME:VERSION, NAME@ALIAS)."""


@registry_group.command("list")
@store_options
@click.option("--name", default=None, help="Only this model's versions.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(store_uri: str, registry_uri: str | None, name: str | None, as_json: bool) -> None:
    """List registered model versions.

    A corrupt record does not hide the others: they are listed, then the first corrupt one is named (exit 3).
    """
    from registry.errors import DataError

    _, reg = _open(store_uri, registry_uri)
    versions, corrupt = reg.scan(name)
    if as_json:
        _echo_json([mv.to_dict() for mv in versions])
    elif not versions:
        click.echo(f"no model versions in {reg.uri}" + (f" named {name}" if name else ""))
    else:
        rows = [[mv.name, str(mv.version), ",".join(mv.aliases) or "-", mv.created_at, mv.run_id, _base(mv),
                 _metric(mv, "eval_loss_after", "eval_loss", "train_loss"), ",".join(sorted(mv.artifacts))]
                for mv in versions]
        click.echo(text_table(rows, ["NAME", "VERSION", "ALIASES", "CREATED", "RUN", "BASE MODEL", "EVAL LOSS",
                                     "ARTIFACTS"]))
    if corrupt:
        more = f" (and {len(corrupt) - 1} more corrupt record(s))" if len(corrupt) > 1 else ""
        raise DataError(f"{corrupt[0].message}{more}")


def _show_text(mv: ModelVersion) -> str:
    lines = [f"{mv.name}:{mv.version}" + (f"  ({', '.join('@' + a for a in mv.aliases)})" if mv.aliases else ""),
             f"  created      {mv.created_at}", f"  run          {mv.run_id}", f"  run uri      {mv.run_uri}"]
    if mv.description:
        lines.append(f"  description  {mv.description}")
    for art, spec in sorted(mv.artifacts.items()):
        lines.append(f"  {art:<12} {spec['uri']}  ({len(spec['files'])} files)")
    for p in mv.pushes:
        lines.append(f"  pushed       hf://{p.repo}@{p.revision}  commit {p.commit}  ({p.artifact}, {p.pushed_at})")
    for e in mv.evaluations:
        scores = ", ".join(f"{name} {format_score(dump(s))}" for name, s in (e.benchmarks or {}).items())
        lines.append(f"  evaluated    {scores or '-'}  ({e.artifact}, {e.evaluated_at}, by {e.by or '?'})")
    lines += [f"  answers      {line}" for line in answers_files(mv)]
    for title, d in (("base model", mv.base_model), ("dataset", mv.dataset), ("metrics", mv.metrics),
                     ("environment", mv.environment), ("tags", mv.tags)):
        if d:
            lines.append(f"  {title}:")
            lines += [f"    {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}"
                      for k, v in d.items()]
    return "\n".join(lines)


@registry_group.command("show")
@click.argument("ref")
@store_options
@click.option("--json", "as_json", is_flag=True, help="Print the full record as JSON.")
def show_cmd(ref: str, store_uri: str, registry_uri: str | None, as_json: bool) -> None:
    """Show one model version: REF is NAME (latest), NAME:VERSION or NAME@ALIAS."""
    _, reg = _open(store_uri, registry_uri)
    mv = reg.get(ref)
    click.echo(json.dumps(mv.to_dict(), indent=2, default=str) if as_json else _show_text(mv))


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
@click.option("--force", is_flag=True, help="Move past a --require refusal; the override is recorded in "
              "the model's aliases.json (gate_overrides).")
@store_options
def alias_cmd(name: str, version_or_alias: str, alias_or_version: str, delete: bool, require: tuple[str, ...],
              force: bool, store_uri: str, registry_uri: str | None) -> None:
    """Point NAME@ALIAS at VERSION, or remove it with --delete. VERSION and ALIAS may come in either order.

    \b
    With --require medqa the move is refused (exit 2, nothing changed) when VERSION has no medqa score or
    scores lower than the version ALIAS points at now; the check and the move are one compare-and-swap.
    """
    from registry.compare import required_benchmarks
    from registry.errors import ConfigError

    version, alias = _version_and_alias(version_or_alias, alias_or_version)
    names = required_benchmarks(require)
    if force and not names:
        raise ConfigError("--force overrides a --require refusal; give --require BENCHMARK too")
    _, reg = _open(store_uri, registry_uri)
    if delete:
        if names:
            raise ConfigError("--require gates a move; it does not apply to --delete")
        current = reg.get(f"{name}@{alias}")
        if current.version != version:
            raise ConfigError(f"{name}@{alias} points at version {current.version}, not {version}; nothing deleted")
        reg.delete_alias(name, alias)
        click.echo(f"deleted {name}@{alias} (was version {version})")
        return
    before = len(reg.gate_overrides(name)) if force else 0
    reg.set_alias(name, version, alias, require=names, force=force)
    overrides = reg.gate_overrides(name) if force else []
    forced = [o for o in overrides[before:] if o.get("alias") == alias and o.get("version") == version]
    click.echo(f"{name}@{alias} -> {name}:{version}" + (
        f" (forced past: {forced[-1]['refusal']}; recorded in aliases.json gate_overrides)" if forced else ""))


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
    _, reg = _open(store_uri, registry_uri)
    versions = [reg.get(ref) for ref in refs]
    verified = verify_scores(versions, reg.store)  # before anything is drawn or printed
    if dest is not None:
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
