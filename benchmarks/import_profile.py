"""``python -m benchmarks.import_profile``: where ``import unsloth`` spends its time, as ``medft train`` imports it.

Runs :func:`job.backends.unsloth.import_unsloth` (medft's cache variables set first, as the job does) under
cProfile in a fresh interpreter and writes the functions with the most cumulative and the most own time, so
the 25-30 s a GPU job spends before its first stage can be attributed (issue 22). Needs a GPU and unsloth: the
import fails without them.

``--time ARM`` (repeatable) instead times the import without the profiler, in a fresh interpreter per try, the
arms taking turns ``--repeat`` times so that a warming page cache favours none: an arm is a space-separated
list of ``NAME=VALUE`` set for its interpreter (an import switch to weigh), ``-`` for none.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

import click

from benchmarks.train import name_values

_TIMED = ("import time; t = time.perf_counter(); from job.backends.unsloth import import_unsloth; import_unsloth(); "
          "print(time.perf_counter() - t)")


def _arm_env(arm: str) -> dict[str, str]:
    """``arm``'s variables (``NAME=VALUE ...``, ``-`` for none); a malformed one is a usage error naming it."""
    return name_values([] if arm.strip() in ("", "-") else arm.split(), "--time")


def time_imports(arms: tuple[str, ...], repeat: int) -> list[dict[str, object]]:
    """Each arm's import in a fresh interpreter, the arms taking turns ``repeat`` times: the import's own
    seconds and the interpreter's whole wall time (start, medft's and torch's imports, exit)."""
    results = []
    for attempt in range(repeat):
        for arm in arms:
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _TIMED], env={**os.environ, **_arm_env(arm)},
                                  capture_output=True, text=True, check=False)
            wall = time.perf_counter() - started
            lines = done.stdout.strip().splitlines()
            result: dict[str, object] = {"arm": arm, "attempt": attempt, "wall_s": round(wall, 2)}
            if done.returncode == 0 and lines:
                result["import_s"] = round(float(lines[-1]), 2)
            else:
                result["error"] = f"exit {done.returncode}: {done.stderr.strip()[-500:]}"
            click.echo(json.dumps(result))
            results.append(result)
    return results


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the report to this file")
@click.option("--top", type=click.IntRange(min=1), default=60, show_default=True, help="functions per table")
@click.option("--time", "arms", multiple=True,
              help="time the import instead of profiling it, once per arm: NAME=VALUE ... set for it, - for none")
@click.option("--repeat", type=click.IntRange(min=1), default=2, show_default=True, help="turns of the --time arms")
def main(out: Path | None, top: int, arms: tuple[str, ...], repeat: int) -> None:
    if arms:
        for arm in arms:
            _arm_env(arm)  # a usage error before any interpreter starts
        results = time_imports(arms, repeat)
        if out is not None:
            out.write_text(json.dumps(results, indent=2))
        if any("error" in r for r in results):
            raise SystemExit(1)
        return
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
