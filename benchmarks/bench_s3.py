"""Upload/download throughput against a local moto server: boto3 defaults vs medft's store, side by side.

A benchmark, not a test::

    .venv/bin/python -m benchmarks.bench_s3 --size-mib 2048

It starts ``moto_server`` as a child process on 127.0.0.1 (its own process, so the server does not share
the client's GIL), writes one file of random bytes, then for each contender uploads it and downloads it
back, ``--repeat`` times, deleting the object between rounds:

* ``boto3-default``: ``client.upload_file`` / ``client.download_file`` with boto3's default
  ``TransferConfig`` (8 MiB parts and threshold, 10 threads) and default client config. No checksum of
  its own.
* ``medft``: :meth:`Store.put_file` (sha256 computed while reading, create-only off, Content-MD5 per part)
  and :meth:`Store.get_file` (parallel ranged GETs pinned to the ETag, sha256 verified), with
  ``TransferSettings`` from the environment / flags (64 MiB parts, 8 threads by default).

Each result is the wall time of one whole transfer, as MiB/s. Nothing here talks to anything but
127.0.0.1. Note that moto answers every ranged GET by reading the whole object into memory and slicing
it, so download time on moto grows with (number of ranges x object size): it measures moto as much as the
client. ``--skip boto3-default:download`` leaves out a phase that is too slow to wait for.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from registry.store import TransferSettings

MiB = 1024**2
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **ENV})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)  # loopback only
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def write_random(path: Path, size: int) -> None:
    chunk = os.urandom(64 * MiB)  # distinct enough: moto does not deduplicate, disks do not compress
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


def boto3_client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


def run(size: int, repeat: int, workdir: Path, skip: set[str], part_mib: int | None,
        concurrency: int | None) -> dict[str, Any]:
    from registry.store import TransferSettings, open_store, sha256_file

    os.environ.update(ENV)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    proc, endpoint = start_moto()
    os.environ["MEDFT_S3_ENDPOINT_URL"] = endpoint
    results: dict[str, dict[str, list[float]]] = {}
    try:
        client = boto3_client(endpoint)
        client.create_bucket(Bucket="bench")
        src = workdir / "src.bin"
        t0 = time.monotonic()
        write_random(src, size)
        digest = sha256_file(src)
        print(f"# wrote {size / MiB:.0f} MiB test file in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        kw: dict[str, Any] = {}
        if part_mib:
            kw["part_size"] = part_mib * MiB
        if concurrency:
            kw["concurrency"] = concurrency
        settings = TransferSettings(**{**TransferSettings.from_env().__dict__, **kw})
        store = open_store("s3://bench/medft", transfer=settings)
        contenders = {
            "boto3-default": (lambda key: client.upload_file(str(src), "bench", key),
                              lambda key, dest: client.download_file("bench", key, str(dest))),
            "medft": (lambda key: store.put_file(key.removeprefix("medft/"), src),
                      lambda key, dest: store.get_file(key.removeprefix("medft/"), dest, sha256=digest)),
        }
        for r in range(repeat):
            order = list(contenders.items())
            for name, (up, down) in (order if r % 2 == 0 else order[::-1]):  # alternate who goes first
                key = f"medft/{name}-{r}.bin"
                res = results.setdefault(name, {"upload": [], "download": []})
                if f"{name}:upload" in skip:
                    client.upload_file(str(src), "bench", key)  # still needed for the download
                else:
                    t = time.monotonic()
                    up(key)
                    res["upload"].append(time.monotonic() - t)
                    print(f"# {name} upload {r + 1}/{repeat}: {res['upload'][-1]:.1f}s", file=sys.stderr)
                if f"{name}:download" not in skip:
                    dest = workdir / f"dl-{name}.bin"
                    t = time.monotonic()
                    down(key, dest)
                    res["download"].append(time.monotonic() - t)
                    print(f"# {name} download {r + 1}/{repeat}: {res['download'][-1]:.1f}s", file=sys.stderr)
                    if sha256_file(dest) != digest:
                        raise RuntimeError(f"{name} downloaded a different file")
                    dest.unlink()
                client.delete_object(Bucket="bench", Key=key)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return summary(size, repeat, load_before, settings, results)


def summary(size: int, repeat: int, load_before: str, settings: TransferSettings,
            results: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The run's record: settings, machine, seconds per transfer and median MiB/s per contender and phase."""
    return {
        "size_mib": size / MiB, "repeat": repeat, "load_before": load_before, "endpoint": "moto_server on 127.0.0.1",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "medft_settings": {"part_size_mib": settings.part_size / MiB, "concurrency": settings.concurrency},
        "seconds": results,
        "mib_per_s": {n: {p: round(size / MiB / statistics.median(v), 1) if v else None for p, v in d.items()}
                      for n, d in results.items()},
    }


def to_markdown(res: dict[str, Any]) -> str:
    head = (f"{res['size_mib']:.0f} MiB file, {res['endpoint']}, {res['machine']}, median of {res['repeat']} "
            f"(medft: {res['medft_settings']['part_size_mib']:.0f} MiB parts, "
            f"{res['medft_settings']['concurrency']} threads); load average before: {res['load_before']}.")
    lines = [head, "",
             "| contender | upload MiB/s | download MiB/s | upload s | download s |", "|---|---|---|---|---|"]
    for name, d in res["seconds"].items():
        rate = res["mib_per_s"][name]

        def cell(v: float | None) -> str:
            return "skipped" if v is None else f"{v}"

        secs = {p: (f"{statistics.median(v):.1f}" if v else "-") for p, v in d.items()}
        lines.append(f"| {name} | {cell(rate['upload'])} | {cell(rate['download'])} | {secs['upload']} | "
                     f"{secs['download']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_s3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=2048, help="file size in MiB (default 2048 = 2 GiB)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=None, help="where the test files go (default: a temp dir)")
    ap.add_argument("--part-mib", type=int, default=None, help="medft part size (default from environment/64)")
    ap.add_argument("--concurrency", type=int, default=None, help="medft threads (default from environment/8)")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME:PHASE",
                    help="leave out a phase, e.g. boto3-default:download (repeatable)")
    ap.add_argument("--json", action="store_true", help="print the raw result as JSON too")
    args = ap.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="medft-bench-", dir=args.workdir))
    try:
        res = run(args.size_mib * MiB, args.repeat, workdir, set(args.skip), args.part_mib, args.concurrency)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(to_markdown(res))
    if args.json:
        print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
