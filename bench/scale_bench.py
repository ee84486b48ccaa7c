"""Scale figures: ingest throughput against N worker processes, and partition rebalancing.

(1) **Throughput against N.** ``--drives`` generated drives are queued on the jobs hop and
    N ``roadstream worker ingest`` processes (one decoder thread each) share them through
    the ingest consumer group. The rate is the frames published per second from the
    submit to the last drive's "ended" marker (the workers are started and ready before
    the clock starts); the ratio to linear is rate(N) / (N · rate(1)).
(2) **Rebalancing.** For detect and fuse: two workers own every partition; a third joins,
    then one leaves gracefully (SIGTERM: it releases its leases), then one crashes
    (SIGKILL: its leases must expire). Each time, the figure is the time until every
    partition has exactly one owner again, that owner alive and the one rendezvous
    hashing gives among the live workers; for a join it is counted from the moment the
    new worker entered the member pool (its process start, model load included, is
    reported beside it). Owners are read from the lease keys through the broker, as
    ``roadstream status`` does.

    python bench/scale_bench.py
    python bench/scale_bench.py --workers 1,2,4,8 --drives 8 --size 1280x960

Prints one JSON object (also written to ``--json``). Drives are generated once under
``--workdir`` (real footage as picture content where ``/work/shared/footage`` exists).
Keys go to namespaces ``rsscale-*`` and are deleted after each run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.private_redis import HELP, redis_server
from brokers.partitions import balanced_owners
from brokers.redis import RedisBroker
from fixtures import teslacam as tc
from stages.discover import discover
from stream import codec, names
from stream.schemas import DriveMarker
from stream.settings import BrokerSettings

FOOTAGE = Path("/work/shared/footage/roadwork")
NS = "rsscale"
POLL_S = 0.02


# -- footage --------------------------------------------------------------------------------


def make_drives(workdir: Path, args: argparse.Namespace) -> Path:
    """Generate ``--drives`` drives under one folder (reused when already there)."""
    width, height = (int(v) for v in args.size.split("x"))
    spec = tc.ClipSpec(duration_s=args.seconds, fps=args.fps, size=(width, height), keyint=args.fps)
    sources = sorted(FOOTAGE.glob("*.mp4")) if FOOTAGE.exists() else []
    root = workdir / f"{args.size}-{args.fps}-{args.seconds}-{args.minutes}-{args.cameras}"
    for index in range(args.drives):
        folder = root / f"drive{index}"
        if (folder / "done").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        cameras = tc.CAMERAS[: args.cameras]
        chosen = {c: sources[(index + i) % len(sources)] for i, c in enumerate(cameras)} if sources else None
        start = f"2024-06-{1 + index:02d}_09-00-00"
        tc.make_drive(
            folder,
            start=start,
            minutes=args.minutes,
            cameras=cameras,
            spec=spec,
            sources=chosen,
            step_s=round(args.seconds),
            layout="flat",
        )
        (folder / "done").write_text("ok")
    return root


# -- worker processes ------------------------------------------------------------------------


class Workers:
    """``roadstream worker STAGE`` processes in one namespace.

    Parameters:
        url: the broker URL.
        namespace: the key namespace of this run.
        settings: ``--set`` overrides for every worker.
        env: extra environment variables.
    """

    def __init__(self, url: str, namespace: str, settings: list[str], env: dict[str, str]) -> None:
        self.url = url
        self.namespace = namespace
        self.settings = settings
        self.env = {**os.environ, "ROADSTREAM_NAMESPACE": namespace, **env}
        self.procs: list[subprocess.Popen] = []

    def start(self, stage: str) -> subprocess.Popen:
        """Start one worker of ``stage``."""
        sets = [arg for s in self.settings for arg in ("--set", s)]
        command = [sys.executable, "-m", "workers.cli", *sets, "worker", stage, "--redis", self.url]
        proc = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen]:
        """Processes still running."""
        return [p for p in self.procs if p.poll() is None]

    def wait_ready(self, client: redis.Redis, timeout_s: float = 120.0) -> None:
        """Until every live worker wrote its health record."""
        deadline = time.monotonic() + timeout_s
        while {p.pid for p in self.live()} - set(health_pids(client, self.namespace)):
            if time.monotonic() > deadline:
                message = "workers did not become ready"
                raise TimeoutError(message)
            time.sleep(0.05)

    def close(self) -> None:
        """Kill every worker still running."""
        for proc in self.live():
            proc.kill()
        for proc in self.procs:
            proc.wait()


def health_pids(client: redis.Redis, namespace: str) -> dict[int, str]:
    """pid -> consumer name, from the workers' health keys."""
    found = {}
    for key in client.scan_iter(match=f"{namespace}:health:*", count=1000):
        consumer = key.decode().rsplit(":", 1)[1]
        found[int(consumer.rsplit("-", 2)[1])] = consumer
    return found


def delete_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every key of one namespace (never FLUSHDB: the database may be shared)."""
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


# -- (1) throughput against N -------------------------------------------------------------------


def ended_markers(client: redis.Redis, namespace: str) -> list[DriveMarker]:
    """The "ended" markers on the drives hop."""
    entries = client.xrange(names.stream_name(names.DRIVES, ns=namespace))
    markers = [codec.decode(fields[b"d"], DriveMarker) for _, fields in entries]
    return [m for m in markers if m.event == "ended"]


def cpu_seconds(procs: list[subprocess.Popen]) -> float:
    """User + system CPU seconds of processes so far (Linux ``/proc``; 0 elsewhere)."""
    total = 0
    for proc in procs:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def redis_cpu_seconds(client: redis.Redis) -> float:
    """CPU seconds the Redis server has used since it started."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def ingest_run(footage: Path, n: int, args: argparse.Namespace) -> dict:
    """N ingest processes over every drive; frames published per second."""
    from workers.cli.ingest import submit_jobs

    namespace = f"{NS}-ingest{n}"
    client = redis.Redis.from_url(args.redis)
    delete_namespace(client, namespace)
    # Nobody consumes the frames here: lift the backpressure bounds so they do not stall.
    bounds = ["broker.max_lag=1000000000", "broker.max_blob_bytes=100000000000", "broker.blob_ttl_s=600"]
    env = {"OMP_NUM_THREADS": "1", "ROADSTREAM_INGEST__ROOTS": json.dumps([str(footage)])}  # footage under roots only
    workers = Workers(args.redis, namespace, [*bounds, "ingest.decoder_threads=1"], env)
    drives = discover(footage).drives
    try:
        for _ in range(n):
            workers.start(names.INGEST)
        workers.wait_ready(client)
        cpu_before, redis_before = cpu_seconds(workers.procs), redis_cpu_seconds(client)
        started = time.perf_counter()
        asyncio.run(submit_jobs(args.redis, namespace, drives, BrokerSettings()))
        while len(markers := ended_markers(client, namespace)) < len(drives):
            time.sleep(POLL_S)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(workers.procs) - cpu_before
        redis_cpu = redis_cpu_seconds(client) - redis_before
    finally:
        workers.close()
        delete_namespace(client, namespace)
        client.close()
    frames = sum(sum(m.frame_counts.values()) for m in markers)
    return {
        "workers": n,
        "drives": len(drives),
        "frames": frames,
        "seconds": round(seconds, 3),
        "frames_per_s": round(frames / seconds, 2),
        "worker_cores_busy": round(cpu / seconds, 2),  # CPU seconds of the workers per second
        "redis_server_cores_busy": round(redis_cpu / seconds, 2),  # the whole server: others count too
        "frames_per_worker_cpu_s": round(frames / cpu, 2) if cpu else None,
    }


def throughput(footage: Path, args: argparse.Namespace) -> list[dict]:
    """Every N of ``--workers``, best of ``--repeat``, with the ratio to linear."""
    rows = []
    for n in args.workers:
        runs = [ingest_run(footage, n, args) for _ in range(args.repeat)]
        rows.append(max(runs, key=lambda r: r["frames_per_s"]))
        print(f"ingest x{n}: {rows[-1]['frames_per_s']} frames/s", file=sys.stderr)
    base = next(
        (r["frames_per_s"] for r in rows if r["workers"] == 1), rows[0]["frames_per_s"] / rows[0]["workers"]
    )
    for row in rows:
        row["speedup"] = round(row["frames_per_s"] / base, 3)
        row["ratio_to_linear"] = round(row["frames_per_s"] / (row["workers"] * base), 3)
    return rows


# -- (2) rebalancing --------------------------------------------------------------------------


class Owners:
    """Reads a group's lease keys and member pool through the broker."""

    def __init__(self, url: str, namespace: str, group: str, partitions: int) -> None:
        self.broker = RedisBroker(url=url, namespace=namespace)
        self.namespace = namespace
        self.group = group
        self.partitions = partitions

    async def owners(self) -> list[str | None]:
        """The lease holder of each partition."""
        keys = [names.lease_name(self.group, p, self.namespace) for p in range(self.partitions)]
        return [await self.broker.lease_owner(key) for key in keys]

    async def members(self) -> list[str]:
        """The live members of the group's pool."""
        return await self.broker.members(names.members_name(self.group, self.namespace))

    async def balanced(self, live: set[str]) -> bool:
        """Every partition held by a live worker, the one ``balanced_owners`` picks among them."""
        if not live:
            return False
        owners = await self.owners()
        wanted = balanced_owners(self.group, len(owners), live)
        return all(o == wanted[p] for p, o in enumerate(owners))

    async def wait_balanced(self, live: set[str], timeout_s: float) -> float:
        """Seconds until ``balanced``; raises after ``timeout_s``."""
        started = time.perf_counter()
        while not await self.balanced(live):
            if time.perf_counter() - started > timeout_s:
                message = f"{self.group}: partitions not rebalanced over {sorted(live)} in {timeout_s} s"
                raise TimeoutError(message)
            await asyncio.sleep(POLL_S)
        return time.perf_counter() - started

    async def close(self) -> None:
        """Close the broker connection."""
        await self.broker.close()


async def live_members(owners: Owners, workers: Workers, but: subprocess.Popen | None = None) -> set[str]:
    """Pool members that are live workers of ours (a killed one stays in the pool a while)."""
    pids = {p.pid for p in workers.live() if p is not but}
    return {m for m in await owners.members() if consumer_pid(m) in pids}


def consumer_pid(consumer: str) -> int:
    """The process id in a consumer name (``stage-host-pid-suffix``)."""
    return int(consumer.rsplit("-", 2)[1])


async def rebalance_group(group: str, args: argparse.Namespace) -> dict:
    """Join, graceful leave and crash of one worker of a partitioned stage, timed."""
    namespace = f"{NS}-{group}"
    client = redis.Redis.from_url(args.redis)
    delete_namespace(client, namespace)
    env = {"ROADSTREAM_BROKER__LEASE_TTL_MS": str(args.lease_ms), "OMP_NUM_THREADS": "1"}
    workers = Workers(args.redis, namespace, [], env)
    count = BrokerSettings().frame_partitions if group == names.DETECT else BrokerSettings().fuse_partitions
    owners = Owners(args.redis, namespace, group, count)
    timeout = 10 * args.lease_ms / 1000 + 60
    try:
        first = [workers.start(group) for _ in range(2)]
        while len(await live_members(owners, workers)) < len(first):
            await asyncio.sleep(POLL_S)
        await owners.wait_balanced(await live_members(owners, workers), timeout)
        joined = await _join(workers, owners, group, timeout)
        graceful = await _leave(workers, owners, first[0], signal.SIGTERM, timeout)
        crashed = await _leave(workers, owners, first[1], signal.SIGKILL, timeout)
    finally:
        await owners.close()
        workers.close()
        delete_namespace(client, namespace)
        client.close()
    return {
        "group": group,
        "partitions": count,
        "lease_ttl_ms": args.lease_ms,
        "join_2_to_3": joined,
        "leave_sigterm_3_to_2": graceful,
        "leave_sigkill_2_to_1": crashed,
    }


async def _join(workers: Workers, owners: Owners, group: str, timeout: float) -> dict:
    before = set(await owners.members())
    started = time.perf_counter()
    workers.start(group)
    # The newcomer's first lease refresh puts it in the pool; from then on it is a rebalance.
    while not set(await owners.members()) - before:
        await asyncio.sleep(POLL_S)
    in_pool = time.perf_counter() - started
    seconds = await owners.wait_balanced(await live_members(owners, workers), timeout)
    return {"seconds_from_pool_join": round(seconds, 3), "process_start_to_pool_join_s": round(in_pool, 3)}


async def _leave(
    workers: Workers, owners: Owners, proc: subprocess.Popen, sig: signal.Signals, timeout: float
) -> dict:
    survivors = await live_members(owners, workers, but=proc)
    proc.send_signal(sig)
    seconds = await owners.wait_balanced(survivors, timeout)
    proc.wait()
    return {"seconds": round(seconds, 3)}


# -- main --------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis", default=None, help=HELP)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/roadstream-scale-bench"))
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 2, 4],
        help="ingest process counts ('' for none)",
    )
    parser.add_argument("--drives", type=int, default=4)
    parser.add_argument("--size", default="640x480", help="camera resolution WxH (HW3: 1280x960)")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--minutes", type=int, default=2, help="clips per camera")
    parser.add_argument("--cameras", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=1, help="runs per N (the best is kept)")
    parser.add_argument(
        "--lease-ms", type=int, default=BrokerSettings().lease_ttl_ms, help="partition lease TTL"
    )
    parser.add_argument(
        "--groups", default="detect,fuse", help="partitioned stages to rebalance ('' for none)"
    )
    parser.add_argument("--json", type=Path, help="also write the summary here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run both parts and print the JSON summary."""
    args = parse(argv)
    with redis_server(None, args.redis) as args.redis:
        _main(args)


def _main(args: argparse.Namespace) -> None:
    footage = make_drives(args.workdir, args)
    summary = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2)},
        "footage": {
            "drives": args.drives,
            "cameras": args.cameras,
            "clips_per_camera": args.minutes,
            "clip_s": args.seconds,
            "fps": args.fps,
            "size": args.size,
        },
        "ingest": throughput(footage, args) if args.workers else [],
        "rebalance": [asyncio.run(rebalance_group(g, args)) for g in filter(None, args.groups.split(","))],
    }
    summary["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
