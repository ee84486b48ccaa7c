"""Footage to verdicts: the whole CPU pipeline against its slowest stage alone, one run.

One six-camera TeslaCam-format drive (real clips as the cameras' content where
``/work/shared/footage/roadwork`` exists, synthetic pictures otherwise) goes through:

* ``ingest`` alone: one ingest worker over the footage (the job submitted once it is up);
  rate = frames published / (drive-ended marker − submit);
* ``detect`` alone: one detect worker over the frames ingest left on the frame
  partitions (no ingest running); rate = frames / (last detection − go);
* ``fuse`` alone: one fuse worker over the detections detect left; rate = frames /
  (drive summary − go);
* the pipeline: one worker of each stage at once, job submitted once all are up; rate =
  frames / (drive summary − submit).

Every worker is the real runtime (``workers.runtime.Worker`` with the registry's
handler) in a process of its own, as ``roadstream worker STAGE`` runs it; models load
before the clock starts. The slowest stage alone is the reference: the goal is that the
pipeline keeps at least 70% of its rate.

Latency: for every frame of the pipeline run, from its ``FrameRef.ingested_utc`` (set when
ingest stores its chunk) to the moment its window's verdict entered the verdicts stream
(the Redis entry id's time; Redis runs on this host, so both clocks are the same), p50
and p95; the verdicts' own ``ingest_to_verdict_ms`` (from each window's first frame) too.

The detector is YOLO11n built from ``yolo11n.yaml`` (random weights: the same cost as
trained ones), ``--imgsz 320`` by default; vera and vlm are off (no VLM on a CPU box).

    nice python3 bench/pipeline_bench.py                    # private redis-server, CPU
    python3 bench/pipeline_bench.py --device cuda --imgsz 640 --seconds 60

Without ``--redis URL`` a private ``redis-server`` is started on a Unix socket (as
``roadstream run`` does). Prints one JSON summary at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from fixtures import teslacam as tc
from stages.discover import discover
from stream import codec, names
from stream.schemas import DriveMarker, DriveSummary, FrameDetections, FrameRef, Verdict
from stream.settings import Settings, load_settings

FOOTAGE = Path("/work/shared/footage/roadwork")
GOAL = 0.7
POLL_S = 0.02


# -- the drive ------------------------------------------------------------------------------


def make_footage(root: Path, args: argparse.Namespace) -> Path:
    """A six-camera drive of ``--minutes`` clip sets of ``--seconds`` each, back to back."""
    width, height = (int(v) for v in args.size.split("x"))
    spec = tc.ClipSpec(duration_s=args.seconds, fps=args.fps, size=(width, height), keyint=int(args.fps))
    sources = sorted(FOOTAGE.glob("*.mp4")) if FOOTAGE.exists() else []
    chosen = {c: sources[i % len(sources)] for i, c in enumerate(tc.CAMERAS)} if sources else None
    folder = root / "footage"
    tc.make_drive(
        folder, minutes=args.minutes, cameras=tc.CAMERAS, spec=spec, sources=chosen, step_s=int(args.seconds)
    )
    return folder


def bench_settings(args: argparse.Namespace, url: str) -> Settings:
    """All stages' settings: the small detector, no VLM, no ``ROADSTREAM_*`` from the shell."""
    overrides = {
        "redis_url": url,
        "detect": {"model": "yolo11n.yaml", "allow_random_weights": True, "scorer": "", "device": args.device, "imgsz": args.imgsz},
        "ingest": {"sample_fps": args.sample_fps},
        "vlm": {"backend": ""},
        "broker": {"max_lag": args.max_lag},
    }
    return load_settings(environ={}, **overrides)


# -- one worker in a process of its own -------------------------------------------------


def _child(stage: str, conf: dict, namespace: str, burst: bool, ready, go, stop) -> None:
    """Process body: build and start the stage's handler (models load here), then wait."""
    asyncio.run(_child_main(stage, Settings.model_validate(conf), namespace, burst, ready, go, stop))


async def _child_main(stage: str, settings: Settings, namespace: str, burst: bool, ready, go, stop) -> None:
    from brokers.connect import connect
    from workers.registry import builder
    from workers.runtime import Worker

    broker, blobs = connect(settings.redis_url, namespace=namespace, settings=settings.broker)
    handler = builder(stage)(settings, blobs)
    await handler.start()  # the detector loads now, before the clock starts
    worker = Worker(handler, broker, blobs, settings, burst=burst)
    ready.set()
    await asyncio.to_thread(go.wait)
    run = asyncio.create_task(worker.run())
    await asyncio.to_thread(stop.wait)
    worker.stop()
    await run
    await blobs.close()
    await broker.close()


class Stage:
    """A worker process of one stage: started, ready, released, stopped."""

    def __init__(self, ctx, stage: str, settings: Settings, namespace: str) -> None:
        self.ready, self.go, self.stop_event = ctx.Event(), ctx.Event(), ctx.Event()
        args = (stage, settings.model_dump(), namespace, False, self.ready, self.go, self.stop_event)
        self.process = ctx.Process(target=_child, args=args, name=f"bench-{stage}", daemon=True)
        self.process.start()

    def wait_ready(self, timeout_s: float = 300) -> None:
        if not self.ready.wait(timeout_s):
            message = f"{self.process.name} did not get ready in {timeout_s:.0f} s"
            raise SystemExit(message)

    def stop(self) -> None:
        self.stop_event.set()
        self.go.set()
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()


# -- watching Redis -------------------------------------------------------------------------


class Watch:
    """Reads one namespace's streams with plain redis-py."""

    def __init__(self, url: str, namespace: str, settings: Settings) -> None:
        self.client = redis.Redis.from_url(url)
        self.ns = namespace
        self.settings = settings

    def entries(self, hop: str, partitions: int = 0) -> list[tuple[float, bytes]]:
        """(server time in s, data) of every entry of a hop, all partitions."""
        streams = (
            [names.stream_name(hop, p, self.ns) for p in range(partitions)]
            if partitions
            else [names.stream_name(hop, ns=self.ns)]
        )
        return [(int(i.split(b"-")[0]) / 1000, f[b"d"]) for s in streams for i, f in self.client.xrange(s)]

    def length(self, hop: str, partitions: int) -> int:
        return sum(self.client.xlen(names.stream_name(hop, p, self.ns)) for p in range(partitions))

    def ended(self) -> DriveMarker | None:
        for _, data in self.entries(names.DRIVES):
            marker = codec.decode(data, DriveMarker)
            if marker.event == "ended":
                return marker
        return None

    def summary(self) -> DriveSummary | None:
        for _, data in self.entries(names.VERDICTS):
            message = codec.decode(data, (Verdict, DriveSummary))
            if isinstance(message, DriveSummary):
                return message
        return None

    def until(self, check, what: str, timeout_s: float) -> float:
        """Poll ``check()`` until it is truthy; returns ``time.perf_counter()`` then."""
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                message = f"timed out after {timeout_s:.0f} s waiting for {what}"
                raise SystemExit(message)
            time.sleep(POLL_S)
        return time.perf_counter()


def submit(url: str, namespace: str, settings: Settings, footage: Path) -> None:
    """Queue the drive's ingest job, as ``roadstream submit`` does."""
    from workers.cli.ingest import submit_jobs

    asyncio.run(submit_jobs(url, namespace, discover(footage).drives, settings.broker))


# -- the four runs ------------------------------------------------------------------------------


def alone_ingest(
    ctx, url: str, ns: str, settings: Settings, footage: Path, timeout_s: float
) -> tuple[float, int]:
    """Ingest alone; returns (seconds, frames). Its frames stay for detect alone."""
    stage = Stage(ctx, names.INGEST, settings, ns)
    watch = Watch(url, ns, settings)
    try:
        stage.wait_ready()
        stage.go.set()
        time.sleep(0.5)  # the worker is reading the jobs hop
        started = time.perf_counter()
        submit(url, ns, settings, footage)
        done = watch.until(watch.ended, "ingest's drive-ended marker", timeout_s)
    finally:
        stage.stop()
    return done - started, sum(watch.ended().frame_counts.values())


def alone(
    ctx, url: str, ns: str, settings: Settings, stage_name: str, done_check, what: str, timeout_s: float
) -> float:
    """One stage alone over input already on its streams; seconds from go to ``done_check``."""
    stage = Stage(ctx, stage_name, settings, ns)
    try:
        stage.wait_ready()
        started = time.perf_counter()
        stage.go.set()
        done = Watch(url, ns, settings).until(done_check, what, timeout_s)
    finally:
        stage.stop()
    return done - started


def pipeline(ctx, url: str, ns: str, settings: Settings, footage: Path, timeout_s: float) -> float:
    """Every stage at once; seconds from submit to the drive summary."""
    stages = [Stage(ctx, s, settings, ns) for s in (names.FUSE, names.DETECT, names.INGEST)]
    watch = Watch(url, ns, settings)
    try:
        for stage in stages:
            stage.wait_ready()
        for stage in stages:
            stage.go.set()
        time.sleep(1.0)  # partitions owned, reads waiting
        started = time.perf_counter()
        submit(url, ns, settings, footage)
        done = watch.until(watch.summary, "the pipeline's drive summary", timeout_s)
    finally:
        for stage in stages:
            stage.stop()
    return done - started


# -- latency --------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95 (nearest rank) and the count."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}

    def rank(p: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]

    return {"p50": round(rank(0.50), 1), "p95": round(rank(0.95), 1), "n": len(ordered)}


def latencies(watch: Watch, settings: Settings) -> dict[str, Any]:
    """Per frame (ms): ingest → its window's verdict, split at its detections' publication;
    and the verdicts' own ``ingest_to_verdict_ms`` (from each window's first frame)."""
    verdict_at: dict[int, float] = {}
    reported = []
    for at, data in watch.entries(names.VERDICTS):
        message = codec.decode(data, (Verdict, DriveSummary))
        if isinstance(message, Verdict):
            verdict_at.setdefault(message.window, at)
            if "ingest_to_verdict_ms" in message.timings_ms:
                reported.append(message.timings_ms["ingest_to_verdict_ms"])
    detected_at = {}
    for at, data in watch.entries(names.DETECTIONS, settings.broker.fuse_partitions):
        message = codec.decode(data, (FrameDetections, DriveMarker))
        if isinstance(message, FrameDetections):
            detected_at.setdefault((message.camera, message.seq), at)
    total, detect, fuse = [], [], []
    for _, data in watch.entries(names.FRAMES, settings.broker.frame_partitions):
        ref = codec.decode(data, (FrameRef, DriveMarker))
        window = math.floor(ref.t / settings.fuse.window_s + 1e-9) if isinstance(ref, FrameRef) else None
        if window not in verdict_at or ref.ingested_utc is None:
            continue
        total.append((verdict_at[window] - ref.ingested_utc) * 1000)
        if (ref.camera, ref.seq) in detected_at:
            detect.append((detected_at[(ref.camera, ref.seq)] - ref.ingested_utc) * 1000)
            fuse.append((verdict_at[window] - detected_at[(ref.camera, ref.seq)]) * 1000)
    return {
        "frame_ingest_to_window_verdict_ms": percentiles(total),
        "frame_ingest_to_detections_ms": percentiles(detect),
        "frame_detections_to_window_verdict_ms": percentiles(fuse),
        "verdict_ingest_to_verdict_ms": percentiles(reported),
        "verdicts": len(verdict_at),
    }


# -- main -------------------------------------------------------------------------------------


def machine(settings: Settings) -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    if settings.detect.device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace, url: str) -> dict[str, Any]:
    from workers.run import footage_roots

    ctx = mp.get_context("spawn")  # torch and threads: never fork a loaded process
    settings = bench_settings(args, url)
    summary: dict[str, Any] = {"machine": machine(settings)}
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as folder:
        footage = make_footage(Path(folder), args)
        settings = footage_roots(settings, footage)  # ingest takes footage under its roots only
        ns_alone, ns_pipe = f"{args.namespace}-alone", f"{args.namespace}-pipe"
        frame_parts, fuse_parts = settings.broker.frame_partitions, settings.broker.fuse_partitions
        t_ingest, frames = alone_ingest(ctx, url, ns_alone, settings, footage, args.timeout)
        watch = Watch(url, ns_alone, settings)
        # Detections go one per frame plus one per camera marker (started, ended).
        wanted = watch.length(names.FRAMES, frame_parts)
        t_detect = alone(ctx, url, ns_alone, settings, names.DETECT,
                         lambda: watch.length(names.DETECTIONS, fuse_parts) >= wanted, "detect alone", args.timeout)  # fmt: skip
        t_fuse = alone(ctx, url, ns_alone, settings, names.FUSE, watch.summary, "fuse alone", args.timeout)
        t_pipe = pipeline(ctx, url, ns_pipe, settings, footage, args.timeout)
        pipe_watch = Watch(url, ns_pipe, settings)
        pipe_summary = pipe_watch.summary()
        summary["latency"] = latencies(pipe_watch, settings)
    rates = {"ingest": frames / t_ingest, "detect": frames / t_detect, "fuse": frames / t_fuse}
    slowest = min(rates, key=rates.get)
    pipe_rate = frames / t_pipe
    summary.update({
        "footage": {"cameras": len(tc.CAMERAS), "clip_sets": args.minutes, "clip_s": args.seconds, "size": args.size,
                    "clip_fps": args.fps, "sample_fps": args.sample_fps, "frames": frames,
                    "content": "real clips" if FOOTAGE.exists() else "synthetic"},
        "detector": {"model": "yolo11n.yaml (random weights)", "device": args.device, "imgsz": args.imgsz},
        "fuse_window_s": settings.fuse.window_s,
        "max_lag": settings.broker.max_lag,
        "seconds": {"ingest": round(t_ingest, 2), "detect": round(t_detect, 2), "fuse": round(t_fuse, 2),
                    "pipeline": round(t_pipe, 2)},
        "alone_fps": {k: round(v, 1) for k, v in rates.items()},
        "slowest_stage": slowest,
        "pipeline_fps": round(pipe_rate, 1),
        "pipeline_vs_slowest": round(pipe_rate / rates[slowest], 3),
        "goal": GOAL,
        "meets_goal": pipe_rate / rates[slowest] >= GOAL,
        "pipeline_windows": pipe_summary.windows if pipe_summary else None,
    })  # fmt: skip
    return summary


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", help="Redis URL (default: a private redis-server on a Unix socket)")
    parser.add_argument("--namespace", default="pbench", help="key prefix (two namespaces: -alone, -pipe)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imgsz", type=int, default=320)
    parser.add_argument("--minutes", type=int, default=2, help="clip sets (the car's minutes)")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each clip set")
    parser.add_argument("--size", default="640x360", help="clip size WxH")
    parser.add_argument("--fps", type=float, default=30.0, help="clip frame rate")
    parser.add_argument("--sample-fps", type=float, default=5.0, help="ingest's sampling rate")
    parser.add_argument("--max-lag", type=int, default=5000,
                        help="ingest's backpressure bound per frame partition (broker.max_lag)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=600.0, help="per run")
    return parser.parse_args(argv)


def cleanup(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    for ns in (f"{namespace}-alone", f"{namespace}-pipe"):
        keys = list(client.scan_iter(f"{ns}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.redis:
        cleanup(args.redis, args.namespace)
        try:
            print(json.dumps(run(args, args.redis), indent=2))
        finally:
            cleanup(args.redis, args.namespace)
        return
    from workers.run import private_redis

    with private_redis() as url:
        if url is None:
            raise SystemExit("no redis-server on the PATH: pass --redis URL")
        print(json.dumps(run(args, url), indent=2))


if __name__ == "__main__":
    main()
