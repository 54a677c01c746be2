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
