"""The benchmark's meter around medft's own collator: padding to a multiple counts only the real tokens."""

from benchmarks.meter import Meter
from job.train import TrainCollator


def _rows(*lengths: int) -> list[dict[str, list[int]]]:
    return [{"input_ids": list(range(1, n + 1)), "completion_mask": [1] * n} for n in lengths]


def test_padding_to_a_multiple_makes_recurring_widths_and_counts_only_real_tokens():
    meter = Meter(pad_to_multiple_of=64)
    collate = meter.wrap(TrainCollator(pad_token_id=0, padding_free=False))
    widths = [collate(_rows(*lengths))["input_ids"].shape[1] for lengths in ((515, 700), (590, 641), (900, 935))]
    assert widths == [704, 704, 960]
    assert meter.real == [1215, 1231, 1835]  # what the rows hold, not the padding
    assert meter.fed == [2 * 704, 2 * 704, 2 * 960]


def test_without_a_multiple_batches_pad_to_their_longest_row():
    meter = Meter()
    collate = meter.wrap(TrainCollator(pad_token_id=0, padding_free=False))
    assert collate(_rows(515, 700))["input_ids"].shape[1] == 700


def test_the_summary_keeps_every_step_compiling_ones_included():
    meter = Meter(warmup=2)
    meter.start, meter.step_end = 100.0, [130.0, 138.0, 138.5, 139.0]  # two compiling steps, then 0.5 s each
    meter.real, meter.fed = [10] * 4, [12] * 4
    summary = meter.summary(grad_accum=1)
    assert summary["step_seconds"] == [30.0, 8.0, 0.5, 0.5] and summary["train_seconds"] == 39.0
    assert summary["seconds_per_step"] == 0.5 and summary["timed_steps"] == 2  # the timing leaves them out
