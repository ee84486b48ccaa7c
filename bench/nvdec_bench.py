"""Where an NVDEC ingest process spends its time: the GPU decode path, piece by piece, side by side.

For the same clips, with ``--sessions`` decoders at once (threads of one process, as the
NVDEC ingest worker runs its jobs), each row adds one piece of ``stages.nvdec.NvdecSampler``:

* ``nvdec_native``: decode every frame, NV12 left on the GPU (the ceiling of run_bench);
* ``nvdec_rgbp``: the same, converted to planar RGB by the decoder (the sampler's setting);
* ``timeline``: the sampler's demux-only PyAV pass (presentation times and SEI), CPU only;
* ``sampler``: ``NvdecSampler.sample`` whole: timeline, decode up to the last sampled
  frame, resize and nvJPEG-encode the sampled frames, read their telemetry;
* ``pyav_sampled_1_thread``: for scale, ingest's CPU path per clip (``sample_clip`` and
  ``encode_frame``) in one process with one decoder thread.

Reports decoded frames per second, six-camera footage seconds per wall second
(``x_real_time`` = clip seconds / 6 / wall seconds), and the process's CPU seconds per
1,000 decoded frames (``/proc/self`` via ``time.process_time``): on a box whose cores are
all taken by PyAV decoding, NVDEC adds only what its own host side leaves free.

    python3 bench/nvdec_bench.py --clips /data/footage --sessions 1 4 8 --out nvdec.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.decode import ClipStats, clip_info, open_container, sample_clip  # noqa: E402
from stages.frames import encode_frame  # noqa: E402
from stages.nvdec import BATCH, NvdecSampler, nvdec_unavailable, timeline  # noqa: E402


def _decode_all(color: str) -> Callable[[str], int]:
    import PyNvVideoCodec as nvc

    def decode(path: str) -> int:
        decoder = nvc.SimpleDecoder(path, gpu_id=0, use_device_memory=True,
                                    output_color_type=getattr(nvc.OutputColorType, color))  # fmt: skip
        count = 0
        while frames := decoder.get_batch_frames(BATCH):
            count += len(frames)
        return count

    return decode


def _timeline(path: str) -> int:
    return len(timeline(Path(path)).candidates)


def _sampler(sample_fps: float) -> Callable[[str], int]:
    sampler = NvdecSampler("cuda:0")

    def decode(path: str) -> int:
        stats = ClipStats()
        for _ in sampler.sample(path, sample_fps=sample_fps, stats=stats):
            pass
        return stats.decoded

    return decode


def _pyav_sampled(sample_fps: float) -> Callable[[str], int]:
    def decode(path: str) -> int:
        stats = ClipStats()
        for sample in sample_clip(path, sample_fps=sample_fps, threads=1, stats=stats):
            encode_frame(sample.image, long_side=640)
        return stats.decoded

    return decode


def measure(name: str, work: Callable[[str], int], clips: list[str], sessions: int, clip_s: float) -> dict:
    """One row: ``work`` over every clip, ``sessions`` at once."""
    work(clips[0])  # warm: CUDA context, nvJPEG handles, imports
    cpu, started = time.process_time(), time.monotonic()
    with ThreadPoolExecutor(sessions) as pool:
        frames = sum(pool.map(work, clips))
    wall, cpu = time.monotonic() - started, time.process_time() - cpu
    row = {"row": name, "sessions": sessions, "frames": frames, "wall_s": round(wall, 2),
           "frames_per_s": round(frames / wall, 1), "x_real_time": round(clip_s / 6 / wall, 2),
           "cpu_s_per_1000_frames": round(1000 * cpu / max(frames, 1), 3), "cpu_cores_busy": round(cpu / wall, 2)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=Path, required=True, help="A folder searched for *.mp4.")
    parser.add_argument("--limit", type=int, default=48, help="At most this many clips.")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--sample-fps", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=Path("nvdec-bench.json"))
    args = parser.parse_args(argv)
    clips = sorted(str(p) for p in args.clips.rglob("*.mp4"))[: args.limit]
    if not clips:
        parser.error(f"{args.clips}: no .mp4 files")
    clip_s = 0.0
    for path in clips:
        with open_container(Path(path)) as container:
            info = clip_info(container)
            clip_s += info.frames / info.fps if info.fps else 0.0
    if (why := nvdec_unavailable()) is not None:
        parser.error(f"NVDEC unavailable: {why}")
    rows = []
    for sessions in args.sessions:
        rows.append(measure("nvdec_native", _decode_all("NATIVE"), clips, sessions, clip_s))
        rows.append(measure("nvdec_rgbp", _decode_all("RGBP"), clips, sessions, clip_s))
        rows.append(measure("timeline", _timeline, clips, sessions, clip_s))
        rows.append(measure("sampler", _sampler(args.sample_fps), clips, sessions, clip_s))
    rows.append(measure("pyav_sampled_1_thread", _pyav_sampled(args.sample_fps), clips[:4], 1,
                        clip_s * 4 / len(clips)))  # fmt: skip
    args.out.write_text(json.dumps({"clips": len(clips), "clip_seconds": round(clip_s, 1), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
