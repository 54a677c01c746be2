"""A failure on one rank, told to the others while the process group is up (:meth:`job.distributed.Ranks.group`).

An exception on one rank alone (a crash, or a MedftError the ranks did not agree on) leaves the others waiting
in a collective that rank never joins: gloo fails it only when the failed process exits and its connections
close; nccl does not fail it at all, so torchrun kills the waiting ranks later and their cleanup (rank 0
releasing the run's lease) never runs. So the rank that fails says so first (:func:`announce`: one
:class:`Failure`, its exit code and its line, under :data:`KEY` in torchrun's c10d store; the first rank to fail
wins), and every rank runs a :class:`Watcher` that polls the store for it and aborts the process group
(:func:`abort_group`) when it appears: the collective the rank waits in then raises, and
:meth:`~job.distributed.Ranks.group` turns that into one line naming the failed rank, and its exit code.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

from registry.errors import PERMANENT_EXIT_CODES
from registry.logs import get_logger
from registry.redact import redact_text

log = get_logger(__name__)

#: The store key holding the first failure (:meth:`Failure.encode`). torchrun makes a fresh store for every start
#: of the ranks.
KEY = "medft/rank_failed"
POLL_SECONDS = 1.0  # a failure stops the other ranks within about this long
_MAX_MESSAGE = 300  # characters of the exception's first line that go into the line


def failure_line(rank: int, where: str, exc: BaseException) -> str:
    """``rank R failed WHERE: ExceptionClass: first line of its message`` (redacted, at most one line)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the crash behind another
        text = ""
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) > _MAX_MESSAGE:
        first = first[:_MAX_MESSAGE] + "..."
    return redact_text(f"rank {rank} failed {where}: {type(exc).__name__}" + (f": {first}" if first else ""))


class Failure(NamedTuple):
    """The first rank's failure as every rank reads it: the exit code that rank leaves with (1 for a crash, a
    MedftError's own code) and its :func:`failure_line`."""

    exit_code: int
    line: str

    def encode(self) -> str:
        """``"<exit code>\t<line>"``: both in one store value, so that one compare_set sets the pair."""
        return f"{self.exit_code}\t{self.line}"

    @classmethod
    def decode(cls, value: bytes | str) -> Failure:
        """The inverse of :meth:`encode`; a value without a whole-number code before a tab is all line, exit 1."""
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        code, tab, line = text.partition("\t")
        if tab and code.strip().lstrip("-").isdigit():
            return cls(int(code), line)
        return cls(1, text)


def announce(store: Any, failure: Failure) -> Failure | None:
    """Put ``failure`` under :data:`KEY` unless a rank put its own there first; returns the failure that stands
    there (``failure`` itself when this rank was first), or None when the store cannot be reached. Raises
    nothing."""
    try:  # compare_set with an empty expected value sets only an absent key: one first failure, atomically
        return Failure.decode(store.compare_set(KEY, "", failure.encode()))
    except Exception as e:  # noqa: BLE001 - torchrun's store is gone: nobody is left to tell
        log.debug("distributed.announce_failed", error=str(e))
        return None


def stopped_message(first: Failure, rank: int, checkpoint: int | None) -> str:
    """What ``rank`` leaves with when another rank failed ``first``: its line, then how to go on (a code that
    retrying cannot cure, :data:`~registry.errors.PERMANENT_EXIT_CODES`, asks for the fix first)."""
    fix = " once that is fixed" if first.exit_code in PERMANENT_EXIT_CODES else ""
    resume = f" (step {checkpoint})" if checkpoint else ", if it has one"
    return (f"{first.line}; rank {rank} stopped with it. Rerun the same command{fix}: the run resumes from its "
            f"last checkpoint{resume}")


class Watcher:
    """A daemon thread that polls ``store`` for :data:`KEY` every ``poll`` seconds (a non-blocking ``check``)
    and, when a failure is there, records it in :attr:`failure`, then calls ``on_failure(failure)`` once.

    :meth:`stop` ends it (before the process group goes); it also ends by itself when the store cannot be
    reached (torchrun is stopping). It never blocks the process's exit.
    """

    def __init__(self, store: Any, on_failure: Callable[[Failure], None], poll: float = POLL_SECONDS) -> None:
        self.failure: Failure | None = None
        self._store, self._on_failure, self._poll = store, on_failure, poll
        self._stopped = threading.Event()
        self._lock = threading.Lock()  # on_failure never runs once stop() returned
        self._thread = threading.Thread(target=self._run, name="medft-rank-watch", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopped.wait(self._poll):
            try:
                if not self._store.check([KEY]):
                    continue
                failure = Failure.decode(self._store.get(KEY))
            except Exception as e:  # noqa: BLE001 - the store went away: nothing more can be announced
                log.debug("distributed.watch_ended", error=str(e))
                return
            with self._lock:
                if self._stopped.is_set():
                    return
                self.failure = failure
                log.warning("distributed.peer_failed", failure=failure.line, exit_code=failure.exit_code,
                            action="aborting the process group: this rank stops at once")
                self._on_failure(failure)
            return

    def stop(self) -> None:
        """End the thread; after this returns ``on_failure`` is not called. Waits for a running ``on_failure``
        (an abort takes milliseconds), never for a poll the store is slow to answer."""
        self._stopped.set()
        with self._lock:
            pass


def open_sockets() -> dict[int, str]:
    """This process's open sockets, ``{fd: "socket:[inode]"}`` (from ``/proc/self/fd``; empty without it)."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return {}
    found = {}
    for fd in fds:
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, or one closed meanwhile
            continue
        if link.startswith("socket:"):
            found[int(fd)] = link
    return found


def abort_group(backend: str, gloo_sockets: dict[int, str], keep_port: int | None) -> None:
    """Make every collective of this process's default process group, waiting or to come, raise. Raises
    nothing (an abort that fails leaves the rank to gloo's own error or torchrun's timeout, as before).

    nccl: ``torch.distributed.distributed_c10d._abort_process_group()`` (ncclCommAbort on every communicator;
    torch documents it for NCCL only). gloo has no abort (in torch 2.13 ``ProcessGroupGloo`` neither aborts nor
    shuts down a waiting collective, and ``destroy_process_group`` does not either: measured), so its
    connections to the other ranks, ``gloo_sockets`` (the sockets that ``init_process_group`` opened), are shut
    down: gloo then fails every operation on them as it does when a peer dies. The store's connection (the
    one on ``keep_port``) stays: the failure is read through it.
    """
    try:
        if backend == "nccl":
            import torch.distributed.distributed_c10d as c10d

            # ProcessGroupNCCL.abort() first tells its watchdog to stop (so a timeout does not also tear the
            # process down), then ncclCommAbort ends the kernels this rank waits in. Not yet run on GPUs here:
            # the tests run gloo on CPUs.
            c10d._abort_process_group()
        elif backend == "gloo":
            _shut_down(gloo_sockets, keep_port)
    except Exception as e:  # noqa: BLE001
        log.warning("distributed.abort_failed", backend=backend, error=str(e))


def _shut_down(sockets: dict[int, str], keep_port: int | None) -> None:
    for fd, link in sockets.items():
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != link:
                continue  # closed since, and the number reused by something else
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
                ports = {sock.getsockname()[1], sock.getpeername()[1]}  # a listening socket has no peer: OSError
                if keep_port not in ports:
                    # shutdown, not close: gloo's own thread still owns the descriptor and reads end-of-stream
                    sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()  # the descriptor stays gloo's


def store_port(store: Any) -> int | None:
    """The TCP port of the TCPStore under ``store`` (a chain of PrefixStores), or ``MASTER_PORT``; None if
    neither is known."""
    while store is not None and not hasattr(store, "port"):
        store = getattr(store, "underlying_store", None)
    if store is not None:
        return int(store.port)
    port = os.environ.get("MASTER_PORT", "")
    return int(port) if port.isdigit() else None
