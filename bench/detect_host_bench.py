"""The detect worker's host cost per frame, with the device's work replayed.

On a GPU, one detect worker of a small model (YOLO11n) is bound by its host thread, not
the device (README, "Detect"). This measures that host cost on any machine: the real
runtime, Redis, blob fetches, host NMS, results, windows, publishing and acks, with the
detector's device steps (decode, launch) replaced by a replay of outputs that the real
model computed once, on the CPU, for the same frames. The replay returns at once, so the
worker's wall time and CPU time per frame are its host work alone.

It is a profile harness, not the detector: the figures say what the host path costs
per frame, and nothing about the device. Run: ``python bench/detect_host_bench.py
--footage /work/shared/footage/roadwork`` (a private redis-server unless ``--redis URL``) (``--profile``
prints the functions that take the time).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import detect_bench
from bench.private_redis import HELP, redis_server
from brokers.redis import RedisBlobStore, RedisBroker
from stages.detect import Detector, Letterbox, PendingBatch
from workers.handlers.detect import DetectHandler
from workers.runtime import Worker


class ReplayedDevice:
    """Stands in for the detector's device steps: the outputs of one real pass, by frame."""

    def __init__(self, detector: Detector, jpegs: list[bytes]) -> None:
        decoded = detector.decode(jpegs)
        with torch.inference_mode():
            batch, self.box = detector.preprocess(decoded)
            preds, features = detector.forward(batch)
            self.candidates = detector.candidates(preds).clone()
            self.features = features.clone()
        self.shape = tuple(batch.shape[2:])
        self.index = {self._key(j): i for i, j in enumerate(jpegs)}
        self.image = torch.empty((3, *decoded[0].shape[1:]), dtype=torch.uint8)
        detector.decode, detector.launch = self.decode, self.launch

    @staticmethod
    def _key(jpeg: bytes) -> bytes:
        return bytes(jpeg[:64]) + bytes(jpeg[-64:])

    def decode(self, blobs: list[bytes], names: list[str] | None = None) -> list:
        return [(self.image, self.index[self._key(b)]) for b in blobs]

    def launch(self, images: list, extra: object = None) -> PendingBatch:
        rows = [i for _, i in images]
        box = Letterbox(self.shape, self.box.scale[rows], self.box.pad[rows], self.box.size[rows])
        return PendingBatch(box, self.candidates[rows], self.features[rows], {}, seconds={"forward": 0.0})


async def one_run(args: argparse.Namespace, jpegs: list[bytes], detector: Detector, profile: bool) -> dict:
    conf = detect_bench.settings_for(args.model, args)
    ns = f"hostbench-{time.monotonic_ns()}"
    frames = await detect_bench.stage_frames(args.redis, ns, jpegs, args.n, args.drives, args.cameras, conf)
    broker = RedisBroker(url=args.redis, namespace=ns, settings=conf.broker)
    blobs = RedisBlobStore(args.redis, namespace=ns)
    handler = DetectHandler(conf, blobs, detector=detector)
    worker = Worker(handler, broker, blobs, conf, burst=True)
    span = detect_bench.instrument(handler, worker)
    profiler = cProfile.Profile() if profile else None
    cpu = time.process_time()
    if profiler:
        profiler.enable()
    await worker.run()
    if profiler:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    cpu = time.process_time() - cpu
    steady = span["last"] - span["first"]
    keys = [k async for k in broker.client.scan_iter(f"{ns}*")]  # the run's streams, blobs, leases
    if keys:
        await broker.client.delete(*keys)
    await broker.close()
    await blobs.close()
    return {"frames": frames, "wall_ms_per_frame": 1000 * steady / frames, "cpu_ms_per_frame": 1000 * cpu / frames}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="stages/models/cones_yolo11n.pt")
    ap.add_argument("--redis", default=None, help=HELP)
    ap.add_argument("--footage", default="/work/shared/footage/roadwork")
    ap.add_argument("--n", type=int, default=4096, help="frames per run")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--distinct", type=int, default=64, help="distinct frames (one real pass over them)")
    ap.add_argument("--drives", type=int, default=4)
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="also print a cProfile of one more run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    # What detect_bench.settings_for reads.
    args.device, args.imgsz, args.conf, args.max_wait_ms, args.prefetch, args.partitions = "cpu", 640, 0.25, 20, 4, 16
    args.decodes, args.decode_threads = ["gpu"], 1
    jpegs = detect_bench.load_jpegs(args.footage, args.distinct)
    detector = Detector(detect_bench.settings_for(args.model, args).detect)
    ReplayedDevice(detector, jpegs)
    with redis_server(None, args.redis) as args.redis:
        runs = [asyncio.run(one_run(args, jpegs, detector, profile=False)) for _ in range(args.runs)]
        if args.profile:
            asyncio.run(one_run(args, jpegs, detector, profile=True))
    summary = {
        "model": args.model,
        "frames_per_run": runs[0]["frames"],
        "runs": runs,
        "median_wall_ms_per_frame": round(statistics.median(r["wall_ms_per_frame"] for r in runs), 4),
        "median_cpu_ms_per_frame": round(statistics.median(r["cpu_ms_per_frame"] for r in runs), 4),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
