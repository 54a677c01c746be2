"""The one job configuration: a frozen pydantic model parsed once and passed down typed.

Sources, later wins: the defaults (each section's, in :mod:`job.config_sections`), the YAML file
(``--config``), ``--set a.b=c`` overrides (values parsed as YAML scalars), then the environment:
``MEDFT_<SECTION>__<KEY>`` for any key, plus the shortcuts ``MEDFT_STORE`` (output.store), ``MEDFT_REGISTRY``
(output.registry) and ``MEDFT_RUN_ID`` (output.run_id, which Kubernetes sets from the Job name). Any problem
raises :class:`ConfigError` (exit 2) naming the key and where its value came from: the file, ``--set KEY`` or
the environment variable. A key given twice in one YAML mapping is refused (YAML itself would keep the last
one silently).
"""

from __future__ import annotations

import difflib
import os
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, PrivateAttr, ValidationError

from job.config_sections import (  # noqa: F401 - re-exported: the sections' names are part of job.config
    ALL_PROJECTIONS,
    GGUF_K_QUANTS,
    ColumnsConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    TrainConfig,
    _Section,
    check_uri,
)
from job.config_yaml import parse_override, read_yaml_file
from registry.errors import ConfigError


class JobConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    export: ExportConfig = ExportConfig()
    output: OutputConfig = OutputConfig()
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)
    """dotted key -> where its value was last set (file path, ``--set KEY``, env variable); ``""``: the fallback."""

    def __eq__(self, other: object) -> bool:
        # Where the values came from is not part of the config: the same settings are the same config.
        if not isinstance(other, JobConfig):
            return NotImplemented
        return self.__dict__ == other.__dict__

    def __hash__(self) -> int:
        return hash(self.model_dump_json())

    def origin(self, key: str) -> str:
        """Where ``key``'s value came from, for error lines: the environment variable, ``--set KEY`` or the file.

        A section (``model``) names the source that set one of its keys last; a default names the config file.
        """
        return _origin_of(self._origins, key)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError (exit 2) for ``key``, naming where its value came from."""
        return ConfigError(f"{self.origin(key)}: {key}: {message}")

    @property
    def registry_uri(self) -> str:
        return self.output.registry or self.output.store.rstrip("/") + "/registry"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


_ENV_SHORTCUTS = {"MEDFT_STORE": "output.store", "MEDFT_REGISTRY": "output.registry",
                  "MEDFT_RUN_ID": "output.run_id"}


def _origin_of(origins: dict[str, str], key: str) -> str:
    parts = key.split(".")
    for n in range(len(parts), 0, -1):  # the key itself, else the section that holds it
        if (found := origins.get(".".join(parts[:n]))) is not None:
            return found
    inside = [where for k, where in origins.items() if k.startswith(key + ".")]  # kept in the order applied
    return inside[-1] if inside else origins.get("", "config")


def _note_origins(origins: dict[str, str], prefix: str, value: Any, where: str) -> None:
    """Record ``where`` for ``prefix`` and every key below it; re-inserted so dict order is the order applied."""
    origins.pop(prefix, None)
    origins[prefix] = where
    if isinstance(value, dict):
        for k, v in value.items():
            _note_origins(origins, f"{prefix}.{k}", v, where)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise ConfigError(f"{origin}: {dotted!r} is not a key; write section.key, e.g. train.learning_rate")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys[:-1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


# A rejected value is quoted in the error line, briefly: a YAML alias bomb would otherwise make it megabytes.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 2, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def _known_keys(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[str]:
    """Every dotted key a config may set (``train.max_steps``, ``data.columns.question``...), sections too."""
    keys = []
    for name, field in model.model_fields.items():
        dotted = prefix + name
        keys.append(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _known_keys(field.annotation, dotted + ".")
    return keys


def _nearest_key(key: str) -> str | None:
    """The known key an unknown ``key`` most likely meant: a typo within its section (``train.max_step``),
    else a key of the same name in another section (``max_steps``, ``lora.max_steps``), else None."""
    known = [k for k in _known_keys() if not key.startswith(k + ".")]  # never the key's own section
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    found = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    if found:
        return siblings[found[0]]
    anywhere = {k.rpartition(".")[2]: k for k in known if "." in k}
    found = difflib.get_close_matches(leaf, list(anywhere), n=1, cutoff=0.8)
    return anywhere[found[0]] if found else None


def _first_error(e: ValidationError, origins: dict[str, str]) -> ConfigError:
    err = e.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "(top level)"
    origin = _origin_of(origins, key) if err["loc"] else origins.get("", "config")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        nearest = _nearest_key(key)
        msg = (f"unknown key; did you mean {nearest}?" if nearest
               else "unknown key; see the configuration reference in README.md")
    elif "input" in err and err["type"] not in ("missing", "value_error"):
        msg = f"{msg} (got {_SHORT_REPR.repr(err['input'])})"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return ConfigError(f"{origin}: {key}: {msg}{more}")


def load_config(path: str | Path | None = None, overrides: tuple[str, ...] | list[str] = (),
                env: dict[str, str] | None = None) -> JobConfig:
    """Resolve the job configuration from its sources; raises ConfigError (exit 2) naming the key."""
    env = dict(os.environ) if env is None else env
    tree: dict[str, Any] = read_yaml_file(Path(path)) if path else {}
    origins: dict[str, str] = {"": str(path) if path else "config"}
    for k, v in tree.items():
        _note_origins(origins, str(k), v, str(path))

    def apply(dotted: str, value: Any, where: str) -> None:
        _set_dotted(tree, dotted, value, where)
        _note_origins(origins, dotted, value, where)

    for item in overrides:
        key, value = parse_override(item)
        apply(key, value, f"--set {key}")
    for name, value in sorted(env.items()):
        if name in _ENV_SHORTCUTS:
            apply(_ENV_SHORTCUTS[name], value, name)
        elif name.startswith("MEDFT_") and "__" in name:
            dotted = name.removeprefix("MEDFT_").lower().replace("__", ".")
            apply(dotted, parse_override(f"x={value}")[1], name)
    try:
        cfg = JobConfig.model_validate(tree)
    except ValidationError as e:
        raise _first_error(e, origins) from None
    cfg._origins.update(origins)
    return cfg
