"""The resolve stage: run id, store and work dir, decided before any heavy work, and the config a run keeps.

The run's lease (:mod:`job.lifecycle`) starts from the :class:`~job.lifecycle.Run` opened here.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone

import yaml

from job.config import JobConfig
from job.lifecycle import Run
from job.paths import cache_root
from registry.errors import ConfigError
from registry.logs import get_logger
from registry.runs import run_prefix
from registry.store import PreconditionFailed, open_store

log = get_logger(__name__)

#: Sections that define what is trained; a resumed run must keep them. Export and output may change.
TRAINING_SECTIONS = ("model", "data", "lora", "train")


def new_run_id(cfg: JobConfig) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.output.model_name}-{stamp}-{secrets.token_hex(3)}"



def open_run(cfg: JobConfig) -> Run:
    """Fix the run id and open the store (no network call). Raises ConfigError for a bad store URI."""
    run_id = cfg.output.run_id or new_run_id(cfg)
    store = open_store(cfg.output.store)
    work_dir = cache_root() / "work" / run_id
    return Run(cfg=cfg, run_id=run_id, store=store, run_store=store.child(run_prefix(run_id)), work_dir=work_dir)


def record_config(run: Run) -> None:
    """Store the resolved config with the run; a restart must train the same thing.

    Raises ConfigError naming the first differing key when the run was started with another config.
    """
    text = run.cfg.to_yaml().encode()
    try:
        run.run_store.put_bytes("config.yaml", text, if_absent=True)
        return
    except PreconditionFailed:
        pass
    stored = yaml.safe_load(run.run_store.get_bytes("config.yaml")[0])
    current = run.cfg.to_dict()
    for section in TRAINING_SECTIONS:
        for key, value in current[section].items():
            old = stored.get(section, {}).get(key)
            if old != value and not (isinstance(old, list) and tuple(old) == tuple(value or ())):
                raise ConfigError(f"{section}.{key}: run {run.run_id} was started with {old!r}, not {value!r}; "
                                  "keep the original config to resume, or set a new output.run_id")
