"""The detector: an ultralytics YOLO run as a bare ``nn.Module`` over batches of JPEGs.

The hot path is built for throughput and stays on the device from the JPEG bytes to the
boxes: one batched JPEG decode (nvJPEG on CUDA), letterbox + resize + normalise as tensor
ops, ONE forward pass of the underlying ``DetectionModel`` (never ``YOLO.predict``, whose
per-image pre- and post-processing is what a batch is meant to avoid), box decoding and
batched NMS over the whole batch in one ``torchvision.ops.batched_nms`` call, and one copy
of the results to the host. A frame descriptor (the global-average-pooled feature map of
the last backbone layer, L2-normalised) is taken by a forward hook in the same pass.

The model is named in ``DetectSettings.model`` and loaded by ultralytics' own loader: a
``.pt`` file, an ultralytics model name found in its weights folder, or a model yaml
(random weights, for tests). Nothing is downloaded: a missing file is a ``ModelError``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stream.errors import InputError, ModelError
from stream.schemas import Detection
from stream.settings import DetectSettings

# ultralytics must never reach the network at run time (asset downloads, hub checks).
os.environ.setdefault("YOLO_OFFLINE", "1")

import torch  # noqa: E402 - after the ultralytics environment above
import torch.nn.functional as F  # noqa: E402, N812
from torchvision.io import ImageReadMode, decode_jpeg  # noqa: E402
from torchvision.ops import batched_nms  # noqa: E402

#: Grey of ultralytics' letterbox padding.
PAD_VALUE = 114 / 255
#: Candidates kept per image before NMS (ultralytics caps at 30 000; a frame never needs that).
MAX_CANDIDATES = 1000
#: The stride every YOLO input side must be a multiple of.
STRIDE = 32

STAGES = ("decode", "preprocess", "forward", "nms", "postprocess")


@dataclass
class FrameResult:
    """What the detector made of one frame.

    Attributes:
        detections: roadwork objects, boxes normalised to the original frame.
        descriptor: L2-normalised pooled backbone features (float32).
        width: the decoded frame's width in pixels.
        height: the decoded frame's height in pixels.
    """

    detections: list[Detection]
    descriptor: np.ndarray
    width: int
    height: int


@dataclass
class Letterbox:
    """Where each image of a batch lies in the model input (for mapping boxes back)."""

    shape: tuple[int, int]  # model input (h, w)
    scale: torch.Tensor  # (B,) resize factor
    pad: torch.Tensor  # (B, 2) left, top padding in input pixels
    size: torch.Tensor  # (B, 2) original width, height


@dataclass
class Timings:
    """Cumulative seconds per hot-path step (exact only with ``profile=True`` on CUDA)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    frames: int = 0
    batches: int = 0

    def add(self, stage: str, seconds: float) -> None:
        """Add time to one step."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def normalise_name(name: str) -> str:
    """Canonical class name: lower case, words joined by ``_`` (``"Arrow Board"`` → ``arrow_board``)."""
    return "_".join(name.lower().replace("-", " ").replace("_", " ").split())


class Detector:
    """A YOLO detector over batches of JPEG frames.

    Parameters:
        settings: model, device, input size, thresholds and the class map.
        profile: synchronise the device between steps so that ``timings`` is exact
            (costs a little throughput; for benchmarks).

    Raises:
        ModelError: the model file is missing, does not load, or is not a detector.
    """

    def __init__(self, settings: DetectSettings, *, profile: bool = False) -> None:
        self.settings = settings
        self.profile = profile
        self.device = torch.device(settings.device)
        self.half = settings.half and self.device.type == "cuda"
        self.dtype = torch.float16 if self.half else torch.float32
        self.timings = Timings()
        self.name = Path(settings.model).name
        yolo = load_yolo(settings.model)
        self.net = yolo.model.to(self.device).eval()
        self.net.fuse(verbose=False)
        if self.half:
            self.net.half()
        for p in self.net.parameters():
            p.requires_grad_(False)
        names = {int(k): str(v) for k, v in self.net.names.items()}
        self.labels: dict[int, str] = metadata_labels(settings.model, names)
        self.class_types = self._class_types(settings.classes)
        self._class_ids = torch.tensor(sorted(self.class_types), dtype=torch.long, device=self.device)
        self._features: torch.Tensor | None = None
        # Decoding runs on its own CUDA stream so that the next batch's nvJPEG work can
        # overlap the current batch's forward pass.
        self._decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.descriptor_layer = self._hook_descriptor(settings.descriptor_layer)

    # -- set-up -------------------------------------------------------------------

    def _class_types(self, classes: dict[str, str]) -> dict[int, str]:
        """Model class index -> roadwork type, for the classes the map names."""
        wanted = {normalise_name(k): v for k, v in classes.items()}
        return {i: wanted[normalise_name(n)] for i, n in self.labels.items() if normalise_name(n) in wanted}

    def _hook_descriptor(self, layer: int) -> int:
        """Register the forward hook that pools the descriptor layer's output."""
        backbone = len(self.net.yaml.get("backbone", [])) if isinstance(self.net.yaml, dict) else 0
        index = layer if layer >= 0 else (backbone - 1 if backbone else len(self.net.model) - 2)

        def pool(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._features = F.normalize(output.float().mean(dim=(2, 3)), dim=1)

        self.net.model[index].register_forward_hook(pool)
        return index

    # -- the hot path ---------------------------------------------------------------

    def _mark(self, stage: str, started: float) -> float:
        if self.profile and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings.add(stage, now - started)
        return now

    def decode(self, blobs: Sequence[bytes | None], names: Sequence[str] | None = None) -> list:
        """Decode JPEGs on the detector's device in one batch.

        Parameters:
            blobs: JPEG bytes; ``None`` stands for a blob that expired.
            names: what to call each frame in an error (its blob key).

        Returns:
            Per frame, a ``uint8`` RGB tensor ``(3, H, W)`` on the device, or an
            ``InputError`` naming the frame and the problem.
        """
        started = time.perf_counter()
        names = names or [f"frame {i}" for i in range(len(blobs))]
        out: list = [None] * len(blobs)
        todo: list[int] = []
        for i, blob in enumerate(blobs):
            if not blob:
                out[i] = InputError(f"{names[i]}: frame blob is missing (expired or never stored)")
            else:
                todo.append(i)
        tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in todo]
        if self._decode_stream is None:
            images = self._decode_batch(tensors, [names[i] for i in todo])
        else:
            with torch.cuda.stream(self._decode_stream):
                images = self._decode_batch(tensors, [names[i] for i in todo])
            self._decode_stream.synchronize()
        for i, image in zip(todo, images, strict=True):
            out[i] = image
        self._mark("decode", started)
        return out

    def _decode_batch(self, tensors: list[torch.Tensor], names: list[str]) -> list:
        if not tensors:
            return []
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            # One bad JPEG fails the whole batched call: decode one by one to name it.
            return [self._decode_one(t, n) for t, n in zip(tensors, names, strict=True)]

    def _decode_one(self, data: torch.Tensor, name: str) -> torch.Tensor | InputError:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            reason = str(exc).rsplit(", ", 1)[-1].strip()
            return InputError(f"{name}: frame does not decode as JPEG ({reason})")

    def detect(self, images: Sequence[torch.Tensor]) -> list[FrameResult]:
        """Detect objects in decoded frames with one forward pass.

        Parameters:
            images: ``uint8`` RGB tensors ``(3, H, W)`` (any sizes) from ``decode``.

        Returns:
            One ``FrameResult`` per image, in order.
        """
        if not images:
            return []
        with torch.inference_mode():
            started = time.perf_counter()
            batch, box = self.preprocess(images)
            started = self._mark("preprocess", started)
            preds = self.forward(batch)
            started = self._mark("forward", started)
            rows = self.nms(preds)
            started = self._mark("nms", started)
            results = self._results(rows, box, len(images))
            self._mark("postprocess", started)
        self.timings.frames += len(images)
        self.timings.batches += 1
        return results

    def detect_jpegs(self, blobs: Sequence[bytes | None], names: Sequence[str] | None = None) -> list:
        """Decode and detect; returns a ``FrameResult`` or an ``InputError`` per frame."""
        decoded = self.decode(blobs, names)
        good = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
        for i, result in zip(good, self.detect([decoded[i] for i in good]), strict=True):
            decoded[i] = result
        return decoded

    def input_shape(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The model input ``(h, w)`` for frames of these ``(h, w)`` sizes."""
        side = self.settings.imgsz
        if not self.settings.rect:
            return side, side
        h = w = 0
        for fh, fw in sizes:
            r = min(side / fh, side / fw)
            h = max(h, math.ceil(round(fh * r) / STRIDE) * STRIDE)
            w = max(w, math.ceil(round(fw * r) / STRIDE) * STRIDE)
        return h, w

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Letterbox]:
        """Letterbox, resize and normalise a batch on the device.

        Frames of one size (the usual case) are resized in a single ``interpolate`` call.
        """
        if self._decode_stream is not None:
            # Made on the decode stream: keep the allocator from reusing them too early.
            for im in images:
                im.record_stream(torch.cuda.current_stream(self.device))
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        shape = self.input_shape(sizes)
        canvas = torch.full((len(images), 3, *shape), PAD_VALUE, dtype=self.dtype, device=self.device)
        scale = torch.empty(len(images), device=self.device)
        pad = torch.empty(len(images), 2, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        for (fh, fw), index in groups.items():
            r = min(shape[0] / fh, shape[1] / fw)
            nh, nw = round(fh * r), round(fw * r)
            top, left = (shape[0] - nh) // 2, (shape[1] - nw) // 2
            x = torch.stack([images[i] for i in index]).to(self.device, self.dtype, non_blocking=True)
            if (nh, nw) != (fh, fw):
                x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
            idx = torch.tensor(index, device=self.device)
            canvas[idx, :, top : top + nh, left : left + nw] = x.mul_(1 / 255)
            scale[idx] = r
            pad[idx] = torch.tensor([left, top], dtype=pad.dtype, device=self.device)
        size = torch.tensor([(w, h) for h, w in sizes], dtype=torch.float32, device=self.device)
        return canvas, Letterbox(shape, scale, pad, size)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """One forward pass; returns raw predictions ``(B, 4 + nc, anchors)`` (xywh, scores).

        Also leaves the pooled descriptor of each image in ``self._features``.
        """
        out = self.net(batch)
        return out[0] if isinstance(out, (list, tuple)) else out

    def nms(self, preds: torch.Tensor) -> torch.Tensor:
        """Box decoding and class-aware NMS over the whole batch at once.

        Returns:
            Rows ``(image, x1, y1, x2, y2, score, class)`` in input pixels, by image and
            then score, at most ``max_det`` per image, mapped classes only.
        """
        s = self.settings
        empty = torch.zeros((0, 7), device=preds.device)
        if self._class_ids.numel() == 0:
            return empty
        if preds.shape[-1] == 6:  # end-to-end head (NMS-free): (B, N, x1 y1 x2 y2 score cls)
            return self._end2end_rows(preds)
        scores = preds[:, 4:, :].index_select(1, self._class_ids)  # (B, K, A)
        conf, j = scores.max(1)  # (B, A)
        k = min(MAX_CANDIDATES, conf.shape[1])
        conf, anchor = conf.topk(k, dim=1)
        keep = conf > s.conf
        b, a = keep.nonzero(as_tuple=True)
        if b.numel() == 0:
            return empty
        anchor = anchor[b, a]
        xywh = preds[b, :4, anchor].float()
        boxes = torch.cat((xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2), 1)
        score = conf[b, a].float()
        cls = self._class_ids[j[b, anchor]]
        kept = batched_nms(boxes, score, b * len(self.labels) + cls, s.iou)
        rows = torch.cat((b[kept, None].float(), boxes[kept], score[kept, None], cls[kept, None].float()), 1)
        return self._cap_per_image(rows)

    def _end2end_rows(self, preds: torch.Tensor) -> torch.Tensor:
        preds = preds.float()
        mapped = (preds[..., 5:6] == self._class_ids.float()).any(-1)
        b, n = ((preds[..., 4] > self.settings.conf) & mapped).nonzero(as_tuple=True)
        return self._cap_per_image(torch.cat((b[:, None].float(), preds[b, n]), 1))

    def _cap_per_image(self, rows: torch.Tensor) -> torch.Tensor:
        """Sort rows by image then score and keep the first ``max_det`` of each image."""
        order = torch.argsort(rows[:, 5], descending=True, stable=True)
        rows = rows[order]
        rows = rows[torch.argsort(rows[:, 0], stable=True)]
        image = rows[:, 0].long()
        first = torch.searchsorted(image, image, right=False)
        rank = torch.arange(len(rows), device=rows.device) - first
        return rows[rank < self.settings.max_det]

    def _results(self, rows: torch.Tensor, box: Letterbox, n: int) -> list[FrameResult]:
        """Map boxes back to normalised frame coordinates and copy everything to the host once."""
        if len(rows):
            b = rows[:, 0].long()
            xy = (rows[:, 1:5].view(-1, 2, 2) - box.pad[b, None, :]) / box.scale[b, None, None]
            xy = (xy / box.size[b, None, :]).clamp_(0, 1).view(-1, 4)
            rows = torch.cat((rows[:, :1], xy, rows[:, 5:]), 1)
        host = rows.cpu().numpy()
        features = self._features.cpu().numpy().astype(np.float32)
        sizes = box.size.cpu().numpy().astype(int)
        per_image: list[list[Detection]] = [[] for _ in range(n)]
        for image, x1, y1, x2, y2, score, cls in host.tolist():
            label = self.labels[int(cls)]
            per_image[int(image)].append(
                Detection(type=self.class_types[int(cls)], label=label, score=score, box=(x1, y1, x2, y2))
            )
        return [
            FrameResult(per_image[i], features[i], int(sizes[i][0]), int(sizes[i][1])) for i in range(n)
        ]


def resolve_weights(name: str) -> str:
    """Find a model file without downloading it.

    A yaml is left to ultralytics (its own model yamls ship with it); a ``.pt`` path or a
    bare model name (``yolo11n``) must exist here or in ultralytics' weights folder.

    Raises:
        ModelError: the file is not there.
    """
    if name.endswith((".yaml", ".yml")):
        return name
    path = Path(name if Path(name).suffix else f"{name}.pt")
    if path.is_file():
        return str(path)
    from ultralytics.utils import SETTINGS

    cached = Path(SETTINGS["weights_dir"]) / path.name
    if not path.is_absolute() and cached.is_file():
        return str(cached)
    message = f"model file {name}: not found (looked in {path.resolve().parent} and {cached.parent}; nothing is downloaded at run time)"
    raise ModelError(message)


def metadata_labels(name: str, labels: dict[int, str]) -> dict[int, str]:
    """The class names of the metadata file beside the weights, when it names them.

    Weights trained with ``single_cls`` call their one class ``item``; the ``.json`` that
    ``roadstream train detector`` writes beside them (``model.classes``) says what it is
    (``cone``). Names from a file that lists another number of classes are ignored.
    """
    if name.endswith((".yaml", ".yml")):
        return labels
    meta = Path(resolve_weights(name)).with_suffix(".json")
    try:
        classes = json.loads(meta.read_text()).get("model", {}).get("classes")
    except (OSError, ValueError, AttributeError):
        return labels
    if not isinstance(classes, list) or len(classes) != len(labels):
        return labels
    return {i: str(c) for i, c in zip(sorted(labels), classes, strict=True)}


def load_yolo(name: str):  # noqa: ANN201 - ultralytics.YOLO, imported lazily
    """Load a YOLO detector by ultralytics' own loader.

    Raises:
        ModelError: missing, unreadable, or not a detection model; the message names the file.
    """
    from ultralytics import YOLO

    path = resolve_weights(name)
    try:
        yolo = YOLO(path, verbose=False)
    except Exception as exc:  # ultralytics raises many unrelated types for a bad file
        message = f"model file {name}: does not load as an ultralytics model ({type(exc).__name__}: {exc})"
        raise ModelError(message) from exc
    if yolo.task != "detect" or not hasattr(yolo.model, "names"):
        message = f"model file {name}: is a {yolo.task!r} model, not a detector"
        raise ModelError(message)
    return yolo
