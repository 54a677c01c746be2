"""The ``medft`` command line: a click group whose commands only wire stages together.

Expected failures (:class:`registry.errors.MedftError`) print one line and exit with their documented code;
anything else is a bug and exits 1 with its traceback.
"""

from __future__ import annotations

import sys

import click

from registry import logs
from registry.cli import registry_group
from registry.errors import MedftError

CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="YAML job config (see configs/). Defaults apply to missing keys.")
SET_OPTION = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override one key, e.g. --set train.max_steps=10 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="medft")
def cli() -> None:
    """medft: fine-tune DeepSeek-R1-Distill models into medical reasoning assistants.

    \b
    Exit codes: 0 ok, 2 bad usage or config, 3 bad data, 4 not found, 5 access refused,
    75 transient (retry), 143 stopped by SIGTERM after a checkpoint, 1 a bug (with traceback).
    """


@cli.command()
@CONFIG_OPTION
@SET_OPTION
@click.option("--dry-run", is_flag=True,
              help="Resolve and validate everything, print the config and the plan; touch no GPU or store.")
def train(config_path: str | None, overrides: tuple[str, ...], dry_run: bool) -> None:
    """Pull data and weights, fine-tune, evaluate, merge, publish and register one run."""
    from job import pipeline

    pipeline.run(config_path, overrides, dry_run=dry_run)


@cli.group()
def data() -> None:
    """Inspect and validate training data."""


@data.command("validate")
@CONFIG_OPTION
@SET_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--tokenizer/--no-tokenizer", default=True,
              help="Measure token lengths with model.base's tokenizer (default; skipped if it cannot be had).")
def data_validate(config_path: str | None, overrides: tuple[str, ...], as_json: bool, tokenizer: bool) -> None:
    """Load, validate and tokenize the configured dataset and print its report (exit 3 on bad data)."""
    from job import data as data_stage
    from job import model
    from job.config import load_config

    cfg = load_config(config_path, overrides)
    data_stage.load_rows(cfg)  # bad data fails before any tokenizer is fetched
    report = data_stage.validate(cfg, model.tokenizer_for_report(cfg) if tokenizer else None)
    click.echo(report.to_json() if as_json else report.to_text())


cli.add_command(registry_group)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, mapping expected failures to one line and an exit code."""
    logs.configure()
    try:
        cli.main(args=argv, prog_name="medft", standalone_mode=False)
    except MedftError as e:
        logs.get_logger("medft").error("failed", error=e.message, exit_code=e.exit_code)
        click.echo(f"medft: error: {logs.redact(e.message)}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("medft: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
