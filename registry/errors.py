"""Expected failures and the exit codes the CLI maps them to.

Every failure a user can cause or fix (bad config, bad data, a missing bucket, refused credentials, a
flaky network) is raised as one of these, carrying a one-line message that names the key, file, row or
URI and says how to fix it; any URL in it loses its credentials (:func:`registry.redact.redact_text`). The
CLI prints that line and exits with the class's code; anything else is a bug and exits 1 with its traceback.
"""

from __future__ import annotations

from registry.redact import redact_text


class MedftError(Exception):
    """Base of every expected failure; ``exit_code`` is what the process exits with."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # A message often quotes a URL (an endpoint, a presigned link, a tracker): never its credentials.
        message = redact_text(message)
        super().__init__(message)
        self.message = message


class ConfigError(MedftError):
    """Invalid usage or configuration (exit 2)."""

    exit_code = 2


class DataError(MedftError):
    """Invalid input data, corrupt records or files failing their checksum (exit 3)."""

    exit_code = 3


class NotFoundError(MedftError):
    """Something named does not exist: model, dataset, file, bucket, registry entry (exit 4)."""

    exit_code = 4


class AccessDeniedError(MedftError):
    """Permission or credentials refused (exit 5)."""

    exit_code = 5


class TransientError(MedftError):
    """A failure worth retrying later: network, throttling, 5xx, disk full (exit 75, EX_TEMPFAIL)."""

    exit_code = 75


class ConflictError(MedftError):
    """Another writer got there first (a duplicate job with the same run id). Exits 75: retry later."""

    exit_code = 75


class Preempted(MedftError):
    """Stopped by SIGTERM after a checkpoint was saved (exit 143, as a signal death would report)."""

    exit_code = 143


#: The codes that mean "retrying will not help": Kubernetes fails the Job at once on these.
PERMANENT_EXIT_CODES = (ConfigError.exit_code, DataError.exit_code, NotFoundError.exit_code,
                        AccessDeniedError.exit_code)
