"""What the data stage hands on: validated rows, the dataset's identity for lineage, the data report and the
tokenized examples. Plain dataclasses, with no behaviour beyond serialising and printing themselves."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

#: The three texts of a row, in order; ``data.columns`` maps each onto a column of the source.
FIELDS = ("question", "reasoning", "answer")
DROP_REASONS = ("duplicate", "too_long", "prompt_too_long")


@dataclass(frozen=True)
class Row:
    """One validated row; fields are stripped of surrounding whitespace, ``source_row`` is 1-based."""

    question: str
    reasoning: str
    answer: str
    source_row: int


@dataclass(frozen=True)
class DatasetIdentity:
    """What was trained on, for lineage: ``content_sha256`` hashes the rows ``load_rows`` returned.

    The hash covers the validated, deduplicated rows in order, as canonical JSON lines of
    ``[question, reasoning, answer]``, so it is the same whichever file format carried them.
    """

    source: str
    revision: str | None
    subset: str | None
    split: str | None
    rows: int
    content_sha256: str
    loaded_rows: int | None = None  # set by used_identity: what load_rows returned, before too-long drops
    loaded_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DataReport:
    """Rows read, kept and dropped by reason, truncations and (with a tokenizer) token-length statistics.

    ``token_stats`` maps ``prompt``, ``reasoning``, ``answer`` and ``total`` to ``min``, ``median``,
    ``p95`` and ``max``, measured before too-long handling, so it says which ``model.max_seq_length`` the
    data needs. ``total`` counts the whole training example (BOS to EOS). Prompt and total cover every
    row; reasoning and answer cover ``token_stats_rows`` evenly spaced rows (all of them up to
    :data:`STATS_SAMPLE_ROWS`).
    """

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncated: int = 0
    content_sha256: str | None = None
    template: str | None = None
    max_seq_length: int | None = None
    train_rows: int | None = None
    eval_rows: int | None = None
    token_stats: dict[str, dict[str, float]] | None = None
    token_stats_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def to_text(self) -> str:
        """A human-readable table, as ``medft data validate`` prints it."""
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items() if v) or "none"
        lines = [f"Data report: {self.source}",
                 f"  rows read        {self.rows_read}",
                 f"  rows kept        {self.rows_kept}",
                 f"  dropped          {dropped}",
                 f"  truncated        {self.truncated}"]
        if self.content_sha256:
            lines.append(f"  content sha256   {self.content_sha256}")
        if self.train_rows is not None:
            lines.append(f"  split            train {self.train_rows} / eval {self.eval_rows}")
        if self.template:
            lines.append(f"  template         {self.template} (max_seq_length {self.max_seq_length})")
        if self.token_stats is None:
            lines.append("  token lengths    not measured (no tokenizer given)")
        else:
            lines.append("")
            lines.append(f"  {'tokens':<12}{'min':>8}{'median':>9}{'p95':>8}{'max':>8}")
            for part, s in self.token_stats.items():
                lines.append(f"  {part:<12}{s['min']:>8g}{s['median']:>9g}{s['p95']:>8g}{s['max']:>8g}")
            measured = self.rows_read - self.dropped.get("duplicate", 0)
            if self.token_stats_rows is not None and self.token_stats_rows < measured:
                lines.append(f"  (reasoning and answer measured on {self.token_stats_rows} evenly spaced rows)")
        return "\n".join(lines)


@dataclass
class PreparedData:
    """Tokenized examples: ``{"input_ids": [...], "completion_mask": [...]}``, mask 1 = trained token."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    eval_rows: list[Row]
    report: DataReport
    used_rows: list[Row] = field(default_factory=list)  # every row kept (train and eval), in source order
