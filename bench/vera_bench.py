"""Benchmark of the vera stage: worker throughput through Redis against direct backend calls.

Two figures, one run:

1. segments scored per second by the real runtime (``workers.runtime.Worker`` running
   ``workers.handlers.vera.VeraHandler``) reading segments from Redis, fetching key frames from the
   Redis blob store and publishing scores — against ``p_yes_many`` called directly on the
   same prompts in chunks of the same size, on the same loaded model (goal: >= 80 %);
2. images per segment prompt: the key frames the temporal windows (``stages.window``)
   keep from a synthetic 5 fps drive, against uniform sampling at the ingest rate
   (``ingest.sample_fps x detect.window_s``) — goal: cut by >= 5x.

Runs on CPU with the tiny test model (built locally when ``--model`` is not given) or on a
GPU with any image-text-to-text model::

    python3 bench/vera_bench.py --redis-server /usr/bin/redis-server --device cpu --segments 16
    python3 bench/vera_bench.py --redis-server $(which redis-server) --device cuda --model Qwen/Qwen2-VL-2B-Instruct

Prints a JSON summary as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

NS = "rsbench"
DRIVE = "dbench"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--redis", help="URL of a running Redis (its database is flushed)")
    where.add_argument("--redis-server", help="path of redis-server to start on a free port")
    parser.add_argument("--model", default="", help="model path or name (default: build the tiny test model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--segments", type=int, default=16, help="segments to score (drive length / stride)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    parser.add_argument("--max-concurrency", type=int, default=2)
    parser.add_argument("--image-size", default="640x480", help="frame size WxH")
    return parser.parse_args()


# -- a synthetic drive and its windows -------------------------------------------------------


def synthetic_frames(seconds: float, fps: float, size: tuple[int, int], seed: int = 0):
    """Frames of a drive whose scene changes every few seconds, with small motion in between."""
    rng = np.random.default_rng(seed)
    width, height = size
    n = int(seconds * fps)
    scene = None
    for i in range(n):
        t = i / fps
        if scene is None or rng.random() < 1.0 / (3.0 * fps):  # a new scene about every 3 s
            scene = rng.integers(0, 255, (height // 16, width // 16, 3), dtype=np.uint8)
        shift = int(t * 8) % 16
        big = np.kron(scene, np.ones((16, 16, 1), dtype=np.uint8))
        frame = np.roll(big, shift, axis=1)
        noise = rng.integers(-6, 7, frame.shape)
        yield i, t, np.clip(frame.astype(int) + noise, 0, 255).astype(np.uint8)


def descriptor(frame: np.ndarray) -> np.ndarray:
    """A small grey thumbnail, centred: what the window compares consecutive frames by."""
    grey = frame.mean(axis=2)
    h, w = grey.shape
    thumb = grey[: h - h % 12, : w - w % 16].reshape(12, (h - h % 12) // 12, 16, (w - w % 16) // 16).mean(axis=(1, 3))
    flat = thumb.ravel()
    return flat - flat.mean()


def encode_jpeg(frame: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def make_segments(settings, count: int, size: tuple[int, int]):
    """Segments the real temporal window cuts from a synthetic drive, and their blobs."""
    from stages.window import CameraWindows, WindowConfig, WindowFrame
    from stream.ids import blob_key

    config = WindowConfig.from_settings(settings.detect)
    seconds = count * config.stride_s + config.length_s
    windows = CameraWindows(DRIVE, "front", config)
    blobs: dict[str, bytes] = {}
    segments = []
    for seq, t, frame in synthetic_frames(seconds, settings.ingest.sample_fps, size):
        key = blob_key(DRIVE, "front", seq)
        blobs[key] = encode_jpeg(frame)
        update = windows.add(WindowFrame(seq=seq, tick=seq, t=t, blob_key=key, descriptor=descriptor(frame)))
        segments += update.segments
    segments += windows.flush().segments
    kept = {kf.blob_key for s in segments for kf in s.key_frames}
    return segments[:count], {k: v for k, v in blobs.items() if k in kept}


# -- the two measurements --------------------------------------------------------------------


async def direct_rate(backend, questions, segments, blobs, settings) -> float:
    """Segments per second with ``p_yes_many`` called directly, chunked as the worker does."""
    from stages.vera import score_segments
    from stages.vlm.base import VlmImage

    images = [[VlmImage(blobs[kf.blob_key], f"front t={kf.t:.1f}s") for kf in s.key_frames] for s in segments]
    size = settings.vlm.batch_size
    started = time.perf_counter()
    for i in range(0, len(images), size):
        await score_segments(backend, questions, images[i : i + size], max_images=settings.vlm.max_images)
    return len(segments) / (time.perf_counter() - started)


async def worker_rate(backend, questions, segments, blobs, settings, url: str) -> tuple[float, int]:
    """Segments per second through Redis and the real runtime, until every score is published."""
    from brokers.redis import RedisBlobStore, RedisBroker
    from stream import codec, names
    from workers.runtime import Worker
    from workers.handlers.vera import VeraHandler

    broker = RedisBroker(url=url, namespace=NS, settings=settings.broker)
    store = RedisBlobStore(url, namespace=NS)
    await store.put_many(blobs)
    out = names.stream_name(names.ANOMALY, names.drive_partition(DRIVE, settings.broker.fuse_partitions), ns=NS)
    handler = VeraHandler(settings, store, backend=backend, questions=questions)
    worker = Worker(handler, broker, store, settings)
    task = asyncio.create_task(worker.run())
    while not worker.started:  # the handler's start is not part of the rate
        await asyncio.sleep(0.01)
    started = time.perf_counter()
    await broker.publish_many(
        [_publish(names.stream_name(names.SEGMENTS, ns=NS), codec.encode(s)) for s in segments]
    )
    while (await broker.stats(out)).length < len(segments):
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - started
    worker.stop()
    await asyncio.wait_for(task, timeout=60)
    published = (await broker.stats(out)).length
    await broker.close()
    await store.close()
    return len(segments) / elapsed, published


def _publish(stream: str, data: bytes):
    from brokers.base import Publish

    return Publish(stream, data)


# -- plumbing --------------------------------------------------------------------------------


def start_redis(path: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [path, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    import redis

    for _ in range(100):
        try:
            if redis.Redis(port=port).ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{path} did not start")


async def run(args: argparse.Namespace, url: str, model: str) -> dict:
    import redis

    from stages.vera import default_questions
    from stages.vlm.transformers_backend import TransformersBackend
    from stream.settings import Settings

    redis.Redis.from_url(url).flushdb()
    settings = Settings(
        namespace=NS,
        vlm={"backend": "transformers", "model": model, "device": args.device, "batch_size": args.batch_size,
             "max_concurrency": args.max_concurrency},
        worker={"batch_size": args.batch_size * args.max_concurrency, "max_wait_ms": 20},
    )
    width, height = (int(v) for v in args.image_size.split("x"))
    segments, blobs = make_segments(settings, args.segments, (width, height))
    backend = TransformersBackend(model=model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    questions = default_questions()
    await direct_rate(backend, questions, segments[: args.batch_size], blobs, settings)  # warm-up
    direct = await direct_rate(backend, questions, segments, blobs, settings)
    through, published = await worker_rate(backend, questions, segments, blobs, settings, url)
    images = [min(len(s.key_frames), settings.vlm.max_images) for s in segments]
    uniform = settings.ingest.sample_fps * settings.detect.window_s
    mean_images = float(np.mean(images))
    return {
        "model": model,
        "device": args.device,
        "segments": len(segments),
        "published": published,
        "batch_size": args.batch_size,
        "direct_segments_per_s": round(direct, 3),
        "worker_segments_per_s": round(through, 3),
        "worker_vs_direct": round(through / direct, 3),
        "goal_worker_vs_direct": 0.8,
        "images_per_prompt_mean": round(mean_images, 2),
        "images_per_prompt_max": max(images),
        "key_frames_per_segment_mean": round(float(np.mean([len(s.key_frames) for s in segments])), 2),
        "max_images": settings.vlm.max_images,
        "uniform_images_per_segment": uniform,
        "image_reduction": round(uniform / mean_images, 2),
        "goal_image_reduction": 5.0,
        "frames_source": "synthetic drive (scene change every ~3 s), stages.window with detect settings",
    }


def main() -> None:
    args = parse_args()
    proc = None
    url = args.redis
    if args.redis_server:
        proc, url = start_redis(args.redis_server)
    try:
        model = args.model
        if not model:
            from vlm_tiny import build_tiny_vlm

            model = str(build_tiny_vlm(Path(tempfile.gettempdir()) / "roadstream-tiny-vlm"))
        summary = asyncio.run(run(args, url, model))
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
