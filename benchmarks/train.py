"""``python -m benchmarks.train`` (``make bench``): medft's train stage against the reference recipe, on one GPU.

Random-init models with the real DeepSeek-R1-Distill architectures (:mod:`job.architectures`, built by
:mod:`benchmarks.models`) train on the
same synthetic rows, shaped like the medical reasoning data (question 40-110 tokens, reasoning 330-580,
answer 80-180, plus the prompt template: 515-935 tokens a row). Every arm runs in its own process, one
after the other, in one invocation:

* ``A``: transformers + peft + bitsandbytes 4-bit, SDPA, gradient checkpointing, padded micro-batches of
  2 x 4 accumulation (medft's ``hf`` backend through its train stage).
* ``B``: Unsloth with the reference recipe's exact settings: 4-bit, LoRA r=16/alpha=16 on all 7
  projections, gradient checkpointing ``"unsloth"``, padded micro-batches of 2 x 4, 8-bit AdamW, lr 2e-4,
  5 warmup steps, weight decay 0.01. ``padding_free=False`` is set because the recipe trains padded
  batches; ``B-auto`` leaves it unset, so this Unsloth release picks for itself (it turns padding-free on).
* ``C``: medft's own train stage (``select_backend`` -> ``plan`` -> ``load`` -> ``job.train.fit``) with its
  defaults (every ``auto`` resolved by the plan for the GPU found). The variants move one lever back each:
  ``C-4bit`` (4-bit weights), ``C-8bit`` (8-bit AdamW), ``C-qlora`` (both, the recipe's), ``C-log10``
  (a log line every 10 steps), ``C-mb2`` (micro-batch 2), ``C-packed`` (``train.packing=true``:
  padding-free), ``C-grouped`` (steps of similar-length rows, transformers' ``group_by_length`` sampler,
  injected by the benchmark), ``C-gc`` (``train.gradient_checkpointing=unsloth``) and ``C-mask`` (padded
  batches with their attention mask, which the train stage leaves out: see :class:`job.train.TrainCollator`).
  ``C-fp8`` loads the base in FP8 through Unsloth's ``load_in_fp8`` (a lever medft has no setting for: it
  ships only if it wins) over the plan for 16-bit weights, ``C-fp8-eager`` the same without Unsloth's
  per-block ``torch.compile`` (``train.compile=false``); run them with ``--max-seq-length 1024`` on an H100,
  where 16-bit 8B fits. ``C-graphs`` turns on Unsloth's per-block CUDA graphs, with batches padded to a
  multiple of 64 tokens so that few shapes recur (a lever for the host-bound 1.5B). Every C arm compiles the
  decoder blocks, as a long job does (``train.compile=true``); ``C-eager`` does not, as a short job does:
  each arm's ``step_seconds`` keeps every step, compiling ones included, to weigh what a short job saves.
  ``C-packed-eager`` is padding-free as a short job would run it, to set beside ``C-eager``.

Measured per arm, over the optimizer steps after ``--warmup`` (the first steps compile kernels): non-padding
tokens per second, seconds per optimizer step, tokens the model processed including padding, peak GPU memory
(PyTorch's allocator: allocated and reserved), and model FLOPs utilization: tokens/s x 4 x the parameters
outside the input embedding (:func:`benchmarks.models.train_flops_per_token`) over the bf16 rate that an
8192 x 8192 x 8192 matmul reaches on the same GPU in the same invocation.

``--row-tokens 2048`` makes every row exactly that long, the worst case the memory plan sizes a micro-batch
for: each medft arm's peak is then set beside the plan's estimate for the largest micro-batch it trained.

``--cap-gib 8`` repeats the chosen arms under ``torch.cuda.set_per_process_memory_fraction`` (the GPU
memory of the 16-24 GB cards the tutorials ran on, less what their display and CUDA context take), and
``--whole-job`` times the reference recipe's whole job (8B, 500 rows, 60 steps of 2 x 4, evaluation before
and after, merge, publish to a local store) with ``medft train``, after warming the caches;
``--whole-job-nproc 1,2`` runs it once per number of ranks (``medft train --nproc-per-node N``, data-parallel:
:mod:`job.distributed`) on the same machine and compares training speed and the loss of every step;
``--whole-job-env NAME=VALUE`` sets a variable for the job only (a library's switch to weigh, such as
``UNSLOTH_DECODE_CUDA_GRAPHS=0``, which turns off the decode graphs the job uses for its answers).

Results: a JSON file (``--out``), a markdown table on stdout, per-arm logs under ``--work``.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from benchmarks.arms import ARMS, run_arm, run_probe
from benchmarks.models import train_flops_per_token
from benchmarks.rows import full_length_rows, synthetic_records, synthetic_rows
from job import architectures

MODULE = "benchmarks.train"
PROG = f"python -m {MODULE}"


@dataclass(frozen=True)
class Options:
    """The command line's settings (``--help`` says what each is for)."""

    models: str
    arms: str
    steps: int
    warmup: int
    trace_steps: int
    rows: int
    row_tokens: int
    max_seq_length: int
    cap_gib: float
    cap_arms: str
    cap_models: str
    only_cap: bool
    whole_job: str
    whole_job_nproc: str
    whole_job_env: tuple[str, ...]
    probe: str
    arm_timeout: float
    whole_job_timeout: float
    work: str
    out: str


# ------------------------------------------------------------------------------------- orchestration

def _subprocess(args: list[str], log: Path, timeout: float, env: dict[str, str]) -> int:
    with log.open("w") as f:
        try:
            return subprocess.run(args, check=False, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=env).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[bench] killed after {timeout:.0f} s\n")
            return 124


def _tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(lines[-n:])


def _prepare_model(key: str, work: Path, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Write the random-init checkpoint and measure the matmul peak, in a subprocess (no CUDA here)."""
    out = work / f"prepare-{key}.json"
    dest = str(work / "weights" / key)
    code = ("import json, time\n"
            "from benchmarks.meter import matmul_peak_tflops\n"
            "from benchmarks.models import save_random_checkpoint\n"
            "from job.architectures import get\n"
            f"t = time.perf_counter(); d = save_random_checkpoint(get({key!r}), {dest!r})\n"
            "s = time.perf_counter() - t; p = matmul_peak_tflops()\n"
            f"json.dump({{'weights': str(d), 'save_s': s, 'matmul_tflops': p}}, open({str(out)!r}, 'w'))")
    log = work / "logs" / f"prepare-{key}.log"
    rc = _subprocess([sys.executable, "-c", code], log, timeout, env)
    if rc != 0:
        raise SystemExit(f"preparing {key} failed (exit {rc}):\n{_tail(log)}")
    return json.loads(out.read_text())


def parse_job_log(text: str) -> dict[str, Any]:
    """Stage times, plan and training speed from a ``medft train`` JSON log, complete or not."""
    out: dict[str, Any] = {"stage_seconds": {}}
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = event.get("event")
        if name == "stage.end":  # kept even when the job stops before run.done
            out["stage_seconds"][event.get("stage")] = event.get("seconds")
        elif name == "run.done":
            out["stage_seconds"] = event.get("stage_seconds") or out["stage_seconds"]
        elif name == "train.done" and event.get("rank", 0) == 0:  # rank 0 counts every rank's tokens
            out["train_tokens_per_s"] = event.get("tokens_per_s")
        elif name == "train.progress" and event.get("rank", 0) == 0:
            out.setdefault("losses", {})[event["step"]] = event.get("loss")
            out.setdefault("step_times", {})[event["step"]] = event.get("timestamp")
        elif name == "backend.plan":
            keys = ("batch_size", "grad_accum", "packing", "gradient_checkpointing", "load_in_4bit")
            out["plan"] = {k: event.get(k) for k in keys}
        elif name == "failed":
            out["error"] = event.get("error")
    return out


def steady_seconds_per_step(step_times: dict[int, str], skip: int = 5) -> float | None:
    """Seconds per optimizer step from rank 0's ``train.progress`` timestamps, leaving out the first ``skip``
    steps (compiling); None with fewer than two steps after them."""
    from datetime import datetime

    times = sorted((step, datetime.fromisoformat(t).timestamp()) for step, t in step_times.items() if step >= skip)
    if len(times) < 2:
        return None
    (first, t0), (last, t1) = times[0], times[-1]
    return (t1 - t0) / (last - first)


def compare_ranks(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each whole job on more than one rank against the one-rank job of the same invocation.

    ``speedup`` is the one rank's steady seconds per optimizer step over this job's (the rows of a step are the
    same on any number of ranks: :mod:`job.distributed`), so it leaves out the compiling first steps, which
    take as long on every rank count; ``max_loss_diff`` is the largest difference of one step's loss."""
    one = next((j for j in jobs if j.get("nproc") == 1), None)
    base = steady_seconds_per_step(one.get("step_times", {})) if one else None
    if one is None or base is None:
        return []
    out = []
    for job in jobs:
        if job.get("nproc", 1) == 1:
            continue
        mine = steady_seconds_per_step(job.get("step_times", {}))
        steps = set(one.get("losses", {})) & set(job.get("losses", {}))
        out.append({"nproc": job["nproc"], "speedup": base / mine if mine else None,
                    "seconds_per_step": mine, "one_rank_seconds_per_step": base, "steps_compared": len(steps),
                    "max_loss_diff": max((abs(one["losses"][s] - job["losses"][s]) for s in steps), default=None)})
    return out


def _whole_job(key: str, weights: str, work: Path, env: dict[str, str], timeout: float,
               nproc: int = 1) -> dict[str, Any]:
    """Time ``medft train`` on the recipe's whole job, its weights already pulled once (a warm cache), on
    ``nproc`` ranks (``--nproc-per-node``, only when more than one)."""
    arch = architectures.get(key)
    data = work / "whole-job-rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_records(arch, 500, seed=7)))
    log = work / "logs" / "whole-job-warm.log"
    warm = f"from job.model import pull_weights; pull_weights({weights!r}, None)"
    if _subprocess([sys.executable, "-c", warm], log, timeout, env) != 0:
        return {"error": "warming the weight cache failed", "log": _tail(log)}
    # The synthetic word tokenizer cannot give the template's English back, by design: no round-trip check.
    settings = [f"model.base={weights}", "model.backend=unsloth", "model.tokenizer_check=false",
                f"data.source={data}", "data.subset=null",
                "data.split=train", f"output.store={work / 'store'}", "output.model_name=bench",
                f"output.run_id=bench-{nproc}-{int(time.time())}"]
    args = [sys.executable, "-m", "job.cli", "train", *[x for s in settings for x in ("--set", s)],
            *(["--nproc-per-node", str(nproc)] if nproc > 1 else [])]
    log = work / "logs" / f"whole-job-{nproc}.log"
    started = time.perf_counter()
    rc = _subprocess(args, log, timeout, {**env, "MEDFT_LOG_FORMAT": "json"})
    out = {"nproc": nproc, "exit_code": rc, "wall_s": time.perf_counter() - started, "command": " ".join(args[1:]),
           **parse_job_log(log.read_text(errors="replace"))}
    if rc != 0:
        out["log"] = _tail(log, 40)
    return out


def table(results: list[dict[str, Any]]) -> str:
    """The results as a markdown table; ``x B`` is tokens/s over arm B's in the same run and memory cap."""
    head = ("| model | arm | cap GiB | tokens/s | s/step | x B | peak alloc GiB | plan's estimate GiB | "
            "peak reserved GiB | MFU | micro x accum | padding | load s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    base = {(r["model"], r.get("cap_gib")): r["tokens_per_s"] for r in results
            if r.get("arm") == "B" and "error" not in r}
    for r in results:
        cap = r.get("cap_gib") or "-"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['arm']} | {cap} | failed: {r['error']} |")
            continue
        ref = base.get((r["model"], r.get("cap_gib")))
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
        lines.append(
            f"| {r['model']} | {r['arm']} | {cap} | {r['tokens_per_s']:,.0f} | {r['seconds_per_step']:.3f} | "
            f"{ratio} | {r['peak_allocated_gib']:.2f} | {_gib(r.get('estimate_gib'))} | "
            f"{r['peak_reserved_gib']:.1f} | "
            f"{r.get('mfu', 0):.1%} | {r['micro_batch']} x {r['grad_accum']} | "
            f"{r['padding_share'] or 0:.0%} | {r['load_s']:.0f} |")
    return "\n".join(lines)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def arm_plan(models: list[str], arms: str, cap_gib: float, cap_models: str, cap_arms: str,
             only_cap: bool = False) -> list[tuple[str, str, float]]:
    """(model, arm, cap) in run order; an arm written ``model:arm`` runs on that model only."""
    plan: list[tuple[str, str, float]] = []
    if not only_cap:
        for m in models:
            for arm in filter(None, arms.split(",")):
                on, _, name = arm.rpartition(":")
                if on in ("", m):
                    plan.append((m, name, 0.0))
    if cap_gib:
        plan += [(m, arm, cap_gib) for m in cap_models.split(",")
                 for arm in filter(None, cap_arms.split(","))]
    return plan


def _run_arms(key: str, plan: list[tuple[str, str, float]], prep: dict[str, Any], rows_path: Path,
              a: Options, work: Path, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Run ``key``'s arms one process each, yielding each one's result as it finishes."""
    flops = train_flops_per_token(architectures.get(key))
    for model_key, arm, cap in [x for x in plan if x[0] == key]:
        tag = f"{arm}-{model_key}" + (f"-cap{cap:g}" if cap else "")
        spec = {"arm": arm, "model": model_key, "weights": prep["weights"], "rows": str(rows_path),
                "steps": a.steps, "warmup": a.warmup, "cap_gib": cap, "max_seq_length": a.max_seq_length,
                "work": str(work / "runs" / tag), "out": str(work / f"result-{tag}.json"),
                "trace_steps": a.trace_steps}
        log = work / "logs" / f"{tag}.log"
        rc = _subprocess([sys.executable, "-m", MODULE, "--run-arm", json.dumps(spec)], log,
                         a.arm_timeout, env)
        if rc == 0:
            r = json.loads(Path(spec["out"]).read_text())
            r["flops_per_token"] = flops
            r["mfu"] = r["tokens_per_s"] * flops / (prep["matmul_tflops"] * 1e12)
            print(f"[bench] {tag}: {r['tokens_per_s']:,.0f} tokens/s, {r['seconds_per_step']:.3f} s/step, "
                  f"peak {r['peak_allocated_gib']:.1f} GiB", flush=True)
        else:
            r = {"arm": arm, "model": model_key, "cap_gib": cap, "error": f"exit {rc}", "log": _tail(log, 40)}
            print(f"[bench] {tag}: FAILED ({r['error']})\n{r['log']}", flush=True)
        yield r


class Report:
    """The JSON report (``--out``), written after every arm so a run cut short still leaves what it measured."""

    def __init__(self, path: Path, command: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"command": command, "host": platform.node(), "results": [], "prepared": {},
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=2, default=str))


def _run_probes(a: Options, work: Path, env: dict[str, str], report: Report) -> None:
    """The memory probe (``--probe``) on each architecture named, one process each."""
    for key in filter(None, a.probe.split(",")):
        spec = {"model": key, "layers": 4, "tokens": [2048, 8192], "work": str(work / "weights"),
                "out": str(work / f"probe-{key}.json")}
        log = work / "logs" / f"probe-{key}.log"
        rc = _subprocess([sys.executable, "-m", MODULE, "--run-probe", json.dumps(spec)], log,
                         a.arm_timeout, env)
        found = (json.loads(Path(spec["out"]).read_text()) if rc == 0
                 else [{"model": key, "error": f"exit {rc}", "log": _tail(log)}])
        report.data.setdefault("probe", []).extend(found)
        report.save()


def _benchmark_model(key: str, plan: list[tuple[str, str, float]], a: Options, work: Path, env: dict[str, str],
                     report: Report) -> None:
    """Write ``key``'s checkpoint and rows, then run its arms in ``plan``."""
    prep = _prepare_model(key, work, env, a.arm_timeout)
    rows_path = work / f"rows-{key}.json"
    arch = architectures.get(key)
    rows = (full_length_rows(arch, a.rows, a.row_tokens, seed=1) if a.row_tokens
            else synthetic_rows(arch, a.rows, seed=1))
    rows_path.write_text(json.dumps(rows))
    report.data["prepared"][key] = {**prep, "rows": str(rows_path)}
    print(f"[bench] {key}: checkpoint in {prep['save_s']:.0f} s; 8192^3 bf16 matmul "
          f"{prep['matmul_tflops']:.0f} TFLOP/s", flush=True)
    report.save()
    for r in _run_arms(key, plan, prep, rows_path, a, work, env):
        report.data["results"].append(r)
        report.save()


def benchmark(a: Options, command: str) -> None:
    """Run the probe, every arm and the whole job that ``a`` asks for; print the table, write the report."""
    work = Path(a.work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "MEDFT_CACHE": os.environ.get("MEDFT_CACHE", str(work / "cache"))}
    report = Report(Path(a.out), command)
    _run_probes(a, work, env, report)
    models = [m for m in a.models.split(",") if m]
    plan = arm_plan(models, a.arms, a.cap_gib, a.cap_models, a.cap_arms, a.only_cap)
    needed = list(dict.fromkeys([m for m, _, _ in plan] + ([a.whole_job] if a.whole_job else [])))
    for key in needed:
        _benchmark_model(key, plan, a, work, env, report)
    if a.whole_job:
        weights = report.data["prepared"][a.whole_job]["weights"]
        jobs = report.data["whole_job"] = []
        job_env = {**env, **name_values(a.whole_job_env, "--whole-job-env")}
        report.data["whole_job_env"] = list(a.whole_job_env)
        for nproc in [int(n) for n in a.whole_job_nproc.split(",") if n]:
            jobs.append(_whole_job(a.whole_job, weights, work, job_env, timeout=a.whole_job_timeout, nproc=nproc))
            report.save()
            print(f"[bench] whole job, {nproc} rank(s):", json.dumps(jobs[-1], default=str)[:3000], flush=True)
        if len(jobs) > 1:
            report.data["whole_job_ranks"] = compare_ranks(jobs)
            report.save()
            print("[bench] ranks against one:", json.dumps(report.data["whole_job_ranks"]), flush=True)
    if report.data["results"]:
        print("\n" + table(report.data["results"]))
    report.save()


# ------------------------------------------------------------------------------------------ command line

def name_values(items: Iterable[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` items (environment for a process the benchmark starts) as a mapping; one without a name or
    an ``=`` is a usage error naming it and ``option``."""
    items = list(items)
    for item in items:
        if not item.partition("=")[0] or "=" not in item:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint=option)
    return dict(item.split("=", 1) for item in items)


def _checked_env(items: tuple[str, ...]) -> tuple[str, ...]:
    """``--whole-job-env``'s values, kept as given for the report once :func:`name_values` accepts them."""
    name_values(items, "--whole-job-env")
    return items


@click.command(help=__doc__.split("\n\n")[0],
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100,
                                 "show_default": True})
@click.option("--models", default="qwen1.5b,llama8b", help="architecture keys (job.architectures)")
@click.option("--arms", default="A,B,C", help=f"comma-separated, of {', '.join(ARMS)}; model:arm for one model only")
@click.option("--steps", type=int, default=15, help="optimizer steps per arm (8 rows each)")
@click.option("--warmup", type=int, default=3, help="first steps left out of the timing")
@click.option("--trace-steps", type=int, default=0,
              help="profile this many of the last warm-up steps of each arm (fewer than --warmup); the table of "
                   "ops by device time goes to result-<arm>-<model>.trace.txt under --work")
@click.option("--rows", type=int, default=512)
@click.option("--row-tokens", type=click.IntRange(min=0), default=0,
              help="every arm's rows exactly this long (e.g. 2048: the worst case the memory plan sizes for, "
                   "to set each arm's peak beside the plan's estimate); 0: rows shaped like the real data")
@click.option("--max-seq-length", type=int, default=2048)
@click.option("--cap-gib", type=float, default=0.0, help="also run --cap-arms on --cap-models, capped")
@click.option("--cap-arms", default="B,C")
@click.option("--cap-models", default="llama8b")
@click.option("--only-cap", is_flag=True, help="skip the uncapped arms")
@click.option("--whole-job", default="", help="architecture key to time the whole job on (e.g. llama8b)")
@click.option("--probe", default="", help="memory probe: architecture keys, e.g. llama8b,qwen1.5b")
@click.option("--arm-timeout", type=float, default=300)
@click.option("--whole-job-timeout", type=float, default=900)
@click.option("--whole-job-nproc", default="1", help="ranks to run the whole job on, each in turn, e.g. 1,2")
@click.option("--whole-job-env", multiple=True, callback=lambda ctx, param, value: _checked_env(value),
              help="NAME=VALUE set for the whole job only; repeatable")
@click.option("--work", default=lambda: os.environ.get("MEDFT_BENCH_WORK", "/tmp/medft-bench"),
              show_default="$MEDFT_BENCH_WORK or /tmp/medft-bench")
@click.option("--out", default="bench-results.json")
@click.option("--run-arm", "arm_spec", hidden=True)
@click.option("--run-probe", "probe_spec", hidden=True)
@click.pass_obj
def command(argv: list[str], arm_spec: str | None, probe_spec: str | None, **settings: Any) -> None:
    if arm_spec:
        run_arm(json.loads(arm_spec))
        return
    if probe_spec:
        run_probe(json.loads(probe_spec))
        return
    benchmark(Options(**settings), command=f"{PROG} " + " ".join(argv))


def main(argv: list[str] | None = None) -> None:
    """The command line on ``argv`` (default: this process's arguments); exits with its status."""
    args = list(argv if argv is not None else sys.argv[1:])
    command.main(args=args, prog_name=PROG, obj=args)


if __name__ == "__main__":
    main()
