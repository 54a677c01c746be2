"""The benchmark's step trace: profiled over the warm-up steps just before the timing starts, never inside it."""

from types import SimpleNamespace

import torch

from benchmarks.meter import Meter


def test_the_trace_covers_the_last_warmup_steps_and_names_the_ops(tmp_path):
    out = tmp_path / "trace.txt"
    meter = Meter(warmup=3, trace_steps=1, trace_out=out)
    timing = meter.callback()
    state = SimpleNamespace(max_steps=5, global_step=0)
    a = torch.randn(64, 64)
    for step in range(1, 6):
        state.global_step = step
        if step == 3:
            a @ a  # the one traced step's work
        else:
            a + a  # steps outside the trace
        timing.on_step_end(None, state, None)
        assert out.exists() == (step >= 3)  # written when the timing starts, not before
    table = out.read_text()
    assert "aten::mm" in table and "aten::add" not in table  # exactly the traced step, nothing around it
    assert len(meter.step_end) == 5


def test_no_trace_when_it_would_reach_into_the_timed_steps(tmp_path):
    out = tmp_path / "trace.txt"
    meter = Meter(warmup=2, trace_steps=2, trace_out=out)  # step 0 does not exist: the trace cannot fit
    timing = meter.callback()
    for step in range(1, 4):
        timing.on_step_end(None, SimpleNamespace(max_steps=3, global_step=step), None)
    assert meter.trace_steps == 0 and not out.exists()
