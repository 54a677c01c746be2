"""Names shared by the job, the registry and their command lines, each defined here once.

The pattern every model name, alias and run id must match, the artifact names a published run holds, the
benchmarks medft scores, and the store used when none is named.
"""

from __future__ import annotations

import re

from registry.errors import ConfigError

#: A model name, alias or run id: 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit.
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
NAME_RE = re.compile(rf"^{NAME}$")
#: The artifacts a run publishes, the one loaded by default first; ``gguf`` only with ``export.gguf``.
ARTIFACTS = ("merged", "adapter", "gguf")
#: The artifacts ``medft generate``, ``chat`` and ``eval`` load (with transformers); a GGUF runs in llama.cpp.
LOADABLE_ARTIFACTS = ("merged", "adapter")
#: The benchmarks medft scores (their specs: ``job.medical_benchmarks``), which ``--require`` may name.
BENCHMARK_NAMES = ("medqa", "medmcqa", "pubmedqa")
#: The store when neither ``--store``, ``output.store`` nor ``MEDFT_STORE`` names one.
DEFAULT_STORE = "./medft-store"


def check_name(name: str, what: str = "model name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting "
                          f"with a letter or digit")
    return name


def check_alias(alias: str) -> str:
    check_name(alias, "alias")
    if alias in ("latest", "base") or alias.isdigit() or re.fullmatch(r"v[0-9]+", alias):
        raise ConfigError(f"alias {alias!r} is reserved ('latest' is always the highest version, 'base' the base "
                          f"model's recorded scores; aliases must not look like version numbers)")
    return alias
