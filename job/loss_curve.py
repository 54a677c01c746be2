"""The run's loss curve: train loss per logged step and eval loss, drawn as ``loss.png`` beside each artifact's
model card, with the plotted numbers in ``loss.json`` so what the picture shows can be checked.

Eval loss is measured twice, on the base model before training (step 0) and on the trained one after it (the
last step), so it appears as two points, not a curve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

IMAGE = "loss.png"
SERIES = "loss.json"


def _finite(value: Any) -> float | None:
    """A loss as a float, or None where there is none or it is NaN/inf (plotted as a gap, stored as null)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(loss_history: list[dict[str, float]], eval_before: float | None, eval_after: float | None,
           steps: int) -> dict[str, Any]:
    """What the picture plots: ``train`` (step, loss) per logged step, ``eval`` the before/after points."""
    evals = [(0, eval_before), (steps, eval_after)]
    return {
        "train": [{"step": int(h["step"]), "loss": _finite(h["loss"])} for h in loss_history],
        "eval": [{"step": step, "loss": _finite(loss)} for step, loss in evals if _finite(loss) is not None],
        "eval_per_step": False,
    }


def write(curve: dict[str, Any], dest_dirs: Iterable[Path]) -> None:
    """Write ``loss.png`` and ``loss.json`` for ``curve`` (from :func:`series`) into every directory of ``dest_dirs``.

    Drawn with matplotlib's Agg backend (no display needed) and without a timestamp, so the same curve gives the
    same file. Raises OSError from the writes (the caller maps a full disk to a transient error).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(fig)  # Agg explicitly: no pyplot, no global backend, no display
    ax = fig.add_subplot()
    train = [(p["step"], p["loss"]) for p in curve["train"] if p["loss"] is not None]
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], marker="." if len(train) < 50 else None,
                label="train loss (per logged step)")
    if curve["eval"]:
        ax.scatter([p["step"] for p in curve["eval"]], [p["loss"] for p in curve["eval"]], color="tab:orange",
                   zorder=3, label="eval loss (before and after training)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if train or curve["eval"]:
        ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    text = json.dumps(curve, indent=2)
    for dest in dest_dirs:
        fig.savefig(Path(dest) / IMAGE, format="png", metadata={"Software": None})
        (Path(dest) / SERIES).write_text(text)
