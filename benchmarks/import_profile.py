"""``python -m benchmarks.import_profile``: where ``import unsloth`` spends its time, as ``medft train`` imports it.

Runs :func:`job.backends.unsloth.import_unsloth` (medft's cache variables set first, as the job does) under
cProfile in a fresh interpreter and writes the functions with the most cumulative and the most own time, so
the 25-30 s a GPU job spends before its first stage can be attributed (issue 22). Needs a GPU and unsloth: the
import fails without them.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import click


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the report to this file")
@click.option("--top", type=click.IntRange(min=1), default=60, show_default=True, help="functions per table")
def main(out: Path | None, top: int) -> None:
    from job.backends.unsloth import import_unsloth

    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.runcall(import_unsloth)
    wall = time.perf_counter() - started
    text = io.StringIO()
    text.write(f"import_unsloth: {wall:.1f} s wall\n")
    for order in ("cumulative", "tottime"):
        text.write(f"\n=== by {order} ===\n")
        pstats.Stats(profile, stream=text).sort_stats(order).print_stats(top)
    sys.stdout.write(text.getvalue())
    if out is not None:
        out.write_text(text.getvalue())


if __name__ == "__main__":
    main()
