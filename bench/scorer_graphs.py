"""The roadwork scorer eager and as CUDA graphs, side by side on one GPU.

``RoadworkScorer.score_frames`` as the detect worker calls it (uint8 frames already on the
device, resize to 224 included, fp16): host milliseconds per batch until the call returns
(what the detect process's event loop pays) and milliseconds per frame with the GPU done
(synchronised), for each batch size.

    python3 bench/scorer_graphs.py --out scorer-graphs.json      # needs CUDA
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from stages.scorer import DEFAULT_WEIGHTS, RoadworkScorer


def measure(scorer: RoadworkScorer, frames: list[torch.Tensor], reps: int) -> dict[str, float]:
    """Host ms per call and synchronised ms per frame over ``reps`` calls."""
    for _ in range(5):
        scorer.score_frames(frames)
    torch.cuda.synchronize()
    host = 0.0
    start = time.perf_counter()
    for _ in range(reps):
        t = time.perf_counter()
        scorer.score_frames(frames)
        host += time.perf_counter() - t
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    return {"host_ms_per_batch": round(host / reps * 1000, 3), "ms_per_frame": round(total / reps / len(frames) * 1000, 4)}


def main() -> None:
    """Measure every batch size both ways and print (and write) the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 32, 64])
    parser.add_argument("--size", default="640x360", help="Frame size WxH as the detect worker gets it.")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rows = []
    for batch in args.batches:
        frames = [torch.randint(0, 256, (3, height, width), dtype=torch.uint8, device="cuda") for _ in range(batch)]
        row = {"batch": batch}
        for name, graphs in (("eager", False), ("graphs", True)):
            scorer = RoadworkScorer.load(DEFAULT_WEIGHTS, "cuda", cuda_graphs=graphs)
            row[name] = measure(scorer, frames, args.reps)
        rows.append(row)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "size": args.size, "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
