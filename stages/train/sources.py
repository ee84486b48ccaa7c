"""Training items from many sources, each item keeping the source it came from.

Validation that holds out whole sources needs every image's source: a camera (one car,
one phone, one dataset's rig) teaches its look to a model, so frames of one source must
never sit on both sides of a split. This module gathers, from the shared data:

* footage clips (``footage/MANIFEST.tsv``): frames sampled inside their labelled spans
  (``stages.train.scorer.labelled_spans``), source = the clip's repository;
* labelled frames (``labelled/frames/MANIFEST.tsv``): label and ``source_repo`` per image;
* boxed sets in YOLO format (``labelled/cones``, ``labelled/roadwork-objects``): images
  with boxes, their classes mapped onto the 11-class roadwork list (``ROADWORK_CLASSES``).

``build_pack`` writes downscaled copies of all of them and one ``items.tsv`` into a folder
small enough to carry to a GPU machine (the device takes 64 MiB a call); ``read_pack``
reads it back. Boxes are normalised, so resizing keeps them.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from stream.errors import FootageError, InputError

Log = Callable[[str], None]

#: The design's roadwork object types, in the class order of ``labelled/roadwork-objects``.
ROADWORK_CLASSES: tuple[str, ...] = (
    "cone",
    "drum",
    "barricade",
    "barrier",
    "vertical_panel",
    "tubular_marker",
    "arrow_board",
    "message_board",
    "roadwork_sign",
    "work_vehicle",
    "worker",
)
#: Source of the cone set (its README: Roboflow "traffic cones v1" via this repository).
CONES_SOURCE = "FatimaRana50/YOLOv8-to-Detect-Traffic-Cones"
ITEM_COLUMNS = ("file", "label", "source", "origin", "split", "boxes", "note", "contains")


@dataclass(frozen=True)
class Item:
    """One training image.

    Attributes:
        path: the image file (JPEG or PNG).
        label: 1 roadwork in view, 0 clear, -1 not a scene label (a boxed object photo
            whose frame label is unknown).
        source: the repository or camera it came from; splits hold out whole sources.
        origin: ``footage``, ``frames``, ``cones``, ``roadwork-objects`` or ``synthetic``.
        split: the boxed set's own split (``train``/``val``/``test``), else ``""``.
        boxes: YOLO rows ``(class, cx, cy, w, h)``, normalised, class in ``ROADWORK_CLASSES``.
        note: where in the source it came from (clip and second, original path).
        contains: other sources whose pixels it holds (a synthesised frame's pasted
            objects), so that holding out a source also drops frames pasted from it.
    """

    path: Path
    label: int
    source: str
    origin: str
    split: str = ""
    boxes: tuple[tuple[int, float, float, float, float], ...] = field(default=())
    note: str = ""
    contains: tuple[str, ...] = ()

    @property
    def sources(self) -> set[str]:
        """Every source whose pixels this item holds."""
        return {self.source, *self.contains}


# --------------------------------------------------------------------------- readers


def frames_items(folder: str | Path) -> list[Item]:
    """Items of a labelled-frames folder (``MANIFEST.tsv``: file, label, source_repo, …).

    Raises:
        FootageError: the manifest is missing, or a row lacks a file, label or source.
    """
    folder = Path(folder)
    rows = _tsv(folder / "MANIFEST.tsv")
    items = []
    for row in rows:
        try:
            path, label, source = folder / row["file"], int(row["label"]), row["source_repo"]
        except (KeyError, TypeError, ValueError) as exc:
            raise FootageError(folder / "MANIFEST.tsv", f"row {row!r} lacks file, label or source") from exc
        if not path.is_file():
            raise FootageError(path, "listed in MANIFEST.tsv but missing")
        items.append(Item(path, label, source, "frames", note=row.get("path", "")))
    return items


def boxed_items(folder: str | Path, origin: str, default_source: str = "") -> list[Item]:
    """Items of a YOLO-format folder (``data.yaml`` + ``images/<split>``, ``labels/<split>``).

    Classes are mapped by name onto ``ROADWORK_CLASSES``; boxes of other classes are
    dropped. The source is the ``source_repo`` of a ``MANIFEST.tsv`` row when the folder
    has one, else ``default_source``. An image with boxes is labelled -1 (its scene is not
    labelled); an empty label file (a background image) 0.

    Raises:
        InputError: ``data.yaml`` is missing, names a class twice, or a label row is malformed.
    """
    folder = Path(folder)
    data_file = folder / "data.yaml"
    if not data_file.is_file():
        message = f"{data_file}: YOLO data.yaml not found"
        raise InputError(message)
    data = yaml.safe_load(data_file.read_text())
    names = data["names"] if isinstance(data["names"], dict) else dict(enumerate(data["names"]))
    class_map = {int(k): ROADWORK_CLASSES.index(v) for k, v in names.items() if v in ROADWORK_CLASSES}
    sources = {}
    if (folder / "MANIFEST.tsv").is_file():
        sources = {Path(r["file"]).name: r["source_repo"] for r in _tsv(folder / "MANIFEST.tsv")}
    items = []
    for split in ("train", "val", "test"):
        if split not in data:
            continue
        images = folder / data[split]
        for path in sorted(images.iterdir()) if images.is_dir() else ():
            labels = folder / "labels" / images.name / (path.stem + ".txt")
            boxes = _read_boxes(labels, class_map)
            source = sources.get(path.name, default_source)
            items.append(Item(path, -1 if boxes else 0, source, origin, split, boxes, path.name))
    return items


def _read_boxes(path: Path, class_map: dict[int, int]) -> tuple[tuple[int, float, float, float, float], ...]:
    if not path.is_file():
        return ()
    boxes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            cls, cx, cy, w, h = int(parts[0]), *map(float, parts[1:5])
        except (ValueError, TypeError) as exc:
            message = f"{path}:{number}: not a YOLO row 'class cx cy w h': {line!r}"
            raise InputError(message) from exc
        if cls in class_map and w > 0 and h > 0:
            boxes.append((class_map[cls], cx, cy, w, h))
    return tuple(boxes)


def footage_items(footage: str | Path, out: Path, fps: float, log: Log = print) -> list[Item]:
    """Frames of every footage clip inside its labelled spans, written as JPEGs under ``out``.

    Parameters:
        footage: the folder of ``MANIFEST.tsv`` (its ``repo`` column is the source).
        out: where the frames go (``out/<clip>_<ms>.jpg``).
        fps: frames sampled per second of clip.

    Raises:
        FootageError: the manifest or a clip is unusable.
    """
    import simplejpeg

    from stages.train.scorer import extract_frames, read_manifest

    repos = {Path(r["file"]).stem: r.get("repo", "") for r in _tsv(Path(footage) / "MANIFEST.tsv")}
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for clip in read_manifest(footage):
        frames = extract_frames(clip, fps, short_side=0, with_time=True)
        for image, label, t in frames:
            path = out / f"{clip.name}_{round(t * 1000):06d}.jpg"
            array = image.permute(1, 2, 0).contiguous().numpy()
            path.write_bytes(simplejpeg.encode_jpeg(array, quality=92, colorspace="RGB"))
            items.append(Item(path, label, repos.get(clip.name) or clip.group, "footage", note=f"{clip.name}@{t:.2f}s"))
        log(f"footage: {clip.name}: {len(frames)} frames")
    return items


def _tsv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FootageError(path, "manifest not found")
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


# --------------------------------------------------------------------------- the pack


def build_pack(
    shared: str | Path, out: str | Path, *, long_side: int = 512, quality: int = 85, fps: float = 2.0,
    log: Log = print,
) -> list[Item]:
    """Gather every source under ``shared`` into a carryable folder.

    Parameters:
        shared: the folder holding ``footage/`` and ``labelled/{frames,cones,roadwork-objects}``
            (any of them may be absent).
        out: the pack folder: ``images/<origin>/…`` and ``items.tsv``.
        long_side: images larger than this are shrunk to it (pixels).
        quality: JPEG quality of the copies.
        fps: frames per second sampled from footage clips.

    Returns:
        The items, with paths inside the pack.
    """
    shared, out = Path(shared), Path(out)
    items: list[Item] = []
    if (shared / "footage" / "MANIFEST.tsv").is_file():
        items += footage_items(shared / "footage", out / "raw-footage", fps, log)
    labelled = shared / "labelled"
    if (labelled / "frames" / "MANIFEST.tsv").is_file():
        items += frames_items(labelled / "frames")
    if (labelled / "cones" / "data.yaml").is_file():
        items += boxed_items(labelled / "cones", "cones", CONES_SOURCE)
    if (labelled / "roadwork-objects" / "data.yaml").is_file():
        items += boxed_items(labelled / "roadwork-objects", "roadwork-objects")
    packed = [_copy(item, out, long_side, quality) for item in items]
    write_items(out / "items.tsv", packed, relative_to=out)
    raw = out / "raw-footage"
    if raw.is_dir():
        for file in raw.iterdir():
            file.unlink()
        raw.rmdir()
    log(f"pack: {len(packed)} items from {len({i.source for i in packed})} sources in {out}")
    return packed


def _copy(item: Item, out: Path, long_side: int, quality: int) -> Item:
    import cv2

    image = cv2.imread(str(item.path), cv2.IMREAD_COLOR)
    if image is None:
        message = f"{item.path}: not a readable image"
        raise InputError(message)
    scale = long_side / max(image.shape[:2])
    if scale < 1:
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    # A short hash keeps names unique across sources that reuse file names.
    digest = hashlib.sha1(str(item.path).encode()).hexdigest()[:8]
    target = out / "images" / item.origin / f"{item.path.stem}_{digest}.jpg"
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return Item(target, item.label, item.source, item.origin, item.split, item.boxes, item.note)


def write_items(path: Path, items: Iterable[Item], relative_to: Path | None = None) -> None:
    """Write items as a TSV (``ITEM_COLUMNS``); boxes as ``c cx cy w h`` joined by ``;``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(ITEM_COLUMNS)
        for item in items:
            file = item.path.relative_to(relative_to) if relative_to else item.path
            boxes = ";".join(" ".join(f"{v:.6g}" for v in box) for box in item.boxes)
            row = [file, item.label, item.source, item.origin, item.split, boxes, item.note, "|".join(item.contains)]
            writer.writerow(row)


def read_pack(folder: str | Path, items_file: str = "items.tsv") -> list[Item]:
    """The items of a pack folder (paths made absolute).

    Raises:
        FootageError: the items file is missing or a row is malformed.
    """
    folder = Path(folder)
    items = []
    for row in _tsv(folder / items_file):
        try:
            boxes = tuple(
                (int(b.split()[0]), *map(float, b.split()[1:5])) for b in row["boxes"].split(";") if b.strip()
            )
            contains = tuple(s for s in (row.get("contains") or "").split("|") if s)
            items.append(
                Item(folder / row["file"], int(row["label"]), row["source"], row["origin"], row["split"], boxes,
                     row["note"], contains)
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise FootageError(folder / items_file, f"malformed row {row!r}") from exc
    return items


def source_folds(items: Sequence[Item], k: int, seed: int = 0) -> list[list[str]]:
    """Split the sources into ``k`` groups, every source in exactly one.

    Sources with scene positives (label 1) are dealt out first, largest first, so each
    fold holds roadwork where the data allows; then the rest, largest first, onto the
    fold with the fewest items. ``seed`` breaks ties between sources of one size.

    Returns:
        ``k`` lists of source names (fewer when there are fewer sources).
    """
    rng = np.random.default_rng(seed)
    counts: dict[str, list[int]] = {}
    for item in items:
        c = counts.setdefault(item.source, [0, 0])
        c[0] += 1
        c[1] += item.label == 1
    order = sorted(counts, key=lambda s: (-(counts[s][1] > 0), -counts[s][0], rng.random()))
    folds: list[list[str]] = [[] for _ in range(min(k, len(order)))]
    sizes = [0] * len(folds)
    positives = [0] * len(folds)
    for source in order:
        has_pos = counts[source][1] > 0
        key = (lambda i: (positives[i], sizes[i])) if has_pos else (lambda i: sizes[i])
        target = min(range(len(folds)), key=key)
        folds[target].append(source)
        sizes[target] += counts[source][0]
        positives[target] += counts[source][1]
    return folds
