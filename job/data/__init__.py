"""The data stage: medical chain-of-thought rows in, the exact tokens and loss mask to learn out.

``load_rows`` reads ``data.source`` (a hub dataset, an object in S3 or a local JSON list, JSONL, Parquet or
CSV file), maps ``data.columns`` onto question/reasoning/answer, validates every row and drops exact
duplicates. ``prepare`` formats rows with ``data.template``, tokenizes them, handles rows longer than
``model.max_seq_length`` and splits train from eval. ``validate`` is ``medft data validate``.

Bad input fails before any model is loaded, with one line naming the file, the row and the field:
:class:`DataError` (exit 3) for unreadable, empty, binary, truncated, badly encoded or malformed files,
missing columns, wrong types and empty fields; :class:`NotFoundError` (exit 4) for a missing file or
dataset. Rows are 1-based data-row indices (a CSV header is not a row; blank JSONL lines are not rows).

The package, by responsibility (each module depends only on those above it):

* :mod:`job.data.results`: the dataclasses handed on (:class:`Row`, :class:`DatasetIdentity`,
  :class:`DataReport`, :class:`PreparedData`).
* :mod:`job.data.rows`: raw records to validated rows, duplicates and the content hash.
* :mod:`job.data.json_list` and :mod:`job.data.readers`: file formats to records, streamed.
* :mod:`job.data.sources`: ``hf://``, ``s3://`` and local sources (:func:`load_rows`), lineage.
* :mod:`job.data.examples`: rows to tokenized examples (:func:`prepare`) and :func:`validate`.
"""

from job.data.examples import prepare, split_indices, validate
from job.data.results import DROP_REASONS, FIELDS, DataReport, DatasetIdentity, PreparedData, Row
from job.data.sources import check_source, load_rows, used_identity

__all__ = [
    "check_source",
    "DROP_REASONS",
    "FIELDS",
    "DataReport",
    "DatasetIdentity",
    "PreparedData",
    "Row",
    "load_rows",
    "prepare",
    "split_indices",
    "used_identity",
    "validate",
]
