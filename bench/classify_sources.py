"""Per-source figures of given scorer/detector/rule files on a pack's real frames.

Used for the "before" line of ``stages/models/README.md``: the models shipped before the
many-source retraining, scored on the labelled frames of sources they never trained on
(``--origins frames``). Figures are frame level: MCC at 0.5 and ROC AUC per source and
pooled, for the scorer alone, the detector as a classifier (≥ 1 box ≥ 0.25 = roadwork;
AUC from the strongest box) and the combined rule when one is given.

    python bench/classify_sources.py --pack .devdata/pack --scorer stages/models/scorer.pt \\
        --detector stages/models/cones_yolo11n.pt --origins frames --out before.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stages.classify import FrameClassifier
from stages.scorer import read_image
from stages.train.heldout import by_source
from stages.train.sources import read_pack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", required=True)
    parser.add_argument("--scorer", required=True)
    parser.add_argument("--detector", default="")
    parser.add_argument("--rule", default="")
    parser.add_argument("--origins", nargs="*", default=["frames"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="")
    opts = parser.parse_args()
    items = [i for i in read_pack(opts.pack) if i.origin in opts.origins and i.label in (0, 1)]
    classifier = FrameClassifier.load(opts.scorer, opts.detector or None, opts.rule or None, opts.device)
    rows = []
    for start in range(0, len(items), 16):
        chunk = items[start : start + 16]
        for item, verdict in zip(chunk, classifier.classify([read_image(i.path) for i in chunk])):
            rows.append({
                "file": item.path.name, "source": item.source, "label": item.label,
                "scorer": verdict.scorer_probability, "combined": verdict.roadwork_probability,
                "detector": 1.0 if verdict.objects else 0.0, "det_max": verdict.det_max,
                "det_count": len(verdict.objects), "objects": [t for t, _, _ in verdict.objects],
            })
    result = {"models": vars(opts), "scorer": by_source(rows, "scorer")}
    if opts.detector:
        result["detector_any_box"] = by_source(rows, "detector")
        result["detector_det_max_auc"] = by_source(rows, "det_max", threshold=0.25)
    if opts.rule:
        result["combined"] = by_source(rows, "combined")
    result["rows"] = rows
    text = json.dumps(result, indent=2)
    if opts.out:
        Path(opts.out).write_text(text + "\n")
    for key in ("scorer", "detector_any_box", "detector_det_max_auc", "combined"):
        if key in result:
            pooled = result[key]["pooled"]
            print(key, {k: pooled[k] for k in ("mcc", "roc_auc", "tp", "fp", "fn", "tn")})


if __name__ == "__main__":
    main()
