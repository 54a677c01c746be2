"""A :class:`registry.progress.Progress` that records what work reported, for tests of the progress plumbing."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RecordedTask:
    description: str
    total: float | None
    unit: str
    in_bytes: bool
    done: float = 0
    advances: list[float] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def advance(self, amount: float = 1) -> None:
        with self._lock:
            self.done += amount
            self.advances.append(amount)

    def set_fields(self, **fields: Any) -> None:
        self.fields.update(fields)

    def close(self) -> None:
        self.closed = True

    def __enter__(self) -> RecordedTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingProgress:
    def __init__(self) -> None:
        self.tasks: list[RecordedTask] = []

    def task(self, description: str, *, total: float | None, unit: str = "it", done: float = 0,
             in_bytes: bool = False) -> RecordedTask:
        task = RecordedTask(description, total, unit, in_bytes, done)
        self.tasks.append(task)
        return task
