"""How bare PyAV decoding scales with processes on this machine: the cores ingest really has.

N processes (one decoder thread each, ``thread_count = 1``) decode the same clip over and
over for ``--seconds``; the row gives frames per second in all, per process, and against
N times one process. Where the machine's "cores" are hyper-threads (two per physical
core) the per-process rate drops once N passes the physical cores, whatever the CPU
busy share says. Also prints what ``/proc/cpuinfo`` says of threads per core.

    python bench/decode_scaling.py CLIP.mp4 --processes 1,4,8,12,16 --seconds 8

Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import av


def cpu_topology() -> dict[str, Any]:
    """Logical CPUs, and /proc/cpuinfo's siblings and cores per package (x86 Linux)."""
    info: dict[str, Any] = {"logical": os.cpu_count(), "usable": len(os.sched_getaffinity(0))}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for key in ("model name", "siblings", "cpu cores"):
        line = next((ln for ln in text.splitlines() if ln.startswith(key)), None)
        if line:
            info[key.replace(" ", "_")] = line.split(":", 1)[1].strip()
    info["ht_flag"] = " ht " in next((ln for ln in text.splitlines() if ln.startswith("flags")), "") + " "
    cores = {(b.get("physical id"), b.get("core id")) for b in _blocks(text)}
    info["physical_cores_seen"] = len(cores) if cores != {(None, None)} else None
    return info


def _blocks(text: str) -> list[dict[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(ln.split(":", 1) for ln in block.splitlines() if ":" in ln)
        out.append({k.strip(): v.strip() for k, v in fields.items()})
    return out


def _decode_for(path: str, seconds: float, keyframes: bool, start: float, out: mp.Queue) -> None:
    while time.time() < start:  # every process starts decoding at the same instant
        time.sleep(0.001)
    frames, deadline, cpu0 = 0, start + seconds, time.process_time()
    while time.time() < deadline:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            if keyframes:
                stream.codec_context.skip_frame = "NONKEY"
            for _ in container.decode(stream):
                frames += 1
                if time.time() >= deadline:
                    break
    out.put((frames, time.time() - start, time.process_time() - cpu0))


def scale(path: str, counts: list[int], seconds: float, keyframes: bool) -> list[dict[str, Any]]:
    """One row per process count: frames/s in all and per process, and the ratio to linear."""
    rows, one = [], None
    ctx = mp.get_context("spawn")
    for n in counts:
        queue = ctx.Queue()
        start = time.time() + 1.5  # the spawned interpreters are up by then
        procs = [
            ctx.Process(target=_decode_for, args=(path, seconds, keyframes, start, queue)) for _ in range(n)
        ]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        total = sum(f for f, _, _ in results) / max(w for _, w, _ in results)
        per = total / n
        one = per if one is None and n == 1 else one
        row = {"processes": n, "frames_per_s": round(total, 1), "per_process": round(per, 1),
               "cpu_s_per_process": round(sum(c for _, _, c in results) / n, 2)}  # fmt: skip
        if one:
            row["ratio_to_linear"] = round(per / one, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse, measure, print and write the report."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("clip", help="an H.264 clip (the footage's size: 1280x960 for Tesla's HW3 cameras)")
    parser.add_argument("--processes", default="1,2,4,8,12,16", help="process counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=8.0, help="decoding time per count")
    parser.add_argument("--keyframes", action="store_true", help="decode only the keyframes")
    parser.add_argument("--out", type=Path, default=Path("decode-scaling.json"))
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.processes.split(",") if x]
    report = {"cpu": cpu_topology(), "clip": args.clip, "keyframes": args.keyframes,
              "rows": scale(args.clip, counts, args.seconds, args.keyframes)}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
