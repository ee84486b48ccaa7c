"""One image in, one roadwork probability out: the scorer and the detector combined.

The NATIX StreetVision task (and ``roadstream classify``) wants one probability per image.
The scorer sees the whole scene; the detector finds the objects that make a work zone.
Neither alone is right on every camera, so the answer is a logistic rule over both
(``RULE_FEATURES``)::

    P(roadwork) = sigmoid(bias + c1·scorer_logit + c2·det_max + c3·det_count)

``scorer_logit`` is the scorer's logit, ``det_max`` the strongest box of any roadwork class
(0 without one), ``det_count`` ``log(1 + boxes ≥ BOX_CONF)``. The coefficients are fitted
by ``stages.train.heldout`` on predictions for sources the models never trained on, and
shipped as ``stages/models/classify.json``. Without a detector or a rule file the answer
is the scorer's probability alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stream.errors import ModelError

#: The rule's inputs, in order.
RULE_FEATURES: tuple[str, ...] = ("scorer_logit", "det_max", "det_count")
#: Boxes at or above this confidence count as found objects (the detect stage's ``conf``).
BOX_CONF = 0.25
#: The detector is asked for boxes down to this confidence: ``det_max`` needs the weak ones.
MIN_CONF = 0.01
DEFAULT_RULE = Path(__file__).parent / "models" / "classify.json"
DEFAULT_DETECTOR = Path(__file__).parent / "models" / "cones_yolo11n.pt"


def rule_features(scorer_prob: float, det_max: float, det_count: int) -> dict[str, float]:
    """The rule's inputs for one image (``RULE_FEATURES``)."""
    p = min(max(scorer_prob, 1e-6), 1 - 1e-6)
    return {"scorer_logit": math.log(p / (1 - p)), "det_max": det_max, "det_count": math.log1p(det_count)}


def apply_rule(features: dict[str, float], coefficients: dict[str, float]) -> float:
    """``sigmoid(bias + Σ c·x)`` (``stages.calibration``'s model); missing terms count 0."""
    z = coefficients.get("bias", 0.0) + sum(coefficients.get(k, 0.0) * v for k, v in features.items())
    return 1.0 / (1.0 + math.exp(-min(max(z, -50.0), 50.0)))


def load_rule(path: str | Path) -> dict[str, float]:
    """The coefficients of a rule file written by ``stages.train.heldout``.

    Raises:
        ModelError: the file is missing or holds no coefficients of ``RULE_FEATURES``.
    """
    path = Path(path)
    try:
        coefficients = json.loads(path.read_text())["coefficients"]
        return {k: float(coefficients[k]) for k in ("bias", *RULE_FEATURES)}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        message = f"{path}: not a classify rule file ({exc})"
        raise ModelError(message) from exc


@dataclass
class ImageVerdict:
    """What ``FrameClassifier`` says of one image.

    Attributes:
        roadwork_probability: the combined probability (the scorer's alone without a rule).
        scorer_probability: the scorer's probability.
        objects: ``(type, confidence, [x1, y1, x2, y2] normalised)`` of boxes ≥ ``BOX_CONF``.
        det_max: the strongest box's confidence, any class, 0 without one.
    """

    roadwork_probability: float
    scorer_probability: float
    objects: list[tuple[str, float, list[float]]] = field(default_factory=list)
    det_max: float = 0.0


class FrameClassifier:
    """The scorer, the detector and the rule, loaded once.

    Parameters:
        scorer: a loaded ``stages.scorer.RoadworkScorer``.
        detector: a loaded ``stages.detect.Detector`` asked for boxes ≥ ``MIN_CONF``, or None.
        rule: the rule's coefficients, or None (the scorer's probability is the answer).
    """

    def __init__(self, scorer, detector=None, rule: dict[str, float] | None = None) -> None:
        self.scorer, self.detector, self.rule = scorer, detector, rule

    @classmethod
    def load(
        cls, scorer: str | Path, detector: str | Path | None, rule: str | Path | None, device: str = "cpu"
    ) -> FrameClassifier:
        """Load the models named (``None`` or ``""`` leaves the detector or rule out).

        Raises:
            ModelError: a file is missing or is not what it should be.
        """
        from stages.scorer import RoadworkScorer

        loaded_detector = None
        if detector:
            from stages.detect import Detector
            from stream.settings import DetectSettings

            loaded_detector = Detector(DetectSettings(model=str(detector), device=device, conf=MIN_CONF))
        rule_coefficients = load_rule(rule) if rule and loaded_detector else None
        return cls(RoadworkScorer.load(scorer, device), loaded_detector, rule_coefficients)

    def classify(self, images: Sequence) -> list[ImageVerdict]:
        """Classify uint8 RGB CHW tensors (one batch).

        Returns:
            One ``ImageVerdict`` per image, in order.
        """
        import torch

        from stages.scorer import squash

        if not images:
            return []
        probs = self.scorer.score(torch.stack([squash(i) for i in images]))[0].cpu().tolist()
        if self.detector is not None:
            results = self.detector.detect([i.to(self.detector.device) for i in images])
        else:
            results = [None] * len(images)
        verdicts = []
        for prob, result in zip(probs, results, strict=True):
            detections = result.detections if result is not None else []
            objects = [
                (d.type, round(d.score, 4), [round(v, 4) for v in d.box])
                for d in detections
                if d.score >= BOX_CONF
            ]
            det_max = max((d.score for d in detections), default=0.0)
            combined = prob
            if self.rule is not None:
                combined = apply_rule(rule_features(prob, det_max, len(objects)), self.rule)
            verdicts.append(ImageVerdict(combined, prob, objects, det_max))
        return verdicts


#: File kinds ``roadstream classify`` takes, by suffix.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
VIDEO_SUFFIXES = frozenset({".mp4", ".mov", ".mkv", ".avi", ".webm"})


@dataclass
class Picture:
    """One picture to classify: an image file, or a frame sampled from a video.

    Attributes:
        path: the file.
        t: the frame's time in the video (seconds); ``None`` for an image file.
        pixels: HWC RGB uint8 array of a video frame; ``None`` for an image (read by path).
    """

    path: Path
    t: float | None = None
    pixels: object = None

    @property
    def name(self) -> str:
        """``path`` for an image, ``path@12.0s`` for a video frame."""
        return str(self.path) if self.t is None else f"{self.path}@{self.t:.1f}s"


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files to classify: files as given, folders searched (sorted) for images and videos.

    Raises:
        InputError: a path does not exist, is of a kind not taken, or a folder holds none.
    """
    from stream.errors import InputError

    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not found:
                message = f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) or videos ({', '.join(sorted(VIDEO_SUFFIXES))})"
                raise InputError(message)
            files += found
        elif path.is_file():
            files.append(path)
        else:
            message = f"{path}: no such file or folder"
            raise InputError(message)
    return files


def pictures(files: Sequence[Path], every_s: float = 1.0):  # noqa: ANN201 - an iterator of Picture
    """Each image file, and a frame every ``every_s`` seconds of each video, in order.

    Raises:
        InputError: a video does not decode (naming it).
    """
    for path in files:
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            yield Picture(path)
            continue
        yield from _video_frames(path, every_s)


def _video_frames(path: Path, every_s: float):  # noqa: ANN202
    import av

    from stream.errors import InputError

    next_t = 0.0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                t = float(frame.time or 0.0)
                if t + 1e-6 >= next_t:
                    yield Picture(path, round(t, 3), frame.to_ndarray(format="rgb24"))
                    next_t = t + every_s
    except (av.FFmpegError, OSError) as exc:
        message = f"{path}: not a readable video ({exc})"
        raise InputError(message) from exc
