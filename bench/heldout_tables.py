"""Markdown tables of a held-out run's figures (``stages.train.heldout`` output).

    python bench/heldout_tables.py OUT/heldout_figures.json [--baseline before.json]

Prints, per source and pooled, frame-level MCC / AUC / TP FP FN TN for the scorer, the
detector as a classifier and the combined rule; with ``--baseline`` (a
``bench/classify_sources.py`` output) the baseline's figures on the same sources too.
"""

from __future__ import annotations

import argparse
import json


def _cell(f: dict | None) -> str:
    if not f:
        return "—"
    mcc = "—" if f.get("mcc") is None else f"{f['mcc']:.2f}"
    auc = "—" if f.get("roc_auc") is None else f"{f['roc_auc']:.2f}"
    return f"{mcc} / {auc} / {f['tp']} {f['fp']} {f['fn']} {f['tn']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("figures")
    parser.add_argument("--baseline", default="")
    opts = parser.parse_args()
    figures = json.load(open(opts.figures))["figures"]
    keys = [k for k in ("scorer", "detector_det_max_auc", "combined", "combined_detector_only") if k in figures]
    base = json.load(open(opts.baseline)) if opts.baseline else {}
    base_keys = [k for k in ("scorer", "detector_det_max_auc") if k in base]
    head = ["source", *keys, *[f"before: {k}" for k in base_keys]]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    sources = [s for s in figures[keys[0]] if s != "pooled"] + ["pooled"]
    for source in sources:
        cells = [_cell(figures[k].get(source)) for k in keys] + [_cell(base[k].get(source)) for k in base_keys]
        print(f"| {source} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
