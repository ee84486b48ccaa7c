"""The detect stage's models on the CPU: one forward pass per batch against passes of a few
frames, with glibc's malloc defaults and with ``keep_freed_heap``, side by side in one run.

Each setting runs in a fresh process (``mallopt`` is process-wide and cannot be undone):
the shipped cone detector (YOLO11n at its ``imgsz``) and the shipped frame scorer
(EfficientNet-Lite0 at 224) on the CPU, ``--batches`` batches of ``--batch`` frames of
``--size`` (ingest's frames are 640 on the long side), after one warm-up batch. Reports
frames per second and minor page faults per frame of each model; prints JSON.

    python3 bench/cpu_forward_bench.py               # 32-frame batches of 640x480
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = [  # (label, rows per pass: 0 = the whole batch, keep freed heap)
    ("one pass, glibc defaults", 0, False),
    ("passes of 4, glibc defaults", 4, False),
    ("one pass, keep_freed_heap", 0, True),
    ("passes of 4, keep_freed_heap (shipped)", 4, True),
]


def measure(
    rows: int, keep: bool, batch: int, batches: int, size: tuple[int, int]
) -> dict[str, dict[str, float]]:
    """Frames/s and page faults per frame of both models in this process."""
    import torch

    import stages.detect.detector as detector_module
    import stages.scorer as scorer_module
    from stages.detect import Detector, graphs
    from stages.scorer import RoadworkScorer
    from stream.settings import load_settings
    from workers.run import shipped_models

    for module in (detector_module, scorer_module):
        if not keep:
            module.keep_freed_heap = lambda: False
    for module in (graphs, scorer_module):
        module.CPU_FORWARD_ROWS = rows or 1_000_000
    settings = shipped_models(load_settings(environ={}))
    detector = Detector(settings.detect.model_copy(update={"device": "cpu"}))
    scorer = RoadworkScorer.load(settings.detect.scorer, device="cpu")
    generator = torch.Generator().manual_seed(0)
    frames = [torch.randint(0, 255, (3, size[1], size[0]), dtype=torch.uint8, generator=generator)
              for _ in range(batch)]  # fmt: skip
    out = {}
    for name, run in (("detector", detector.detect), ("scorer", scorer.score_frames)):
        run(frames)  # warm-up
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(batches):
            run(frames)
        seconds, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        n = batch * batches
        out[name] = {"frames_per_s": round(n / seconds, 2), "page_faults_per_frame": round((after.ru_minflt - before.ru_minflt) / n),
                     "sys_share": round((after.ru_stime - before.ru_stime) / seconds, 3)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--size", default="640x480", help="frame width x height")
    parser.add_argument("--child", nargs=2, metavar=("ROWS", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    if args.child:
        result = measure(int(args.child[0]), args.child[1] == "1", args.batch, args.batches, size)
        print(json.dumps(result))
        return
    rows = []
    for label, per_pass, keep in SETTINGS:
        command = [sys.executable, __file__, "--child", str(per_pass), str(int(keep)), "--batch", str(args.batch),
                   "--batches", str(args.batches), "--size", args.size]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append({"setting": label, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(json.dumps(rows[-1]), flush=True)
    print(
        json.dumps({"cores": os.cpu_count(), "batch": args.batch, "size": args.size, "rows": rows}, indent=1)
    )


if __name__ == "__main__":
    main()
