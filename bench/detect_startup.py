"""Where a detect worker's start-up goes: seconds per phase, in one fresh process each.

A ``roadstream run`` in keyframe mode finishes ingest in seconds; its verdicts then wait
for the detect worker to import torch and ultralytics and load the shipped models, and
for each batch shape's first batch (decode, detector, scorer; cuDNN's plans and the
CUDA graph capture). This script times those phases as the worker runs them: imports,
loads, the worker's warm-up (``DetectHandler._warm_up``: one full batch of the frames
ingest makes of a Tesla camera, 640×480), then a full batch of ``--frame`` (640×360 by
default: another camera's shape, captured on its first batch) twice, the second as a
shape seen before. ``--padded-sizes`` first runs a 640×360 batch of each padded size up
to the batch, as the warm-up did until 2026-12-02 (with ``--set detect.pad_batch_to=8``:
four shapes).

    python bench/detect_startup.py                       # shipped models, detect.device=auto
    python bench/detect_startup.py --set detect.cudnn_benchmark=true
    python bench/detect_startup.py --set detect.pad_batch_to=8 --padded-sizes   # the start until 2026-12-02

Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time each phase of a detect worker's start, then a first batch of real-sized frames."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument(
        "--frame", default="640x360", help="WxH of the frames of the batches after the warm-up"
    )
    parser.add_argument("--padded-sizes", action="store_true",
                        help="first a 640x360 batch of each padded size (the warm-up until 2026-12-02)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("detect-startup.json"))
    args = parser.parse_args(argv)
    phases: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = round(now - mark, 2)
        mark = now
        print(json.dumps({name: phases[name]}), flush=True)

    import numpy as np
    import simplejpeg

    from stream.settings import load_settings

    lap("python_and_settings_import")
    import torch

    lap("import_torch")
    import stages.detect  # ultralytics loads here

    lap("import_ultralytics")
    from stages import shipped
    from workers.handlers.detect import DetectHandler

    overrides: dict[str, dict[str, str]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, field = key.partition(".")
        overrides.setdefault(section, {})[field] = value
    settings = load_settings(environ={}, **overrides)
    handler = DetectHandler(settings, blobs=None)
    detect = shipped.resolve(settings.detect)
    handler.settings = settings.model_copy(update={"detect": detect})
    handler.detector = stages.detect.Detector(detect)
    if handler.detector.cuda:
        torch.cuda.synchronize()
    lap("detector_load")
    handler.scorer = handler._load_scorer() if detect.scorer else None
    lap("scorer_load")
    handler._bound_padding()
    cuda = handler.detector.device.type == "cuda"
    if cuda and args.padded_sizes:
        size, step = settings.worker.batch_size, settings.detect.pad_batch_to
        grey = simplejpeg.encode_jpeg(np.full((360, 640, 3), 114, dtype=np.uint8))
        for frames in sorted({*range(step, size + 1, step), size}):
            handler._run_batch([grey] * frames)
            torch.cuda.synchronize()
            lap(f"first_batch_640x360_padded_{frames}")
    if cuda:
        handler._warm_up()
        torch.cuda.synchronize()
        lap("warm_up")
    width, height = (int(v) for v in args.frame.split("x"))
    real = simplejpeg.encode_jpeg(
        np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    )
    for attempt in ("first", "second"):
        batch = settings.worker.batch_size
        handler._run_batch([real] * batch)
        if cuda:
            torch.cuda.synchronize()
        lap(f"{attempt}_batch_{batch}_of_{args.frame}")
    report = {"device": str(handler.detector.device), "settings": args.set, "phases_s": phases,
              "total_s": round(time.perf_counter() - T0, 2)}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
