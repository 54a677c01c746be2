"""The whole-job benchmark on several ranks: rank 0's log read back, and the speed compared over steady steps."""

import json
from datetime import UTC, datetime, timedelta

from benchmarks.train import compare_ranks, parse_job_log

START = datetime(2026, 12, 6, 9, 0, tzinfo=UTC)


def _job_log(ranks: int, step_seconds: float, compile_seconds: float, losses: list[float]) -> str:
    """A ``medft train`` JSON log as its ranks write it: every rank logs every step; rank 0 counts the tokens."""
    lines = ["Unsloth: a line that is not JSON"]
    for step, loss in enumerate(losses, start=1):
        at = START + timedelta(seconds=compile_seconds * min(step, 2) + step_seconds * max(step - 2, 0))
        for rank in range(ranks):
            # Other ranks' losses differ (each sees its share of the rows); only rank 0's is the step's.
            lines.append(json.dumps({"step": step, "max_steps": len(losses), "loss": loss + rank, "lr": 2e-4,
                                     "event": "train.progress", "level": "info", "rank": rank,
                                     "timestamp": at.isoformat().replace("+00:00", "Z")}))
    for rank in range(ranks):
        lines.append(json.dumps({"steps": len(losses), "tokens_per_s": 1000.0 * (rank + 1),
                                 "event": "train.done", "rank": rank}))
    return "\n".join(lines)


def test_rank_0_alone_speaks_for_the_job():
    parsed = parse_job_log(_job_log(2, 0.5, 10.0, [2.0, 1.9, 1.8]))
    assert parsed["losses"] == {1: 2.0, 2: 1.9, 3: 1.8}
    assert parsed["train_tokens_per_s"] == 1000.0
    assert len(parsed["step_times"]) == 3


def test_two_ranks_are_compared_over_steady_steps_not_the_compiling_ones():
    losses = [2.0 - 0.01 * i for i in range(20)]
    one = {"nproc": 1, **parse_job_log(_job_log(1, 0.50, 15.0, losses))}
    two = {"nproc": 2, **parse_job_log(_job_log(2, 0.26, 15.0, [x + 0.002 for x in losses]))}
    (row,) = compare_ranks([one, two])
    # The compiling steps take 15 s on both; counted in, the ratio would be about 1.2, not 0.50 / 0.26.
    assert abs(row["speedup"] - 0.50 / 0.26) < 1e-6
    assert row["steps_compared"] == 20 and abs(row["max_loss_diff"] - 0.002) < 1e-9


def test_no_comparison_without_a_one_rank_job_that_trained():
    two = {"nproc": 2, **parse_job_log(_job_log(2, 0.26, 15.0, [2.0] * 10))}
    assert compare_ranks([two]) == []
    failed_one = {"nproc": 1, "exit_code": 1, "stage_seconds": {}}
    assert compare_ranks([failed_one, two]) == []


def test_whole_job_env_reaches_the_job_and_takes_name_value_pairs_only(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from benchmarks import train

    bad = CliRunner().invoke(train.command, ["--whole-job-env", "UNSLOTH_DECODE_CUDA_GRAPHS"], obj=[])
    assert bad.exit_code == 2 and "is not NAME=VALUE" in bad.output
    seen: list[tuple[list[str], dict[str, str]]] = []

    def run(args, log, timeout, env):  # the processes the benchmark would start, recorded instead
        seen.append((args, env))
        log.write_text("")
        return 0

    monkeypatch.setattr(train, "_subprocess", run)
    monkeypatch.setattr(train, "_prepare_model", lambda key, work, env, timeout: {
        "weights": str(tmp_path / "w"), "save_s": 0.0, "matmul_tflops": 1.0})
    ok = CliRunner().invoke(train.command, ["--models", "", "--whole-job", "tiny-llama",
                                            "--whole-job-env", "UNSLOTH_DECODE_CUDA_GRAPHS=1", "--whole-job-env", "A=b=c",
                                            "--work", str(tmp_path), "--out", str(tmp_path / "r.json")], obj=[])
    assert ok.exit_code == 0, ok.output
    job = [env for args, env in seen if "job.cli" in args]
    assert len(job) == 1 and job[0]["UNSLOTH_DECODE_CUDA_GRAPHS"] == "1" and job[0]["A"] == "b=c"
    assert json.loads((tmp_path / "r.json").read_text())["whole_job_env"] == ["UNSLOTH_DECODE_CUDA_GRAPHS=1", "A=b=c"]
