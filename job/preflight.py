"""Checks of the job config that need transformers, peft or the base model's config.json.

They run before any weights move (and under ``--dry-run``), so a value that would only crash once the model is
loaded fails at once with one line instead: an optimizer or schedule transformers does not know or cannot run
in this job, and LoRA target modules the model does not have. Each raises :class:`registry.errors.ConfigError`
(exit 2) through :meth:`job.config.JobConfig.error`, which names the key and where its value came from (the
config file, ``--set KEY`` or the environment variable).

The target-module check builds the model from its config.json on the ``meta`` device (shapes only, no memory,
no weights) and asks peft to inject each target into it, so the rule applied is peft's own. Remote code is
never run for it: an architecture transformers does not ship is left to the load stage.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
from pathlib import Path
from typing import Any

from job.config import JobConfig
from job.paths import cache_root, resolve_local
from registry.logs import get_logger
from registry.uris import parse_uri

log = get_logger(__name__)

#: What a config may name for ``train.optim`` beyond transformers' optimizer names.
AUTO = "auto"


def _close(value: str, names: list[str]) -> str:
    near = difflib.get_close_matches(value, names, n=3, cutoff=0.6)
    return f"did you mean {' or '.join(near)}? " if near else ""


def check_optimizer(cfg: JobConfig) -> None:
    """``train.optim`` is ``auto`` or one of transformers' ``OptimizerNames``; raises ConfigError otherwise."""
    from transformers.training_args import OptimizerNames

    names = [o.value for o in OptimizerNames]
    if cfg.train.optim != AUTO and cfg.train.optim not in names:
        raise cfg.error("train.optim", f"unknown optimizer {cfg.train.optim!r}; {_close(cfg.train.optim, names)}"
                        f"use auto or a transformers optimizer name ({', '.join(names[:4])}, ... "
                        f"{len(names)} in transformers.training_args.OptimizerNames)")


def check_scheduler(cfg: JobConfig) -> None:
    """``train.scheduler`` is a transformers ``SchedulerType`` that this job can run; raises ConfigError otherwise.

    Beyond the name, transformers' own ``get_scheduler`` decides, on a one-parameter optimizer: it refuses
    schedules that need ``lr_scheduler_kwargs`` (which the config cannot set), and a schedule whose ``step``
    needs an evaluation metric (reduce_lr_on_plateau, greedy) cannot run because the trainer runs without an
    evaluation strategy (medft evaluates in its own stage; transformers refuses the pair when the trainer
    starts). ``TrainingArguments`` is not built here: building one initializes accelerate's process-wide
    device state, which the real trainer must set.
    """
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    name = cfg.train.scheduler
    names = [s.value for s in SchedulerType]
    if name not in names:
        raise cfg.error("train.scheduler", f"unknown schedule {name!r}; {_close(name, names)}use one of "
                        f"{', '.join(names)}")
    fix = "use linear, cosine, constant_with_warmup or another schedule that needs no evaluation or lr_scheduler_kwargs"
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.learning_rate)
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else 1000
    try:
        schedule = get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=steps)
    except (ValueError, TypeError) as e:
        raise cfg.error("train.scheduler", f"{name!r} cannot run in this job ({str(e).splitlines()[0]}); "
                        f"{fix}") from None
    needs = [p.name for p in inspect.signature(schedule.step).parameters.values()
             if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if needs:
        raise cfg.error("train.scheduler", f"{name!r} steps on an evaluation metric ({type(schedule).__name__}.step "
                        f"needs {', '.join(needs)}), and the trainer runs without an eval strategy; {fix}")


def local_config_json(cfg: JobConfig) -> Path | None:
    """model.base's config.json when it is on this machine already (a directory, or the hub cache); else None.

    Nothing is downloaded: a base that is not here yet is checked after the pull stage instead.
    """
    base = cfg.model.base
    location = parse_uri(base)
    if location.scheme == "hf":
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(location.path, "config.json", revision=cfg.model.revision,
                                       cache_dir=os.environ.get("HF_HUB_CACHE") or cache_root() / "hf")
        return Path(found) if isinstance(found, str) else None
    if location.scheme not in ("", "file", "pkg"):
        return None  # s3://, ms://: its config arrives with the pull
    try:
        path = resolve_local(base) / "config.json"
    except Exception:  # noqa: BLE001 - an uninstalled pkg:// is reported by the pull stage, with its own line
        return None
    return path if path.is_file() else None


def _meta_model(config_json: Path) -> Any | None:
    """The model config.json describes, built on the meta device (no weights, no memory); None if it needs code."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(config_json.parent), trust_remote_code=False)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        # An architecture transformers lacks (remote code) or a config it cannot read: the load stage decides.
        log.warning("preflight.target_modules_unchecked", config=str(config_json),
                    reason=f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None


def check_target_modules(cfg: JobConfig, config_json: Path) -> None:
    """Every name in ``lora.target_modules`` matches a module of the model that LoRA can adapt.

    Not checked with ``model.trust_remote_code``: the repo's own code defines the modules then, and it is not run.

    peft itself only fails when no name matches, and silently skips the rest; a misspelt name would train
    fewer modules than configured. Raises ConfigError naming the first target that matches nothing or
    names a module peft cannot adapt, with the model's linear layers as the fix.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from torch import nn

    if cfg.model.trust_remote_code:
        # The model trained is the hub repo's own code, which is not run here; transformers' built-in class
        # for the same model_type may name its modules differently.
        log.info("preflight.target_modules_unchecked", config=str(config_json), reason="model.trust_remote_code")
        return
    probe = _meta_model(config_json)
    if probe is None:
        return
    arch = type(probe).__name__
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in probe.named_modules() if isinstance(m, nn.Linear)})
    hint = f"{arch}'s linear layers are: {', '.join(linear)}"
    for target in cfg.lora.target_modules:
        model = _meta_model(config_json)
        try:
            inject_adapter_in_model(LoraConfig(target_modules=[target], r=cfg.lora.r, lora_alpha=cfg.lora.alpha),
                                    model)
        except ValueError:  # peft's NoMatchingPeftModuleError is a ValueError too
            matched = [type(m).__name__ for n, m in model.named_modules() if n == target or n.endswith("." + target)]
            problem = (f"{target!r} names {matched[0]}, which LoRA cannot adapt" if matched
                       else f"{target!r} matches no module of {arch}")
            raise cfg.error("lora.target_modules", f"{problem} (model.base config {config_json}); {hint}") from None
        except Exception as e:  # noqa: BLE001 - a meta model some peft path cannot handle: leave it to the load
            log.warning("preflight.target_modules_unchecked", target=target, reason=f"{e.__class__.__name__}: {e}")
            return
    log.info("preflight.target_modules", model=arch, targets=list(cfg.lora.target_modules))


def check(cfg: JobConfig) -> bool:
    """Everything checkable before weights move: optimizer, schedule, and target modules when the base's
    config.json is already here. Returns whether the target modules were checked (if not, call
    :func:`check_target_modules` after the pull, before the load)."""
    check_optimizer(cfg)
    check_scheduler(cfg)
    config_json = local_config_json(cfg)
    if config_json is not None:
        check_target_modules(cfg, config_json)
    return config_json is not None
