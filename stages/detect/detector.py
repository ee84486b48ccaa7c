"""``Detector``: launch a batch's detection on the device, collect it on the host
(threshold, class-aware NMS, boxes mapped back to the frame), and the result types.

Decoding lives in ``stages.detect.decode``, letterbox and CUDA graphs in
``stages.detect.graphs``, model loading in ``stages.detect.weights``; ``Detector`` puts
them together.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torchvision.ops import batched_nms

from stages import shipped
from stages.detect.decode import JpegDecoding
from stages.detect.graphs import CudaGraphs, Letterbox, _Graph
from stages.detect.weights import load_yolo, metadata_labels
from stages.devices import keep_freed_heap, resolve_device
from stream.errors import InputError, ModelError
from stream.schemas import Detection
from stream.settings import DetectSettings

#: Candidates kept per image before NMS (ultralytics caps at 30 000; a frame never needs that).
MAX_CANDIDATES = 1000

STAGES = ("decode", "preprocess", "forward", "candidates", "nms", "postprocess")

#: Extra work over a batch's decoded frames in the same call (the roadwork scorer): named
#: device tensors with one row per frame, copied to the host with the detections.
ExtraHeads = Callable[[Sequence[torch.Tensor]], dict[str, torch.Tensor]]


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
class PendingBatch:
    """A batch queued on the device; its outputs are on their way to pinned host memory.

    Attributes:
        letterbox: where each frame lies in the model input.
        candidates: ``(n, K, 6)`` rows ``x1 y1 x2 y2 score class`` in input pixels, the
            top ``K`` per frame by score, before threshold and NMS.
        features: ``(n, D)`` descriptors.
        extras: the extra heads' outputs, by name.
        event: recorded behind the copies (``None`` on the CPU: already there).
        seconds: host time per step spent on this batch so far.
    """

    letterbox: Letterbox
    candidates: torch.Tensor
    features: torch.Tensor
    extras: dict[str, torch.Tensor]
    event: torch.cuda.Event | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.letterbox.scale)

    def ready(self) -> bool:
        """True once the outputs are on the host."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block until the outputs are on the host (releases the GIL meanwhile)."""
        if self.event is not None:
            self.event.synchronize()


@dataclass
class Timings:
    """Cumulative seconds per hot-path step (device time only with ``profile=True`` on CUDA)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    frames: int = 0
    batches: int = 0

    def add(self, stage: str, seconds: float) -> None:
        """Add time to one step."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


def normalise_name(name: str) -> str:
    """Canonical class name: lower case, words joined by ``_`` (``"Arrow Board"`` → ``arrow_board``)."""
    return "_".join(name.lower().replace("-", " ").replace("_", " ").split())


class Detector(JpegDecoding, CudaGraphs):
    """A YOLO detector over batches of JPEG frames.

    ``decode`` blocks (in C++, without the GIL: call it from a thread), ``launch`` only
    queues device work (call it from anywhere), ``collect`` waits for a launched batch and
    builds its results; ``detect`` is ``launch`` then ``collect``.

    Parameters:
        settings: model, device, input size, thresholds and the class map.
        profile: synchronise the device between steps so that ``timings`` is exact
            (costs throughput; for benchmarks).

    Raises:
        ModelError: the model file is missing, does not load, or is not a detector.
    """

    def __init__(self, settings: DetectSettings, *, profile: bool = False) -> None:
        self.settings = settings
        self.profile = profile
        self.device = torch.device(resolve_device(settings.device))
        self.cuda = self.device.type == "cuda"
        if self.device.type == "cpu":
            keep_freed_heap()
        self.half = settings.half and self.cuda
        self.dtype = torch.float16 if self.half else torch.float32
        self.timings = Timings()
        settings = self.settings = shipped.resolve(settings)
        if shipped.random_weights(settings.model) and not settings.allow_random_weights:
            message = (f"detector {settings.model}: built from a yaml, it has random weights and finds nothing; "
                       "name trained weights (detect.model; the default is the shipped cone detector) or, "
                       "for a test or benchmark, pass --allow-random-weights (detect.allow_random_weights=true)")  # fmt: skip
            raise ModelError(message)
        self.name = Path(settings.model).name
        yolo = load_yolo(settings.model)
        self.net = yolo.model.to(self.device).eval()
        self.net.fuse(verbose=False)
        if self.half:
            self.net.half()
        for p in self.net.parameters():
            p.requires_grad_(False)
        if self.cuda and settings.cudnn_benchmark:
            # Batches come in a few fixed shapes (pad_batch_to): autotune each once.
            torch.backends.cudnn.benchmark = True
        names = {int(k): str(v) for k, v in self.net.names.items()}
        self.labels: dict[int, str] = metadata_labels(settings.model, names)
        self.class_types = self._class_types(settings.classes)
        self._class_ids = torch.tensor(sorted(self.class_types), dtype=torch.long, device=self.device)
        self._features: torch.Tensor | None = None
        self._end2end = False  # set by the first forward pass: an NMS-free head
        # Decoding runs on its own CUDA stream (and, in the worker, its own thread) so that
        # the next batch's nvJPEG work overlaps the current batch's forward pass.
        self._decode_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._decode_pool: ThreadPoolExecutor | None = None  # decode == "cpu": made on first use
        self._graphs: dict[tuple, _Graph] = {}  # by batch shape
        #: The largest batch the caller forms (the worker's ``batch_size``): padding stops there.
        self.max_rows: int | None = None
        # Held by decode and by graph capture: no other thread's CUDA work during a capture.
        self._device_lock = threading.Lock()
        # One launch at a time: a pass leaves its descriptors in ``_features`` (and the
        # model caches its anchors), so concurrent passes (CPU launches run in threads)
        # would read each other's.
        self._launch_lock = threading.Lock()
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

    def _mark(self, stage: str, started: float, seconds: dict[str, float] | None = None) -> float:
        if self.profile and self.cuda:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings.add(stage, now - started)
        if seconds is not None:
            seconds[stage] = seconds.get(stage, 0.0) + now - started
        return now

    def launch(self, images: Sequence[torch.Tensor], extra: ExtraHeads | None = None) -> PendingBatch:
        """Queue one batch's detection on the device; nothing here waits for the device.

        Parameters:
            images: ``uint8`` RGB tensors ``(3, H, W)`` (any sizes) from ``decode``.
            extra: more heads over the same decoded frames, run in the same call.

        Returns:
            The pending batch, for ``collect``.
        """
        seconds: dict[str, float] = {}
        n = len(images)
        with self._launch_lock, torch.inference_mode():
            started = time.perf_counter()
            fused = self._replay_fused(images)
            if fused is not None:  # letterbox, forward and candidates: one graph replay
                candidates, features, box = fused
                started = self._mark("forward", started, seconds)
                candidates, features = self._to_host(candidates[:n]), self._to_host(features[:n])
            else:
                batch, box = self.preprocess(images)
                started = self._mark("preprocess", started, seconds)
                preds, features = self.forward(batch)
                started = self._mark("forward", started, seconds)
                candidates, features = self._to_host(self.candidates(preds[:n])), self._to_host(features[:n])
            started = self._mark("candidates", started, seconds)
            extras = {}
            if extra is not None:
                extras = {k: self._to_host(v) for k, v in extra(images).items()}
                self._mark("score", started, seconds)
            pending = PendingBatch(box, candidates, features, extras, seconds=seconds)
            if self.cuda:
                pending.event = torch.cuda.Event()
                pending.event.record()
        return pending

    def collect(self, pending: PendingBatch) -> list[FrameResult]:
        """Wait for a launched batch, then threshold, NMS and map its boxes on the host.

        Returns:
            One ``FrameResult`` per image, in order.
        """
        pending.wait()
        started = time.perf_counter()
        rows = self._nms_host(pending.candidates.numpy())
        started = self._mark("nms", started, pending.seconds)
        results = self._results(rows, pending.letterbox, pending.features.numpy())
        self._mark("postprocess", started, pending.seconds)
        self.timings.frames += len(pending)
        self.timings.batches += 1
        return results

    def detect(self, images: Sequence[torch.Tensor]) -> list[FrameResult]:
        """Detect objects in decoded frames with one forward pass, passes of a few frames on
        the CPU (``launch`` + ``collect``)."""
        if not images:
            return []
        return self.collect(self.launch(images))

    def detect_jpegs(self, blobs: Sequence[bytes | None], names: Sequence[str] | None = None) -> list[FrameResult | InputError]:
        """Decode and detect; returns a ``FrameResult`` or an ``InputError`` per frame."""
        decoded = self.decode(blobs, names)
        good = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
        for i, result in zip(good, self.detect([decoded[i] for i in good]), strict=True):
            decoded[i] = result
        return decoded

    def candidates(self, preds: torch.Tensor) -> torch.Tensor:
        """The top ``MAX_CANDIDATES`` boxes per image, of mapped classes, in fixed shape.

        Returns:
            ``(B, K, 6)`` float32 rows ``x1 y1 x2 y2 score class`` in input pixels, by
            score; no threshold applied (that needs data-dependent shapes: host side).
        """
        b = preds.shape[0]
        if self._class_ids.numel() == 0:
            return torch.zeros((b, 0, 6), device=preds.device)
        if self._end2end:
            rows = preds.float()
            mapped = (rows[..., 5:6] == self._class_ids.float()).any(-1)
            rows[..., 4] = torch.where(mapped, rows[..., 4], -1.0)  # unmapped never pass
            return rows
        scores = preds[:, 4:, :].index_select(1, self._class_ids)  # (B, K, A)
        conf, j = scores.max(1)  # (B, A)
        conf, anchor = conf.topk(min(MAX_CANDIDATES, conf.shape[1]), dim=1)  # (B, k)
        xywh = preds[:, :4, :].gather(2, anchor[:, None, :].expand(-1, 4, -1)).float()  # (B, 4, k)
        half = xywh[:, 2:] / 2
        cls = self._class_ids[j.gather(1, anchor)].float()
        rows = torch.cat((xywh[:, :2] - half, xywh[:, :2] + half, conf[:, None].float(), cls[:, None]), 1)
        return rows.transpose(1, 2)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy to the host; on CUDA into pinned memory, without waiting for it."""
        if not self.cuda:
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor.contiguous(), non_blocking=True)
        return host

    def _nms_host(self, candidates: np.ndarray) -> list[np.ndarray]:
        """Per image: rows above the threshold, class-aware NMS, at most ``max_det``, by score.

        One ``batched_nms`` call serves the whole batch (boxes of different images or
        classes never suppress each other); a per-image call costs more in overhead than
        the few boxes a frame has.
        """
        s = self.settings
        image, index = np.nonzero(candidates[..., 4] > s.conf)  # candidates come sorted by score
        rows = candidates[image, index]
        if len(rows) and not self._end2end:
            t = torch.from_numpy(rows)
            groups = torch.from_numpy(image).long() * max(len(self.labels), 1) + t[:, 5].long()
            keep = batched_nms(t[:, :4], t[:, 4], groups, s.iou).numpy()  # by score, descending
            keep = keep[np.argsort(image[keep], kind="stable")]
            image, rows = image[keep], rows[keep]
        elif len(rows):
            order = np.lexsort((-rows[:, 4], image))
            image, rows = image[order], rows[order]
        bounds = np.searchsorted(image, np.arange(len(candidates) + 1))
        return [rows[start : min(end, start + s.max_det)] for start, end in itertools.pairwise(bounds)]

    def _results(self, rows: Sequence[np.ndarray], box: Letterbox, features: np.ndarray) -> list[FrameResult]:
        """Map each image's boxes back to normalised frame coordinates."""
        results = []
        for i, found in enumerate(rows):
            detections = []
            if len(found):
                xy = (found[:, :4].reshape(-1, 2, 2) - box.pad[i]) / box.scale[i] / box.size[i]
                xy = np.clip(xy, 0, 1).reshape(-1, 4)
                for (x1, y1, x2, y2), score, cls in zip(xy.tolist(), found[:, 4].tolist(), found[:, 5].tolist(), strict=True):
                    detections.append(
                        Detection(
                            type=self.class_types[int(cls)],
                            label=self.labels[int(cls)],
                            score=score,
                            box=(x1, y1, x2, y2),
                        )
                    )
            width, height = (int(v) for v in box.size[i])
            results.append(FrameResult(detections, features[i].astype(np.float32), width, height))
        return results
