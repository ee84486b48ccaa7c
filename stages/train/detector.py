"""Train the cone detector: an ultralytics YOLO nano built from ``yolo11n.yaml``.

Run ``python -m stages.train.detector --device cuda --epochs 100 --out DIR`` (or
``roadstream train detector``). Settings live in ``stages/models/cones_train.yaml``;
options override them. The data is a YOLO-format folder with ``data.yaml`` and
``images/{train,valid,test}`` (``../shared/labelled/cones``: one class ``cone``, CC BY 4.0,
see ``stages/models/ATTRIBUTION.md``). Writes to ``--out``:

* ``cones_yolo11n.pt`` — the best weights (ultralytics checkpoint, optimizer stripped);
* ``cones_yolo11n.json`` — metadata: data, settings, mAP50 on the test split, versions.

No download is possible or attempted: the model starts from its yaml (no pretrained .pt),
``YOLO_OFFLINE`` is set, font checks are skipped (plots are off), and mixed precision on
CUDA is bf16, which ultralytics runs without its AMP check (that check downloads a model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from stream.errors import InputError

Log = Callable[[str], None]

SETTINGS_FILE = Path(__file__).resolve().parents[1] / "models" / "cones_train.yaml"
WEIGHTS_NAME = "cones_yolo11n.pt"
ATTRIBUTION = (
    '"traffic cones v1" by fatimas-workspace, Roboflow Universe, CC BY 4.0 '
    "(https://universe.roboflow.com/fatimas-workspace/traffic-cones-y4m5x-7x7d8); "
    "classes merged into one, cone"
)


def offline_ultralytics() -> Any:
    """Import ultralytics set up so that it never reaches for the network."""
    os.environ["YOLO_OFFLINE"] = "1"
    import ultralytics
    import ultralytics.data.utils as data_utils

    # Fonts are only for plots, which are off; the check would try to download Arial.ttf.
    data_utils.check_font = lambda *args, **kwargs: None
    try:
        import polars  # noqa: F401
    except ImportError:
        # ultralytics reads its results.csv back with polars only to store it in each
        # checkpoint; a GPU machine without polars (54 MB) reads it with the csv module.
        from ultralytics.engine.trainer import BaseTrainer

        BaseTrainer.read_results_csv = _read_results_csv
    return ultralytics


def _read_results_csv(trainer) -> dict[str, list]:
    import csv

    try:
        with open(trainer.csv, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return {}
    return {k.strip(): [float(r[k]) for r in rows] for k in (rows[0] if rows else {})}


def load_settings(path: str | Path = SETTINGS_FILE, **overrides: Any) -> dict[str, Any]:
    """Training settings from the yaml file, with ``None``-free overrides on top."""
    settings = yaml.safe_load(Path(path).read_text()) or {}
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings


def prepare_data(cones: str | Path, work: Path) -> Path:
    """A ``data.yaml`` with an absolute path (ultralytics resolves ``path: .`` from its cwd).

    Raises:
        InputError: the folder has no ``data.yaml`` or lacks a split it names.
    """
    cones = Path(cones).resolve()
    source = cones / "data.yaml"
    if not source.is_file():
        message = f"{source}: cones data.yaml not found"
        raise InputError(message)
    data = yaml.safe_load(source.read_text())
    for split in ("train", "val", "test"):
        if split not in data or not (cones / data[split]).is_dir():
            message = f"{source}: split {split!r} missing or not a folder"
            raise InputError(message)
    data["path"] = str(_link_splits(cones, data, work / "data"))
    target = work / "data.yaml"
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    return target


def _link_splits(cones: Path, data: dict[str, Any], root: Path) -> Path:
    # A tree of links to the files of each split, so that ultralytics writes its label
    # caches (``labels/<split>.cache``) here, never into the shared data folder. Files
    # are linked one by one: ultralytics resolves the split folders' paths.
    for split in ("train", "val", "test"):
        images = cones / data[split]
        labels = Path(str(images).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"))
        for source, kind in ((images, "images"), (labels, "labels")):
            folder = root / kind / images.name
            if folder.is_symlink():
                folder.unlink()
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for file in source.iterdir() if source.is_dir() else ():
                (folder / file.name).symlink_to(file.resolve())
        data[split] = f"images/{images.name}"
    return root


def train(cones: str | Path, out: str | Path, settings: dict[str, Any], log: Log = print) -> dict[str, Any]:
    """Train, test the best weights on the test split, write weights and metadata.

    Parameters:
        cones: the YOLO-format data folder.
        out: where ``cones_yolo11n.pt`` and its ``.json`` go.
        settings: ultralytics train arguments (``model`` names the yaml to build).
        log: receives progress lines.

    Returns:
        The metadata written beside the weights.
    """
    ultralytics = offline_ultralytics()
    out = Path(out).resolve()
    work = out / "cones_run"
    data = prepare_data(cones, work)
    args = dict(settings)
    model_yaml = args.pop("model", "yolo11n.yaml")
    device = str(args.get("device", "cpu"))
    # bf16 on CUDA skips ultralytics' AMP check, which would download a model.
    args.setdefault("amp", "bf16" if device.startswith("cuda") or device.isdigit() else False)
    model = ultralytics.YOLO(model_yaml)
    _add_progress(model, log, int(args.get("epochs", 1)))
    model.train(data=str(data), project=str(work), name="train", exist_ok=True, plots=False, **args)
    best = Path(model.trainer.best)
    weights = out / WEIGHTS_NAME
    shutil.copyfile(best, weights)
    test = _test(ultralytics, weights, data, args)
    log(f"test split: mAP50 {test['map50']:.3f} mAP50-95 {test['map50_95']:.3f}")
    metadata = _metadata(weights, cones, model_yaml, args, test)
    weights.with_suffix(".json").write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def _add_progress(model, log: Log, epochs: int) -> None:
    def on_epoch_end(trainer) -> None:
        if trainer.epoch + 1 > epochs:
            return  # the final validation of the best weights fires this hook again
        metrics = {k.split("/")[-1]: round(float(v), 4) for k, v in (trainer.metrics or {}).items()}
        log(f"detector: epoch {trainer.epoch + 1}/{epochs} {metrics}")

    model.add_callback("on_fit_epoch_end", on_epoch_end)


def _test(ultralytics, weights: Path, data: Path, args: dict[str, Any]) -> dict[str, float]:
    best = ultralytics.YOLO(str(weights))
    keys = ("imgsz", "batch", "device", "workers")
    metrics = best.val(
        data=str(data), split="test", plots=False, verbose=False, **{k: args[k] for k in keys if k in args}
    )
    return {"map50": float(metrics.box.map50), "map50_95": float(metrics.box.map), "split": "test"}


def _metadata(weights: Path, cones, model_yaml: str, args: dict[str, Any], test: dict[str, float]) -> dict:
    import torch
    import ultralytics

    return {
        "model": {
            "arch": model_yaml,
            "classes": ["cone"],
            "start": "random init from yaml (no pretrained weights)",
        },
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "training_data": {
            "path": str(Path(cones).resolve()),
            "attribution": ATTRIBUTION,
            "licence": "CC BY 4.0",
        },
        "settings": {k: v for k, v in args.items()},
        "test": test,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "ultralytics": ultralytics.__version__,
        },
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset ones fall back to the settings file."""
    parser = argparse.ArgumentParser(
        prog="python -m stages.train.detector", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--cones", default="../shared/labelled/cones", help="YOLO data folder with data.yaml")
    parser.add_argument("--out", default="stages/models", help="where the weights and metadata go")
    parser.add_argument("--settings", default=str(SETTINGS_FILE), help="training settings yaml")
    parser.add_argument("--device", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--imgsz", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--time", type=float, default=None, help="hours; caps training, overriding epochs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: train and print the test figures."""
    opts = parse_args(argv)
    settings = load_settings(
        opts.settings,
        device=opts.device,
        epochs=opts.epochs,
        imgsz=opts.imgsz,
        batch=opts.batch,
        workers=opts.workers,
        time=opts.time,
    )
    metadata = train(opts.cones, opts.out, settings, log=lambda line: print(line, flush=True))
    print(json.dumps(metadata["test"]))


if __name__ == "__main__":
    main()
