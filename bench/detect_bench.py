"""Detect throughput: the bare model, the detect worker end to end, and naive ``predict``.

All in one run, same models, same device, for each model: by default the shipped cone
detector (a trained YOLO11n, so NMS and the windows see real detections on roadwork
footage) and YOLO11n and YOLO11s from their yamls (random weights: they detect nothing,
which times the model but not the detections' path):

* (a) ``ceiling``: the bare fused ``nn.Module``, half precision on CUDA, a batch of
  ``--batch-size`` already on the device, a tight loop; run both eagerly and as a replayed
  CUDA graph (as the worker runs it), and the faster of the two is the ceiling. Measured at
  the worker's own input shape (``rect`` letterbox of the footage, e.g. 384x640) — the
  ratio uses this one — and at ``imgsz`` x ``imgsz`` for reference.
* (b) ``worker``: frames as JPEG blobs in a real Redis (a ``redis-server`` started on a free
  port from ``--redis-server PATH``, or ``--redis URL``), FrameRefs on the partitions of
  several drives and cameras, drive-ended markers, and the real runtime
  (``workers.runtime.Worker``) running ``workers.handlers.detect.DetectHandler``: batching,
  prefetch, nvJPEG decode, one forward pass, NMS, windows, publishing, acks. Run twice:
  once for throughput, once with the device synchronised between steps for the time
  breakdown.
* (c) ``naive``: ultralytics ``model.predict`` on one frame at a time (JPEG decoded with
  OpenCV, as a user would).

With ``--processes N[,M…]``, (b) runs once more for each count with that many worker
processes sharing the GPU and the partitions (each loads and warms up first, then all start
together); the figure is all frames over the span from the first batch of any to the last
of any, and also the rate while all were busy. With ``--pipeline N[,M…]``, the device path
alone (in-memory JPEGs: nvJPEG decode one batch ahead, launch, collect; no Redis, no
windows) runs in that many processes: what the GPU gives the worker at most. Each (b) run
also reports the Redis server's CPU share (of one core).

Frames come from ``--footage DIR`` (``*.mp4``), resized to 640 on the long side and
JPEG-encoded at quality 85, 4:2:0 (as ingest encodes them). ``--decode gpu,cpu`` runs (b)
with each JPEG decoder (``detect.decode``: nvJPEG on the GPU, or libjpeg-turbo threads). Prints a JSON summary at the end.

GPU: ``python bench/detect_bench.py --device cuda --footage /work/shared/footage/roadwork
--redis-server /usr/bin/redis-server``. Smoke test here: add ``--device cpu --n small``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import redis  # noqa: E402
import simplejpeg  # noqa: E402
import torch  # noqa: E402

from bench.private_redis import redis_server  # noqa: E402
from brokers.base import Publish  # noqa: E402
from brokers.redis import RedisBlobStore, RedisBroker  # noqa: E402
from stages.detect import Detector  # noqa: E402
from stream import codec, names  # noqa: E402
from stream.schemas import DriveMarker, FrameRef  # noqa: E402
from stream.settings import Settings, load_settings  # noqa: E402
from workers.handlers.detect import DetectHandler  # noqa: E402
from workers.runtime import Worker  # noqa: E402

CAMERAS = ("front", "back", "left_repeater", "right_repeater", "left_pillar", "right_pillar")
SAMPLE_FPS = 5.0
SMALL_N = 48


# -- frames -----------------------------------------------------------------------------


def load_jpegs(footage: str, count: int, long_side: int = 640, quality: int = 85) -> list[bytes]:
    """Up to ``count`` distinct JPEG frames from the footage, every 6th frame (5 fps of 30)."""
    files = sorted(glob.glob(os.path.join(footage, "*.mp4")))
    if not files:
        message = f"--footage {footage}: no .mp4 files there"
        raise SystemExit(message)
    jpegs: list[bytes] = []
    per_file = max(1, -(-count // len(files)))
    for path in files:
        # OpenCV's own FFmpeg reads the clips: the bench needs no PyAV on the GPU machine.
        video = cv2.VideoCapture(path)
        i = 0
        while len(jpegs) < count and i // 6 < per_file:
            ok, bgr = video.read()
            if not ok:
                break
            if i % 6 == 0:
                jpegs.append(encode(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), long_side, quality))
            i += 1
        video.release()
    return jpegs


def encode(rgb: np.ndarray, long_side: int, quality: int) -> bytes:
    h, w = rgb.shape[:2]
    r = long_side / max(h, w)
    resized = cv2.resize(rgb, (round(w * r), round(h * r)), interpolation=cv2.INTER_AREA)
    # 4:2:0, as ingest encodes frames (from the decoder's own yuv420p planes)
    return simplejpeg.encode_jpeg(np.ascontiguousarray(resized), quality=quality, colorspace="RGB", colorsubsampling="420")


# -- Redis -----------------------------------------------------------------------------


async def stage_frames(url: str, ns: str, jpegs: list[bytes], n: int, drives: int, cameras: int, conf: Settings) -> int:
    """Put ``n`` frames' blobs in Redis and their FrameRefs on the frame partitions."""
    broker = RedisBroker(url=url, namespace=ns, settings=conf.broker)
    blobs = RedisBlobStore(url, namespace=ns)
    streams = [(f"drive{d}", CAMERAS[c % len(CAMERAS)]) for d in range(drives) for c in range(cameras)]
    per_stream = n // len(streams)
    items: list[Publish] = []
    for s, (drive, camera) in enumerate(streams):
        partition = names.frame_partition(drive, camera, conf.broker.frame_partitions)
        stream = names.stream_name(names.FRAMES, partition, ns)
        chunk: dict[str, bytes] = {}
        for seq in range(per_stream):
            jpeg = jpegs[(s * 97 + seq) % len(jpegs)]
            key = f"{drive}:{camera}:{seq}"
            chunk[key] = jpeg
            h, w, _, _ = simplejpeg.decode_jpeg_header(jpeg)
            ref = FrameRef(drive_id=drive, camera=camera, clip="bench", seq=seq, tick=seq, t=seq / SAMPLE_FPS,
                           pts=seq / SAMPLE_FPS, blob_key=key, width=w, height=h, nbytes=len(jpeg))
            items.append(Publish(stream, codec.encode(ref)))
        await blobs.put_many(chunk)
        marker = DriveMarker(drive_id=drive, event="ended", camera=camera, frame_counts={camera: per_stream})
        items.append(Publish(stream, codec.encode(marker)))
    for i in range(0, len(items), 1000):
        await broker.publish_many(items[i : i + 1000])
    await broker.close()
    await blobs.close()
    return per_stream * len(streams)


# -- (a) ceiling ------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(detector: Detector, batch: int, shape: tuple[int, int], seconds: float) -> dict[str, float]:
    """Images/s of the bare fused module on a device-resident batch, tight loop: eagerly,
    and (CUDA) replaying a CUDA graph of it; ``best`` is the faster."""
    x = torch.rand(batch, 3, *shape, device=detector.device, dtype=detector.dtype)
    with torch.inference_mode():
        rates = {"eager": tight_loop(lambda: detector.net(x), batch, seconds, detector.device)}
        if detector.device.type == "cuda":
            graph = detector._graph(x)  # the worker's own, kept (captured once per shape)
            rates["cuda_graph"] = tight_loop(graph.graph.replay, batch, seconds, detector.device)
    return {**{k: round(v, 1) for k, v in rates.items()}, "best": round(max(rates.values()), 1)}


def tight_loop(step, batch: int, seconds: float, device: torch.device) -> float:
    for _ in range(3 if device.type == "cuda" else 1):
        step()
    sync(device)
    iters, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        iters += 1
    sync(device)
    return batch * iters / (time.perf_counter() - started)


def redis_cpu_seconds(url: str) -> float:
    """CPU seconds the Redis server has used so far (user + system, main thread and others)."""
    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


# -- the device path alone: decode + detect, no Redis ------------------------------------------


def pipeline_child(model: str, args: argparse.Namespace, conn) -> None:
    """One process: nvJPEG decode one batch ahead (a thread) + launch + collect, in a loop."""
    from concurrent.futures import ThreadPoolExecutor

    torch.backends.cudnn.benchmark = True
    detector = Detector(settings_for(model, args).detect)
    jpegs = conn.recv()
    size = args.batch_size
    batches = [[jpegs[(i + j) % len(jpegs)] for j in range(size)] for i in range(0, len(jpegs), size)]
    for batch in batches[:3]:
        detector.collect(detector.launch(detector.decode(batch)))
    conn.send("ready")
    conn.recv()
    frames, pending, i = 0, None, 1
    with ThreadPoolExecutor(1) as pool:
        decoding = pool.submit(detector.decode, batches[0])
        started = time.monotonic()
        while time.monotonic() - started < args.seconds:
            images = decoding.result()
            decoding = pool.submit(detector.decode, batches[i % len(batches)])
            i += 1
            launched = detector.launch(images)
            if pending is not None:
                frames += len(detector.collect(pending))
            pending = launched
        frames += len(detector.collect(pending))
        ended = time.monotonic()
        decoding.result()
    conn.send({"frames": frames, "first": started, "last": ended})


async def pipeline_run(model: str, jpegs: list[bytes], args: argparse.Namespace, count: int) -> dict:
    """Images/s of ``count`` processes running the device path alone on the one GPU."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for _ in range(count):
        mine, theirs = context.Pipe()
        proc = context.Process(target=pipeline_child, args=(model, args, theirs))
        proc.start()
        mine.send(jpegs)
        pipes.append(mine)
        procs.append(proc)
    for pipe in pipes:
        assert await asyncio.to_thread(pipe.recv) == "ready"
    for pipe in pipes:
        pipe.send("go")
    spans = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    for proc in procs:
        proc.join(timeout=60)
    wall = max(s["last"] for s in spans) - min(s["first"] for s in spans)
    return {"processes": count, "images_per_s": round(sum(s["frames"] for s in spans) / wall, 1)}


# -- (b) the worker end to end ------------------------------------------------------------


async def worker_run(detector: Detector, conf: Settings, url: str, ns: str, jpegs: list[bytes], args) -> dict:
    frames = await stage_frames(url, ns, jpegs, args.n, args.drives, args.cameras, conf)
    broker = RedisBroker(url=url, namespace=ns, settings=conf.broker)
    blobs = RedisBlobStore(url, namespace=ns)
    handler = DetectHandler(conf, blobs, detector=detector)
    worker = Worker(handler, broker, blobs, conf, burst=True)
    span = instrument(handler, worker)
    detector.timings.__init__()
    redis_cpu = redis_cpu_seconds(url)
    started = time.monotonic()
    await worker.run()
    wall = time.monotonic() - started
    redis_cpu = redis_cpu_seconds(url) - redis_cpu
    stats = handler.window_stats()
    seg_stream = names.stream_name(names.SEGMENTS, ns=ns)
    segments = (await broker.stats(seg_stream)).length
    await broker.close()
    await blobs.close()
    steady = span["last"] - span["first"]
    return {
        "frames": frames,
        "images_per_s": frames / steady,
        "images_per_s_incl_startup": frames / wall,
        "redis_server_cpu_share": round(redis_cpu / wall, 3),  # of one core
        "batches": len(handler.batch_sizes),
        "mean_batch_frames": float(np.mean(handler.batch_sizes)) if handler.batch_sizes else 0.0,
        "modal_batch_frames": int(np.bincount(handler.batch_sizes).argmax()) if handler.batch_sizes else 0,
        "max_batch_frames": max(handler.batch_sizes, default=0),
        "segments": segments,
        "key_frames": stats.kept,
        "window_frame_slots": stats.slots,
        "reduction_frames_per_key_frame": round(stats.reduction, 2),
        "detections_per_frame": stats.detections / max(stats.kept, 1),
        "seconds": {"steady": steady, **breakdown(handler, detector, span)},
    }


# -- (b) with several worker processes on the one GPU ---------------------------------------


def child_worker(model: str, url: str, ns: str, args: argparse.Namespace, conn, index: int) -> None:
    """One detect worker process: load and warm up, join the group, wait for "go", run."""
    asyncio.run(_child_worker(model, url, ns, args, conn, index))


async def _child_worker(model: str, url: str, ns: str, args: argparse.Namespace, conn, index: int) -> None:
    torch.backends.cudnn.benchmark = True
    conf = settings_for(model, args)
    broker = RedisBroker(url=url, namespace=ns, settings=conf.broker)
    blobs = RedisBlobStore(url, namespace=ns)
    handler = DetectHandler(conf, blobs, detector=Detector(conf.detect))
    consumer = f"bench-detect-{index}"
    worker = Worker(handler, broker, blobs, conf, consumer=consumer, burst=True)
    span = instrument(handler, worker)
    await handler.start()  # warms the batch shape of Tesla's frames (640x480); other sizes capture on their first batch
    # Every member is in the pool before any takes partitions: each takes its share at once.
    await broker.join(names.members_name(handler.group, ns), consumer, conf.broker.lease_ttl_ms)
    conn.send("ready")
    await asyncio.to_thread(conn.recv)
    await worker.run()
    conn.send({"frames": sum(handler.batch_sizes), "first": span["first"], "last": span["last"], "done": span["done"]})
    await broker.close()
    await blobs.close()


async def processes_run(model: str, url: str, ns: str, jpegs: list[bytes], args: argparse.Namespace, count: int) -> dict:
    """(b) with ``count`` detect workers sharing the GPU and the partitions."""
    import multiprocessing

    conf = settings_for(model, args)
    frames = await stage_frames(url, ns, jpegs, args.n, args.drives, args.cameras, conf)
    context = multiprocessing.get_context("spawn")  # CUDA is initialised in this process
    pipes, procs = [], []
    for index in range(count):
        mine, theirs = context.Pipe()
        proc = context.Process(target=child_worker, args=(model, url, ns, args, theirs, index))
        proc.start()
        pipes.append(mine)
        procs.append(proc)
    for pipe in pipes:
        ready = await asyncio.to_thread(pipe.recv)
        assert ready == "ready", ready
    for pipe in pipes:
        pipe.send("go")
    redis_cpu = redis_cpu_seconds(url)
    spans = [await asyncio.to_thread(pipe.recv) for pipe in pipes]
    redis_cpu = redis_cpu_seconds(url) - redis_cpu
    for proc in procs:
        proc.join(timeout=60)
    handled = sum(s["frames"] for s in spans)
    active = [s for s in spans if s["first"] is not None]
    wall = max(s["last"] for s in active) - min(s["first"] for s in active)
    # While every process is busy: from the last one's first batch to the first one's last.
    # Hashing cameras onto partitions gives some processes more frames than others, and
    # over a finite backlog those run on alone at the end, which the whole span counts.
    busy_from, busy_to = max(s["first"] for s in active), min(s["last"] for s in active)
    busy_frames = sum(n for s in active for t, n in s["done"] if busy_from < t <= busy_to)
    return {
        "processes": count,
        "frames": frames,
        "frames_handled": handled,
        "images_per_s": handled / wall,
        "images_per_s_all_busy": busy_frames / (busy_to - busy_from) if busy_to > busy_from else None,
        "all_busy_s": round(busy_to - busy_from, 3),
        "span_s": round(wall, 3),
        "redis_server_cpu_share": round(redis_cpu / wall, 3),  # of one core, over the span
        "per_process_frames": [s["frames"] for s in spans],
        "per_process_images_per_s": [round(s["frames"] / (s["last"] - s["first"]), 1) for s in active],
    }


def instrument(handler: DetectHandler, worker: Worker) -> dict:
    """Record the first prepare, the last handle and publish time (system-wide clock:
    the spans of worker processes are compared)."""
    span = {"first": None, "last": 0.0, "publish": 0.0, "done": []}  # done: (time, frames) per batch
    prepare, handle, publish = handler.prepare, handler.handle, worker.publish

    async def timed_prepare(batch):
        span["first"] = span["first"] or time.monotonic()
        return await prepare(batch)

    async def timed_handle(batch, prepared=None):
        span["first"] = span["first"] or time.monotonic()
        result = await handle(batch, prepared)
        span["last"] = time.monotonic()
        span["done"].append((span["last"], handler.batch_sizes[-1] if handler.batch_sizes else 0))
        return result

    async def timed_publish(outputs):
        started = time.monotonic()
        await publish(outputs)
        span["publish"] += time.monotonic() - started
        span["last"] = time.monotonic()

    handler.prepare, handler.handle, worker.publish = timed_prepare, timed_handle, timed_publish
    return span


def breakdown(handler: DetectHandler, detector: Detector, span: dict) -> dict[str, float]:
    times = {"fetch": handler.timings.seconds["fetch"], **detector.timings.seconds}
    times["wait_for_device"] = handler.timings.seconds["wait"]
    times["window"] = handler.timings.seconds["window"]
    times["publish"] = span["publish"]
    return {k: round(v, 4) for k, v in times.items()}


# -- (c) naive ----------------------------------------------------------------------------


def naive(model: str, jpegs: list[bytes], count: int, args) -> float:
    """Images/s of ``YOLO.predict`` one frame at a time, from JPEG bytes."""
    from ultralytics import YOLO

    yolo = YOLO(model)
    half = args.device.startswith("cuda")
    images = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs[:3]]
    for image in images:  # warm-up: the predictor is built on the first call
        yolo.predict(image, imgsz=args.imgsz, device=args.device, half=half, verbose=False)
    started = time.perf_counter()
    for i in range(count):
        image = cv2.imdecode(np.frombuffer(jpegs[i % len(jpegs)], np.uint8), cv2.IMREAD_COLOR)
        yolo.predict(image, imgsz=args.imgsz, device=args.device, half=half, verbose=False)
    sync(torch.device(args.device))
    return count / (time.perf_counter() - started)


# -- the run ------------------------------------------------------------------------------


def settings_for(model: str, args) -> Settings:
    return load_settings(
        environ={},
        detect={
            "model": model,
            # Its yaml models (random weights) cost what trained ones do: allowed here.
            "allow_random_weights": True,
            "scorer": "",
            "device": args.device,
            "imgsz": args.imgsz,
            "half": True,
            "conf": args.conf,
            "decode": getattr(args, "decode", args.decodes[0]),
            "decode_threads": args.decode_threads,
        },
        worker={
            "batch_size": args.batch_size,
            "max_wait_ms": args.max_wait_ms,
            "heartbeat_s": 1.0,
            "prefetch": args.prefetch,
        },
        broker={"frame_partitions": args.partitions},
    )


async def bench_model(model: str, url: str, jpegs: list[bytes], args) -> dict:
    conf = settings_for(model, args)
    detector = Detector(conf.detect)
    shape = detector.input_shape([cv2.imdecode(np.frombuffer(jpegs[0], np.uint8), 0).shape[:2]])
    warm = [jpegs[i % len(jpegs)] for i in range(args.batch_size)]
    for _ in range(3 if detector.device.type == "cuda" else 1):
        detector.detect_jpegs(warm)
    a = ceiling(detector, args.batch_size, shape, args.seconds)
    a_square = ceiling(detector, args.batch_size, (args.imgsz, args.imgsz), args.seconds)
    tag = Path(model).stem.replace(".", "-")
    c = None if args.quick else naive(model, jpegs, args.naive_frames, args)
    by_decode, a_same, batch = {}, a, args.batch_size
    for decode in args.decodes:
        run_args = argparse.Namespace(**{**vars(args), "decode": decode})
        conf = settings_for(model, run_args)
        detector.settings = conf.detect
        b = await worker_run(detector, conf, url, f"bench-{tag}-{decode}", jpegs, run_args)
        # The runtime decides the batches; the ceiling is taken at the batch it actually formed.
        batch = b["modal_batch_frames"] or args.batch_size
        a_same = a if batch == args.batch_size else ceiling(detector, batch, shape, args.seconds)
        multi = [
            await processes_run(model, url, f"bench-{tag}-{decode}-x{n}", jpegs, run_args, n) for n in args.processes if n > 1
        ]
        pipeline = [await pipeline_run(model, jpegs, run_args, n) for n in args.pipeline]
        b_profiled = None
        if not args.quick and decode == args.decodes[0]:
            detector.profile = True
            b_profiled = await worker_run(detector, conf, url, f"bench-{tag}-{decode}-prof", jpegs, run_args)
            detector.profile = False
        by_decode[decode] = {
            "b_worker_images_per_s": round(b["images_per_s"], 1),
            "b_over_a": round(b["images_per_s"] / a_same["best"], 3),
            "b_over_c": c and round(b["images_per_s"] / c, 2),
            "b_worker_processes": multi,
            "b_processes_over_a": {
                m["processes"]: {
                    "span": round(m["images_per_s"] / a_same["best"], 3),
                    "all_busy": m["images_per_s_all_busy"] and round(m["images_per_s_all_busy"] / a_same["best"], 3),
                }
                for m in multi
            },
            "device_path_no_redis": pipeline,
            "worker": b,
            "worker_profiled": b_profiled,
            "time_ms_per_frame_profiled": b_profiled and {
                k: round(1000 * v / b_profiled["frames"], 3) for k, v in b_profiled["seconds"].items()
            },
        }
    return {
        "model": model,
        "input_shape": list(shape),
        "worker_batch_frames": batch,
        "a_ceiling_images_per_s": a_same["best"],
        "a_ceiling_detail": {"at_worker_batch": a_same, "at_batch_size": a, "square": a_square},
        "c_naive_images_per_s": c and round(c, 1),
        "b_by_decode": by_decode,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        default="stages/models/cones_yolo11n.pt,yolo11n.yaml,yolo11s.yaml",
        help="comma-separated model names (the shipped cone detector is a trained YOLO11n)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--batch-size", type=int, default=None, help="default 32 (8 with --n small)")
    ap.add_argument("--conf", type=float, default=0.25, help="score threshold (lower it to load NMS and windows)")
    ap.add_argument("--max-wait-ms", type=int, default=20)
    ap.add_argument("--prefetch", type=int, default=4, help="batches the worker prepares ahead")
    ap.add_argument("--decode", dest="decodes", default="gpu", help="JPEG decoders to run (b) with: gpu, cpu or gpu,cpu")
    ap.add_argument("--decode-threads", type=int, default=3, help="decode threads per worker process (--decode cpu)")
    ap.add_argument("--processes", default="1", help="also run (b) with these many worker processes (e.g. 2,4)")
    ap.add_argument(
        "--pipeline", default="", help="also time the device path alone (decode+detect, no Redis) in these many processes"
    )
    ap.add_argument("--n", default="4096", help="frames through the worker, or 'small' (%d)" % SMALL_N)
    ap.add_argument("--naive-frames", type=int, default=None, help="frames for (c); default min(n, 300)")
    ap.add_argument("--drives", type=int, default=4)
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0, help="length of each ceiling loop")
    ap.add_argument("--footage", default="/work/shared/footage/roadwork")
    ap.add_argument("--distinct", type=int, default=600, help="distinct frames read from the footage")
    ap.add_argument("--redis", default=None, help="use this Redis (its keys under bench-* are written)")
    ap.add_argument("--redis-server", default=None, help="redis-server binary to start on a free port")
    ap.add_argument("--json", default=None, help="also write the summary to this file")
    ap.add_argument("--quick", action="store_true", help="(a) and (b) only: no profiled pass, no (c)")
    args = ap.parse_args(argv)
    args.processes = [int(c) for c in args.processes.split(",") if c]
    args.decodes = [d for d in args.decodes.split(",") if d]
    args.pipeline = [int(c) for c in args.pipeline.split(",") if c]
    small = args.n == "small"
    args.n = SMALL_N if small else int(args.n)
    args.batch_size = args.batch_size or (8 if small else 32)
    args.naive_frames = args.naive_frames or min(args.n, 300)
    if args.n < args.drives * args.cameras:
        args.drives, args.cameras = 1, min(args.cameras, args.n)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.backends.cudnn.benchmark = True
    jpegs = load_jpegs(args.footage, min(args.distinct, args.n))
    results = []
    with redis_server(args.redis_server, args.redis) as url:
        for model in args.models.split(","):
            print(f"benchmarking {model} …", file=sys.stderr, flush=True)
            results.append(asyncio.run(bench_model(model, url, jpegs, args)))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # kept if a later model fails
    summary = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "prefetch": args.prefetch,
        "imgsz": args.imgsz,
        "frames": args.n,
        "jpeg_bytes_mean": int(np.mean([len(j) for j in jpegs])),
        "streams": args.drives * args.cameras,
        "partitions": args.partitions,
        "goals": {"b_over_a": 0.8, "b_over_c": 10},
        "results": results,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return summary


if __name__ == "__main__":
    main()
