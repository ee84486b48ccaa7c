"""Comparing verdicts with labels: MCC, accuracy, precision, recall, confusion matrix.

Labels file, CSV (header required) or JSON (a list of objects with the same keys)::

    # d3f1…: roadwork somewhere in the drive; d0a9…: from 12 s to 30.5 s of the drive clock
    drive_id,t_start,t_end,label
    d3f1c2a9b0e7,,,1
    d0a9e1b2c3d4,12.0,30.5,1
    d0a9e1b2c3d4,30.5,60,0

(A ``#`` starts a comment only at the start of a line: after a value it is part of it.)

Instead of ``drive_id``, a column ``event`` may name the drive by its footage: its event
folder (``2024-05-01_10-00-00``) or its first clip (``2024-05-01_10-00-00-front.mp4``),
as ``make``-style drive lists have (``event,label``); ``match_labels`` maps those to drive
ids through the verdicts' ``drive_name`` and says which matched no drive.

``label`` is 1/0, true/false, yes/no or roadwork/none. Times are seconds of the drive
clock (the verdicts' ``t_start``/``t_end``); empty times label the whole drive.

Window level: a window of a labelled drive is roadwork when positive intervals cover at
least ``min_overlap`` of it; a drive with only a drive-wide label gives that label to each
of its windows; intervals win over a drive-wide label. Windows of unlabelled drives are
left out. Drive level: a drive is predicted roadwork when any of its windows is, and is
truly roadwork when its drive-wide label says so or any positive interval exists.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from stream.errors import InputError
from stream.schemas import Verdict

TRUE_WORDS = {"1", "true", "yes", "y", "roadwork", "t"}
FALSE_WORDS = {"0", "false", "no", "n", "none", "f", ""}


@dataclass(frozen=True)
class Label:
    """The truth about a drive, or about an interval of it."""

    drive_id: str
    label: bool
    t_start: float | None = None
    t_end: float | None = None


@dataclass(frozen=True)
class Metrics:
    """A confusion matrix and the figures drawn from it."""

    tp: int
    fp: int
    tn: int
    fn: int
    mcc: float
    accuracy: float
    precision: float
    recall: float

    @property
    def n(self) -> int:
        """How many items were compared."""
        return self.tp + self.fp + self.tn + self.fn

    def as_dict(self) -> dict[str, float | int]:
        """Plain data, for ``--json``."""
        return {**asdict(self), "n": self.n}


def _parse_label(value: object, where: str) -> bool:
    text = str(value).strip().lower()
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    message = f"{where}: label {value!r} is not 1/0, true/false, yes/no or roadwork/none"
    raise InputError(message)


def _parse_time(value: object, where: str) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except ValueError:
        message = f"{where}: time {value!r} is not a number"
        raise InputError(message) from None


#: Columns that may name the drive: its id, or its footage (event folder or first clip).
KEY_COLUMNS = ("drive_id", "event")


def _label_from(row: dict, where: str) -> Label:
    drive = next((str(row[k]).strip() for k in KEY_COLUMNS if str(row.get(k) or "").strip()), "")
    if not drive:
        message = f"{where}: no drive_id or event"
        raise InputError(message)
    t0, t1 = _parse_time(row.get("t_start"), where), _parse_time(row.get("t_end"), where)
    if (t0 is None) != (t1 is None) or (t0 is not None and t1 is not None and t1 <= t0):
        message = f"{where}: give both t_start < t_end, or neither"
        raise InputError(message)
    return Label(drive, _parse_label(row.get("label"), where), t0, t1)


def load_labels(path: str | Path) -> list[Label]:
    """Read a labels file (CSV, or JSON when the name ends in ``.json``).

    Raises:
        InputError: the file cannot be read, or a row is malformed (named by line).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        message = f"labels file {path}: {exc.strerror or exc}"
        raise InputError(message) from exc
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(text)
        except ValueError as exc:
            message = f"labels file {path}: not JSON: {exc}"
            raise InputError(message) from exc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            message = f"labels file {path}: expected a JSON list of objects"
            raise InputError(message)
        return [_label_from(row, f"{path} item {i}") for i, row in enumerate(rows)]
    reader = csv.DictReader(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    fields = set(reader.fieldnames or ())
    if "label" not in fields or not fields & set(KEY_COLUMNS):
        message = f"labels file {path}: the CSV header must name label and drive_id or event"
        raise InputError(message)
    return [_label_from(row, f"{path} row {i}") for i, row in enumerate(reader, start=2)]


def footage_key(text: str) -> str:
    """A label's drive key as a footage name: a clip's path or name becomes its stamp."""
    name = Path(text.strip()).name
    stem = name[:-4] if name.lower().endswith(".mp4") else name
    match = re.match(r"^(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}(?:-\d{2})?)(?:-[A-Za-z_]+)?$", stem)
    return match.group(1) if match else stem


def match_labels(labels: Sequence[Label], verdicts: Iterable[Verdict]) -> tuple[list[Label], list[str]]:
    """Labels keyed by drive id, event folder or first clip, re-keyed to drive ids.

    Returns:
        The labels that name a drive of the verdicts (by its id), and the keys of those
        that matched none, in file order.
    """
    by_name: dict[str, str] = {}
    ids: set[str] = set()
    for verdict in verdicts:
        ids.add(verdict.drive_id)
        if verdict.drive_name:
            by_name.setdefault(verdict.drive_name, verdict.drive_id)
    matched, unmatched = [], []
    for label in labels:
        drive = label.drive_id if label.drive_id in ids else by_name.get(footage_key(label.drive_id))
        if drive is None:
            if label.drive_id not in unmatched:
                unmatched.append(label.drive_id)
            continue
        matched.append(replace(label, drive_id=drive))
    return matched, unmatched


def metrics(pairs: Iterable[tuple[bool, bool]]) -> Metrics:
    """Confusion matrix, MCC, accuracy, precision and recall of (predicted, true) pairs.

    MCC, precision and recall are 0 where their denominator is (one class missing).
    """
    tp = fp = tn = fn = 0
    for predicted, truth in pairs:
        tp += predicted and truth
        fp += predicted and not truth
        tn += not predicted and not truth
        fn += not predicted and truth
    n = tp + fp + tn + fn
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return Metrics(
        tp=tp, fp=fp, tn=tn, fn=fn,
        mcc=(tp * tn - fp * fn) / denominator if denominator else 0.0,
        accuracy=(tp + tn) / n if n else 0.0,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
    )  # fmt: skip


def window_truth(verdict: Verdict, labels: Sequence[Label], min_overlap: float = 0.5) -> bool | None:
    """The truth of one verdict's window, or ``None`` when its drive is not labelled."""
    mine = [lab for lab in labels if lab.drive_id == verdict.drive_id]
    intervals = [lab for lab in mine if lab.t_start is not None]
    if intervals:
        length = max(verdict.t_end - verdict.t_start, 1e-9)
        covered = sum(
            max(0.0, min(verdict.t_end, lab.t_end) - max(verdict.t_start, lab.t_start))  # type: ignore[type-var]
            for lab in intervals
            if lab.label
        )
        return covered / length >= min_overlap
    return mine[0].label if mine else None


def window_pairs(
    verdicts: Iterable[Verdict], labels: Sequence[Label], min_overlap: float = 0.5
) -> list[tuple[Verdict, bool]]:
    """Each labelled verdict with its window's truth (one per window: the first wins)."""
    pairs, seen = [], set()
    for verdict in verdicts:
        key = (verdict.drive_id, verdict.window)
        truth = window_truth(verdict, labels, min_overlap)
        if truth is None or key in seen:
            continue
        seen.add(key)
        pairs.append((verdict, truth))
    return pairs


def drive_pairs(verdicts: Iterable[Verdict], labels: Sequence[Label]) -> list[tuple[str, bool, bool]]:
    """``(drive, predicted, true)`` for every labelled drive that has verdicts."""
    predicted: dict[str, bool] = {}
    for verdict in verdicts:
        predicted[verdict.drive_id] = predicted.get(verdict.drive_id, False) or verdict.roadwork
    truth: dict[str, bool] = {}
    for lab in labels:  # a drive-wide yes or any positive interval
        truth[lab.drive_id] = truth.get(lab.drive_id, False) or lab.label
    return [(d, predicted[d], truth[d]) for d in sorted(truth) if d in predicted]


def evaluate(
    verdicts: Sequence[Verdict], labels: Sequence[Label], level: str = "window", min_overlap: float = 0.5
) -> Metrics:
    """Metrics of verdicts against labels at ``window`` or ``drive`` level.

    Raises:
        ValueError: an unknown level.
    """
    if level == "window":
        return metrics((v.roadwork, truth) for v, truth in window_pairs(verdicts, labels, min_overlap))
    if level == "drive":
        return metrics((p, t) for _, p, t in drive_pairs(verdicts, labels))
    message = f"level must be window or drive, not {level!r}"
    raise ValueError(message)
