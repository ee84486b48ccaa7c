"""Soak: N drives through ``roadstream supervise --processes``; memory sampled over time.

A private ``redis-server`` (``run``'s: Unix socket, ``maxmemory``, ``noeviction``) and one
``supervise ingest=I detect=1 fuse=1 --processes`` over it; ``--drives`` generated
three-camera drives are submitted at once (backpressure holds ingest). Every
``--interval`` seconds it samples Redis ``used_memory``, the total entries of every stream,
the blob keys and their bytes in flight, and each worker process's RSS, until every drive
has its summary. vera and vlm are off; the detector is a YOLO11n from its yaml (random
weights: the figures are about memory and streams, not verdicts).

    python bench/soak_bench.py --drives 8 --out soak.json        # small, any machine
    python bench/soak_bench.py --drives 50 --out soak-50.json

Prints a summary (first and last samples after warm-up, peaks) and writes every sample
to ``--out``. Goal (issue 16): Redis memory and RSS flat after warm-up, streams trimmed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import redis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fixtures import teslacam as tc
from stages.discover import discover
from stream import codec, names
from stream.schemas import DriveSummary
from stream.settings import BrokerSettings

NS = "soak"


def make_footage(folder: Path, drives: int, size: tuple[int, int]) -> Path:
    """``drives`` three-camera drives of two back-to-back 5 s clips each."""
    spec = tc.ClipSpec(duration_s=5.0, fps=10.0, size=size)
    for i in range(drives):
        start = f"2024-05-{1 + i // 24:02d}_{i % 24:02d}-00-00"
        tc.make_drive(folder / f"d{i:03d}", start=start, cameras=tc.THREE, minutes=2, spec=spec, step_s=5, layout="flat")
    return folder


def write_config(path: Path, footage: Path, args: argparse.Namespace) -> Path:
    config = {
        "namespace": NS,
        "broker": {"frame_partitions": 4, "fuse_partitions": 2, "max_used_memory": args.max_used_memory,
                   "spent_blob_ttl_s": args.spent_blob_ttl},
        "worker": {"batch_size": 8, "max_wait_ms": 20, "trim_interval_s": args.trim_interval},
        "ingest": {"sample_fps": 5.0, "long_side": 160, "decoder_threads": 1, "roots": [str(footage)]},
        "detect": {"model": "yolo11n.yaml", "allow_random_weights": True, "imgsz": 160, "half": False, "device": "cpu", "classes": {"0": "cone"},
                   "window_s": 2.0, "stride_s": 1.0},
        "fuse": {"window_s": 2.0},
        "vlm": {"backend": ""},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


def sample(client: redis.Redis, supervisor: psutil.Process, started: float) -> dict:
    """One sample: Redis memory, streams, blobs, and each worker's RSS."""
    streams = list(client.scan_iter(f"{NS}:*", count=1000, _type="stream"))
    blobs = list(client.scan_iter(f"{NS}:blob:*", count=1000, _type="string"))
    workers = {}
    for child in supervisor.children(recursive=True):
        try:
            stage = child.cmdline()[child.cmdline().index("worker") + 1]
            workers[f"{stage}-{child.pid}"] = child.memory_info().rss
        except (psutil.Error, ValueError, IndexError):
            continue
    summaries = sum(
        isinstance(codec.decode(f[b"d"]), DriveSummary)
        for _, f in client.xrange(names.stream_name(names.VERDICTS, ns=NS))
    )
    return {
        "t": round(time.monotonic() - started, 1),
        "used_memory": int(client.info("memory")["used_memory"]),
        "stream_entries": sum(client.xlen(s) for s in streams),
        "blob_keys": len(blobs),
        "blob_bytes_in_flight": int(client.get(f"{NS}:blob-bytes-in-flight") or 0),
        "dedupe_keys": sum(1 for _ in client.scan_iter(f"{NS}:dedupe:*", count=1000)),
        "rss": workers,
        "summaries": summaries,
    }


def summarise(samples: list[dict], drives: int, warmup_s: float) -> dict:
    after = [s for s in samples if s["t"] >= warmup_s] or samples
    first, last = after[0], after[-1]
    stages: dict[str, list[int]] = {}
    for s in after:
        for name, rss in s["rss"].items():
            stages.setdefault(name, []).append(rss)
    mib = 1 / 2**20
    return {
        "drives": drives,
        "seconds": samples[-1]["t"],
        "samples": len(samples),
        "used_memory_mib": {"first_after_warmup": round(first["used_memory"] * mib, 1),
                            "peak": round(max(s["used_memory"] for s in samples) * mib, 1),
                            "last": round(last["used_memory"] * mib, 1)},  # fmt: skip
        "stream_entries": {"peak": max(s["stream_entries"] for s in samples), "last": last["stream_entries"]},
        "blob_keys": {"peak": max(s["blob_keys"] for s in samples), "last": last["blob_keys"]},
        "dedupe_keys_last": last["dedupe_keys"],
        "rss_mib": {name: {"first_after_warmup": round(v[0] * mib), "peak": round(max(v) * mib), "last": round(v[-1] * mib)}
                    for name, v in sorted(stages.items())},  # fmt: skip
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drives", type=int, default=8)
    parser.add_argument("--ingest", type=int, default=1, help="ingest processes")
    parser.add_argument("--size", default="320x240", help="generated clip size")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before 'first after warm-up'")
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--trim-interval", type=float, default=10.0, help="worker.trim_interval_s")
    parser.add_argument("--max-used-memory", type=int, default=0, help="broker.max_used_memory (0: off)")
    parser.add_argument("--spent-blob-ttl", type=int, default=120, help="broker.spent_blob_ttl_s")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from workers.cli.ingest import submit_jobs
    from workers.run import private_redis

    size = tuple(int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory(prefix="soak-") as folder, private_redis(BrokerSettings()) as url:
        if url is None:
            sys.exit("redis-server is not installed")
        footage = make_footage(Path(folder) / "footage", args.drives, size)
        config = write_config(Path(folder) / "soak.yaml", footage, args)
        env = {**os.environ, "ROADSTREAM_REDIS_URL": url, "ROADSTREAM_CONFIG": str(config),
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
        log = (Path(folder) / "supervise.log").open("wb")
        stages = [f"ingest={args.ingest}", "detect=1", "fuse=1"]
        command = [sys.executable, "-m", "workers.cli", "supervise", *stages, "--processes"]
        supervisor = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(url)
        samples: list[dict] = []
        try:
            while len(client.keys(f"{NS}:health:*")) < args.ingest + 2:
                if supervisor.poll() is not None:
                    sys.exit((Path(folder) / "supervise.log").read_text())
                time.sleep(0.2)
            started = time.monotonic()
            asyncio.run(submit_jobs(url, NS, discover(footage).drives, BrokerSettings()))
            process = psutil.Process(supervisor.pid)
            while True:
                samples.append(sample(client, process, started))
                print(json.dumps({k: v for k, v in samples[-1].items() if k != "rss"}), file=sys.stderr)
                if samples[-1]["summaries"] >= args.drives or samples[-1]["t"] > args.timeout:
                    break
                time.sleep(args.interval)
            # The last trims and spent-blob expiries.
            time.sleep(max(2 * args.trim_interval, args.spent_blob_ttl + 2))
            samples.append(sample(client, process, started))
        finally:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
            log.close()
    summary = summarise(samples, args.drives, args.warmup)
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps({"summary": summary, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
