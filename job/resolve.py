"""The resolve stage: run id, store and work dir, decided before any heavy work, and the config a run keeps.

The run's lease and fenced writes (:mod:`job.lifecycle`) start from the :class:`~job.lifecycle.Run` opened here.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from job.config import JobConfig
from job.lifecycle import Run, lease_seconds
from job.paths import cache_root, resolve_local
from registry.errors import ConfigError, DataError, NotFoundError
from registry.redact import redact_urls
from registry.runs import run_prefix
from registry.store import LocalStore, PreconditionFailed, Store, check_writable_dir, open_store
from registry.uris import parse_uri

#: Sections that define what is trained; a resumed run must keep them. Export and output may change.
TRAINING_SECTIONS = ("model", "data", "lora", "train")
#: Keys inside them that change what is reported, not what is trained: a resumed run may change them.
NOT_TRAINING = {("train", "report_to")}


def new_run_id(cfg: JobConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.output.model_name}-{stamp}-{secrets.token_hex(3)}"


def open_run(cfg: JobConfig) -> Run:
    """Fix the run id and open the store (no network call).

    Raises ConfigError for a bad store URI or MEDFT_LEASE_SECONDS (checked here so --dry-run shows it too), or a
    local store path that cannot hold files (AccessDeniedError where it may not be written).
    """
    lease_seconds()
    run_id = cfg.output.run_id or new_run_id(cfg)
    store = open_store(cfg.output.store)
    if isinstance(store, LocalStore):  # the job writes there: a place that cannot hold files fails now, exit 2/5
        check_writable_dir(store.root, "output.store")
    work_dir = cache_root() / "work" / run_id
    return Run(cfg=cfg, run_id=run_id, store=store, run_store=store.child(run_prefix(run_id)), work_dir=work_dir)


def _relative_note(uri: str) -> str:
    """For a relative plain path, where it was looked up from (the current directory); nothing otherwise."""
    relative = parse_uri(uri).scheme == "" and not Path(uri).expanduser().is_absolute()
    return f"; check the path (relative paths are from {Path.cwd()})" if relative else ""


def check_local_inputs(cfg: JobConfig) -> None:
    """Check that the local weights and benchmark files the config names exist, before anything is pulled:
    ``model.base`` and ``model.merge_base`` (a folder, a ``.gguf`` file or a ``pkg://`` file), and the
    ``eval.benchmark_sources.<name>.file`` of each benchmark in ``eval.benchmarks`` (``data.source`` is checked
    by :func:`job.data.check_source`).

    Relative paths are relative to the current working directory, as every path on the command line is (not to
    the config file's folder). Remote sources (``hf://``, ``ms://``, ``s3://``) are left to the pull. Raises
    NotFoundError (exit 4, as the pull would) naming the key and the path.
    """
    for key, uri in (("model.base", cfg.model.base), ("model.merge_base", cfg.model.merge_base)):
        if uri and (parse_uri(uri).is_local or parse_uri(uri).scheme == "pkg") and not resolve_local(uri).exists():
            raise NotFoundError(f"{key}: {uri}: no such file or directory{_relative_note(uri)}")
    for name in cfg.eval.benchmarks or ():
        source = cfg.eval.benchmark_sources.get(name)
        # exists(), not is_file(): a folder given there is bad data (exit 3), which the reader says.
        if source is not None and source.file and not resolve_local(source.file).expanduser().exists():
            raise NotFoundError(f"eval.benchmark_sources.{name}.file: {source.file}: no such file"
                                f"{_relative_note(source.file)}")


def record_config(run: Run, store: Store | None = None) -> None:
    """Store the resolved config with the run (through ``store``, the run's fenced store, when given); a
    restart must train the same thing.

    Raises ConfigError naming the first differing key when the run was started with another config,
    DataError when the stored one is corrupt.
    """
    # Stored without URL credentials; compared below the same way, so a resume still matches.
    text = yaml.safe_dump(redact_urls(run.cfg.to_dict()), sort_keys=False, allow_unicode=True).encode()
    try:
        (store or run.run_store).put_bytes("config.yaml", text, if_absent=True)
        return
    except PreconditionFailed:
        pass
    stored = _stored_config(run)
    current = redact_urls(run.cfg.to_dict())
    for section in TRAINING_SECTIONS:
        for key, value in current[section].items():
            if (section, key) in NOT_TRAINING:
                continue
            old = stored[section].get(key)
            if old != value and not (isinstance(old, list) and tuple(old) == tuple(value or ())):
                raise ConfigError(f"{section}.{key}: run {run.run_id} was started with {old!r}, not {value!r}; "
                                  "keep the original config to resume, or set a new output.run_id")


def _stored_config(run: Run) -> dict[str, Any]:
    """The run's stored config.yaml as a mapping of sections; DataError (exit 3) naming it when corrupt."""
    where = run.run_store.url("config.yaml")
    try:
        stored = yaml.safe_load(run.run_store.get_bytes("config.yaml")[0])
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DataError(f"{where} is not valid YAML ({str(e).splitlines()[0]}); the run's stored config is "
                        "corrupt: restore it, or set a new output.run_id") from None
    if not isinstance(stored, dict) or not all(isinstance(stored.get(s, {}), dict) for s in TRAINING_SECTIONS):
        raise DataError(f"{where} is not a mapping of config sections; the run's stored config is corrupt: "
                        "restore it, or set a new output.run_id")
    return {section: stored.get(section) or {} for section in TRAINING_SECTIONS}


