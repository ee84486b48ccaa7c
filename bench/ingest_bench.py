"""Ingest throughput: bare PyAV decoding against ingest's full path, on the same files.

(a) a decode-only PyAV loop over every clip with ingest's thread settings — the ceiling;
(b) ingest's full path through the worker runtime: decode, sync, resize, JPEG encode,
    blob store and publish to Redis.
Both are reported as frames decoded per second; the goal is b ≥ 0.85·a. With
``--processes N`` it then runs N ingest processes over N drives at once and reports the
aggregate rate against one process (goal ≥ 0.8·N).

    python bench/ingest_bench.py
    python bench/ingest_bench.py --processes 8 --seconds 20
    python bench/ingest_bench.py --cameras 1 --minutes 6 --threads 1 --parallel-clips 2   # one long camera job

Drives are generated once under ``--workdir`` (six cameras of real footage where
``/work/shared/footage`` exists). Keys go to namespace ``rsbench`` and are deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import sys
import threading
import time
from pathlib import Path

import av

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.private_redis import HELP, redis_server  # noqa: E402
from fixtures import teslacam as tc  # noqa: E402
from stages.discover import discover  # noqa: E402

FOOTAGE = Path("/work/shared/footage/roadwork")
NS = "rsbench"


def make_drives(workdir: Path, count: int, args: argparse.Namespace) -> list[Path]:
    """Generate ``count`` drives (reused when already there with the same shape)."""
    width, height = (int(v) for v in args.size.split("x"))
    spec = tc.ClipSpec(duration_s=args.seconds, fps=args.fps, size=(width, height), keyint=args.fps)
    sources = sorted(FOOTAGE.glob("*.mp4")) if FOOTAGE.exists() else []
    tag = f"{args.size}-{args.fps}-{args.seconds}-{args.cameras}"
    roots = []
    for index in range(count):
        root = workdir / tag / f"drive{index}"
        if not (root / "done").exists():
            shutil.rmtree(root, ignore_errors=True)
            cameras = tc.CAMERAS[: args.cameras]
            chosen = {c: sources[(index + i) % len(sources)] for i, c in enumerate(cameras)} if sources else None
            tc.make_drive(root, minutes=args.minutes, cameras=cameras, spec=spec, sources=chosen)
            (root / "done").write_text("ok")
        roots.append(root)
    return roots


def clips_of(root: Path) -> list[str]:
    """Every clip file of the drives under a folder."""
    return [path for drive in discover(root).drives for clip in drive.minutes for path in clip.files.values()]


def bare_decode(paths: list[str], threads: int) -> tuple[int, float]:
    """(a): demux and decode every frame, nothing else. Returns (frames, seconds)."""
    frames, started = 0, time.perf_counter()
    for path in paths:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.codec_context.thread_count = threads
            for packet in container.demux(stream):
                frames += len(packet.decode())
    return frames, time.perf_counter() - started


async def _full_path(root: Path, url: str, threads: int, namespace: str, parallel_clips: int = 1) -> float:
    from brokers.redis import RedisBlobStore, RedisBroker
    from stream import codec, names
    from stream.settings import BrokerSettings, IngestSettings, Settings
    from workers.handlers.ingest import build
    from workers.runtime import Worker

    # Nobody consumes the frames here: lift the backpressure bounds so they do not stall.
    bounds = BrokerSettings(max_lag=10**9, max_blob_bytes=2**62, blob_ttl_s=600)
    ingest = IngestSettings(decoder_threads=threads, roots=[str(root)], parallel_clips=parallel_clips)  # roots: the footage
    settings = Settings(namespace=namespace, broker=bounds, ingest=ingest)
    broker = RedisBroker(url=url, namespace=namespace, settings=bounds)
    blobs = RedisBlobStore(url, namespace=namespace)
    for drive in discover(root).drives:
        await broker.publish(names.stream_name(names.JOBS, ns=namespace), codec.encode(drive.to_job()))
    handler = build(settings, blobs)
    inside = _time_handle(handler)
    decoding = _watch_decoding(handler)
    started = time.perf_counter()
    await Worker(handler, broker, blobs, settings, burst=True).run()
    elapsed = time.perf_counter() - started
    await broker.close()
    await blobs.close()
    return inside[0], elapsed, decoding


def _schedstat() -> tuple[float, float] | None:
    # Linux: (seconds this thread ran on a core, seconds it waited in the run queue).
    try:
        with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as file:
            ran, waited = file.read().split()[:2]
    except OSError:
        return None
    return int(ran) / 1e9, int(waited) / 1e9


def _watch_decoding(handler) -> dict[str, float]:
    # Where ingest's decoding thread spends its wall time: on a core, waiting for a core
    # (other threads or processes), or asleep (the GIL, a full hand-over queue).
    spent = {"wall": 0.0, "cpu": 0.0, "runqueue": 0.0}
    decode_drive = handler._decode_drive

    def watched(*args):
        wall, before = time.perf_counter(), _schedstat()
        yield from decode_drive(*args)
        after = _schedstat()
        spent["wall"] += time.perf_counter() - wall
        if before and after:
            spent["cpu"] += after[0] - before[0]
            spent["runqueue"] += after[1] - before[1]

    handler._decode_drive = watched
    return spent


def _time_handle(handler) -> list[float]:
    # Time spent in the handler: the full path, without the runtime's start and its
    # burst-mode wait to see that the jobs hop stays empty (a fixed ~0.4 s per run).
    spent = [0.0]
    handle = handler.handle

    async def timed(batch, prepared=None):
        started = time.perf_counter()
        try:
            return await handle(batch, prepared)
        finally:
            spent[0] += time.perf_counter() - started

    handler.handle = timed
    return spent


def full_path(
    root: Path, url: str, threads: int, namespace: str = NS, parallel_clips: int = 1
) -> tuple[float, float, dict[str, float]]:
    """(b): ingest's whole path through the runtime (``parallel_clips`` clips of a job at once).

    Returns:
        Seconds in the handler, seconds in all, and the decoding thread's time split.
    """
    return asyncio.run(_full_path(root, url, threads, namespace, parallel_clips))


def _child(args: tuple) -> tuple[float, float, dict[str, float]]:
    root, url, threads, namespace, start_at = args
    while time.time() < start_at:  # start together, after every child has imported
        time.sleep(0.005)
    return full_path(Path(root), url, threads, namespace)


def cleanup(url: str) -> None:
    """Delete every key of the benchmark's namespaces."""
    import redis

    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{NS}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


def side_by_side(root: Path, args: argparse.Namespace) -> float:
    """Run (a) and (b) alternately, best of ``--repeat``; print and return b's frames/s."""
    paths = clips_of(root)
    best_a = best_b = best_run = best_c = 0.0
    for _ in range(args.repeat):
        frames, seconds_a = bare_decode(paths, args.threads)
        cleanup(args.redis)
        seconds_b, seconds_run, decoding = full_path(root, args.redis, args.threads)
        if frames / seconds_b > best_b:
            split = decoding
        best_a, best_b = max(best_a, frames / seconds_a), max(best_b, frames / seconds_b)
        best_run = max(best_run, frames / seconds_run)
        if args.parallel_clips > 1:
            cleanup(args.redis)
            seconds_c, _, _ = full_path(root, args.redis, args.threads, parallel_clips=args.parallel_clips)
            best_c = max(best_c, frames / seconds_c)
    print(f"clips {len(paths)}, frames decoded {frames}, decoder threads {args.threads or 'auto'}")
    print(f"(a) bare PyAV decode : {best_a:8.1f} frames/s")
    print(f"(b) ingest full path : {best_b:8.1f} frames/s   ratio b/a = {best_b / best_a:.3f} (goal >= 0.85)")
    print(f"    with worker start and burst exit: {best_run:8.1f} frames/s   ratio {best_run / best_a:.3f}")
    asleep = split["wall"] - split["cpu"] - split["runqueue"]
    print(f"    (b)'s decoding thread: {split['wall']:.2f} s = {split['cpu']:.2f} on a core + {split['runqueue']:.2f} "
          f"waiting for a core + {asleep:.2f} asleep (GIL, publisher behind)")
    if best_c:
        print(f"(c) ingest, {args.parallel_clips} clips at once: {best_c:8.1f} frames/s   {best_c / best_b:.2f}x (b)")
    return best_b


def scaling(roots: list[Path], single_fps: float, args: argparse.Namespace) -> None:
    """N ingest processes over N drives at once: aggregate frames/s against one process."""
    frames = sum(bare_frame_count(r) for r in roots)
    cleanup(args.redis)
    start_at = time.time() + 3.0
    jobs = [(str(r), args.redis, args.threads, f"{NS}{i}", start_at) for i, r in enumerate(roots)]
    with mp.get_context("spawn").Pool(len(roots)) as pool:
        seconds = pool.map(_child, jobs)
    aggregate = frames / max(inside for inside, _, _ in seconds)
    n = len(roots)
    print(f"{n} processes: {aggregate:8.1f} frames/s aggregate, {aggregate / single_fps:.2f}x one process "
          f"(goal >= {0.8 * n:.1f}x)")


def bare_frame_count(root: Path) -> int:
    """Frames in a drive's clips, from the container index."""
    total = 0
    for path in clips_of(root):
        with av.open(path) as container:
            total += container.streams.video[0].frames
    return total


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=None, help=HELP)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/roadstream-ingest-bench"))
    parser.add_argument("--size", default="1280x960", help="camera resolution WxH (HW3: 1280x960)")
    parser.add_argument("--fps", type=int, default=36)
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--minutes", type=int, default=1)
    parser.add_argument("--cameras", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="decoder threads (0: auto), same for (a) and (b)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--processes", type=int, default=0, help="also run N ingest processes over N drives")
    parser.add_argument("--parallel-clips", type=int, default=1,
                        help="also run (b) with this many clips of a job decoding at once (ingest.parallel_clips)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Generate the drives, run the side-by-side figure, then the scaling one if asked."""
    args = parse(argv)
    roots = make_drives(args.workdir, max(1, args.processes), args)
    with redis_server(None, args.redis) as args.redis:
        try:
            single = side_by_side(roots[0], args)
            if args.processes > 1:
                scaling(roots, single, args)
        finally:
            cleanup(args.redis)


if __name__ == "__main__":
    main()
