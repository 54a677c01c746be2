"""The ``medft`` command line: a click group whose commands only wire stages together.

Expected failures (:class:`registry.errors.MedftError`) print one line and exit with their documented code;
anything else is a bug and exits 1 with its traceback.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click

from job.inference import BASE_REF, DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MAX_SEED
from registry import logs
from registry.cli import registry_group, store_options
from registry.errors import MedftError, Preempted
from registry.names import ARTIFACTS

CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             help="YAML job config (see configs/). Defaults apply to missing keys.")
SET_OPTION = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override one key, e.g. --set train.max_steps=10 (repeatable).")
_VERBOSE_HELP = "On a terminal, also show the libraries' warnings and progress bars (JSON logs always keep them)."


def _verbose(_ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        logs.set_verbose(True)


# The commands that drive the libraries take --verbose after their name too (`medft train --verbose`).
VERBOSE_OPTION = click.option("--verbose", "-v", is_flag=True, expose_value=False, is_eager=True, callback=_verbose,
                              help=_VERBOSE_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="medft")
@click.option("--verbose", "-v", is_flag=True, help=_VERBOSE_HELP)
def cli(verbose: bool) -> None:
    """medft: fine-tune DeepSeek-R1-Distill models into medical reasoning assistants.

    \b
    stdout holds each command's result (summary, table, answer, JSON with --json);
    stderr holds logs, progress and errors (one line: medft: error: ...).
    Exit codes: 0 ok, 2 bad usage or config, 3 bad data, 4 not found, 5 access refused,
    75 transient (retry), 143 stopped by SIGTERM after a checkpoint, 1 a bug (with traceback).
    """
    logs.set_verbose(verbose)


@cli.command()
@CONFIG_OPTION
@SET_OPTION
@VERBOSE_OPTION
@click.option("--dry-run", is_flag=True,
              help="Resolve and validate everything, print the config and the plan; touch no GPU or store.")
@click.option("--nproc-per-node", "nproc", default="1", show_default=True, metavar="auto|N",
              help="Train one LoRA on N processes of this machine (data-parallel, under torch.distributed.run); "
                   "auto: one per visible CUDA GPU. Rows per optimizer step stay train.batch_size x "
                   "train.grad_accum, so train.grad_accum must divide by N.")
def train(config_path: str | None, overrides: tuple[str, ...], dry_run: bool, nproc: str) -> None:
    """Pull data and weights, fine-tune, evaluate, merge, publish and register one run."""
    from job import distributed, pipeline

    n = distributed.resolve_nproc(nproc)
    if n > 1 and not distributed.under_torchrun():
        from job.config import load_config

        distributed.check_config(load_config(config_path, overrides), n)  # exit 2 before any process starts
        if not dry_run:
            argv = ["train", *(["--config", config_path] if config_path else []),
                    *[arg for o in overrides for arg in ("--set", o)], *(["--verbose"] if logs.verbose() else [])]
            sys.exit(distributed.relaunch(n, argv))
    pipeline.run(config_path, overrides, dry_run=dry_run)


def _generation_options(fn):
    """Options shared by ``generate`` and ``chat``: which artifact, how to sample, where the registry is."""
    for option in reversed((
        click.option("--artifact", type=click.Choice(list(ARTIFACTS)), default="merged", show_default=True,
                     help="Load the merged weights, or the base model with the adapter applied."),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=DEFAULT_MAX_NEW_TOKENS,
                     show_default=True, help="Most tokens to generate for one answer (reasoning included)."),
        click.option("--temperature", type=click.FloatRange(min=0), default=DEFAULT_TEMPERATURE,
                     show_default=True, help="Sampling temperature; 0 means greedy decoding."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=DEFAULT_TOP_P,
                     show_default=True, help="Nucleus sampling threshold (unused when greedy)."),
        click.option("--seed", type=click.IntRange(0, MAX_SEED), default=None,
                     help="Seed the sampler for a reproducible answer."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text."),
        click.option("--trust-remote-code", "trust_remote_code", metavar="SHA", default=None,
                     help="Let a run folder's own model code run (auto_map, .py files): only for a run folder "
                          "URI whose base was pinned to this 40-hex commit sha; refused for registry refs. "
                          "Never taken from a record."),
        VERBOSE_OPTION,
    )):
        fn = option(fn)
    return store_options(fn)


@cli.command()
@click.argument("ref")
@click.option("--question", "-q", required=True, help="The question to ask.")
@click.option("--compare", "compare", metavar="REF2",
              help=f"Also answer with REF2, or '{BASE_REF}' for REF's base model (one model loaded at a time).")
@_generation_options
def generate(ref: str, question: str, compare: str | None, artifact: str, max_new_tokens: int, temperature: float,
             top_p: float, seed: int | None, as_json: bool, trust_remote_code: str | None, store_uri: str,
             registry_uri: str | None) -> None:
    """Answer one question with a registered version and show its reasoning and answer.

    \b
    REF is NAME (latest), NAME:VERSION, NAME@ALIAS or a run folder (s3://bucket/prefix/runs/ID or a path).
    --json prints {question, reasoning, answer, prompt_tokens, completion_tokens, seconds, ref,
    finish_reason}; with --compare, a list of two.
    """
    from job import inference

    sampling = inference.Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    inference.generate_command(ref, question, sampling=sampling, artifact=artifact, compare=compare,
                               store=store_uri, registry=registry_uri, as_json=as_json,
                               trust_remote_code=trust_remote_code)


@cli.command()
@click.argument("ref")
@_generation_options
def chat(ref: str, artifact: str, max_new_tokens: int, temperature: float, top_p: float, seed: int | None,
         as_json: bool, trust_remote_code: str | None, store_uri: str, registry_uri: str | None) -> None:
    """Ask a registered version one question after another; stop, exit or Ctrl-D ends it.

    \b
    Each line is a new question asked on its own (the model was trained single-turn). REF as for generate.
    --json prints one JSON object per answer, one per line.
    """
    from job import inference

    sampling = inference.Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    inference.chat_command(ref, sampling=sampling, artifact=artifact, store=store_uri, registry=registry_uri,
                           as_json=as_json, trust_remote_code=trust_remote_code)


@cli.command("eval")
@click.argument("ref", required=False)
@click.option("--base", metavar="URI", default=None,
              help="Score a base model instead of REF: hf://org/name, s3://..., a directory or a .gguf file.")
@click.option("--base-revision", metavar="REV", default=None, help="Hub revision of --base (pin a commit sha).")
@click.option("--template", default=None,
              help="Prompt template for --base [default: r1-medical] (a REF is asked with the template it was "
                   "trained with).")
@click.option("--benchmarks", default="medqa,medmcqa,pubmedqa", show_default=True,
              help="Comma-separated benchmarks: medqa, medmcqa, pubmedqa.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Questions per benchmark: a seeded subset, the same for every model (default: all).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
              help="Seed of the --limit subset and of every sampled answer.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Most tokens per answer, reasoning included; an answer cut off there counts as hit-limit.")
@click.option("--temperature", type=float, default=0.6, show_default=True,
              help="Sampling temperature (DeepSeek's advice for R1 models); 0 is greedy.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling (unused when greedy).")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Answers per question, each with its own seed; accuracy is their mean (needs --temperature > 0).")
@click.option("--samples-out", metavar="FILE", default=None,
              help="Write every answer (question id, sample, seed, completion, choice, gold, stop reason) to FILE as "
                   "JSONL.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most answers in flight; the engine sizes the number from free GPU memory below it.")
@click.option("--data", "data_files", multiple=True, metavar="BENCHMARK=FILE",
              help="Read a benchmark from a local .jsonl/.parquet file in its dataset's schema (repeatable).")
@click.option("--artifact", type=click.Choice(list(ARTIFACTS)), default="merged", show_default=True,
              help="For REF: the merged weights, or the base model with the adapter applied.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@VERBOSE_OPTION
@click.option("--record", is_flag=True,
              help="Store the answers beside REF's registry version and append the scores, naming them, to its "
                   "record, where `registry compare` and the alias gate check them (REF must be NAME, "
                   "NAME:VERSION or NAME@ALIAS).")
@click.option("--record-as", "record_as", default=None, metavar="NAME",
              help="With --base: record the base's scores as NAME@base, for `registry compare NAME@base NAME:N`.")
@store_options
def eval_cmd(ref: str | None, base: str | None, base_revision: str | None, template: str | None, benchmarks: str,
             limit: int | None, seed: int, max_new_tokens: int, temperature: float, top_p: float, samples: int,
             samples_out: str | None, batch_size: int, data_files: tuple[str, ...], artifact: str, as_json: bool,
             record: bool, record_as: str | None, store_uri: str, registry_uri: str | None) -> None:
    """Score a model on medical benchmarks: accuracy with a 95% interval, generative, sampled.

    \b
    REF is NAME, NAME:VERSION, NAME@ALIAS or a run folder; or give --base URI for a base model.
    Exit codes: 2 unknown benchmark or bad usage (--record without a registry ref, --samples > 1
    with --temperature 0), 3 a missing column or bad row, 4 a dataset, file or ref not found,
    5 a gated dataset without access, 75 the hub unreachable or --record outrun by concurrent
    updates (the scores are printed first).
    """
    from job.evals.command import eval_command

    eval_command(ref, base=base, base_revision=base_revision, template=template, benchmarks=benchmarks,
                 limit=limit, seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                 samples=samples, samples_out=samples_out, batch_size=batch_size, data_files=data_files,
                 artifact=artifact, store=store_uri, registry=registry_uri, as_json=as_json, record=record,
                 record_as=record_as)


@cli.group()
def data() -> None:
    """Inspect and validate training data."""


@data.command("validate")
@CONFIG_OPTION
@SET_OPTION
@VERBOSE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--tokenizer/--no-tokenizer", default=True,
              help="Measure token lengths with model.base's tokenizer (default; skipped if it cannot be had).")
def data_validate(config_path: str | None, overrides: tuple[str, ...], as_json: bool, tokenizer: bool) -> None:
    """Load, validate and tokenize the configured dataset and print its report (exit 3 on bad data)."""
    from job import data as data_stage
    from job import model
    from job.config import load_config

    logs.route_library_logs()  # the tokenizer comes through transformers, whose warnings then log as events
    cfg = load_config(config_path, overrides)
    loaded = data_stage.load_rows(cfg)  # bad data fails before any tokenizer is fetched
    report = data_stage.validate(cfg, model.tokenizer_for_report(cfg) if tokenizer else None, loaded=loaded)
    click.echo(report.to_json() if as_json else report.to_text())


cli.add_command(registry_group)


def _stop_on_sigterm(_signum: int, _frame: object) -> None:
    # Raised in the main thread wherever it is, as Ctrl-C is: downloads and uploads under way clean up what
    # they wrote on the way out (``medft train`` replaces this with its own checkpoint-then-stop handler).
    raise Preempted("stopped by SIGTERM; what was being written was removed, nothing half-written is kept")


@contextmanager
def _sigterm_ignored() -> Iterator[None]:
    # The process is leaving with its own error and exit code: a SIGTERM now (the handler above would raise
    # Preempted) would only replace them with a traceback.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the CLI, mapping expected failures to one line and an exit code."""
    logs.configure()
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        cli.main(args=argv, prog_name="medft", standalone_mode=False)
    except MedftError as e:
        with _sigterm_ignored():  # torchrun stops the other ranks when one fails: not a traceback over this line
            if not logs.readable():  # JSON logs keep the failure as an event; a person reads the one line below
                logs.get_logger("medft").error("failed", error=e.message, exit_code=e.exit_code)
            click.echo(f"medft: error: {logs.redact(e.message)}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("medft: aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:  # bare `medft` or `medft data`: the help is the answer
        e.show()
        sys.exit(2)
    except click.ClickException as e:
        # One line like every other refusal: click's usage block would bury the reason among option lists.
        command = e.ctx.command_path if isinstance(e, click.UsageError) and e.ctx else "medft"
        click.echo(f"medft: error: {command}: {' '.join(e.format_message().split())} "
                   f"(see '{command} --help')", err=True)
        sys.exit(2)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
