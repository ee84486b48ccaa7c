"""The detector: an ultralytics YOLO run as a bare ``nn.Module`` over batches of JPEGs.

The hot path is built for throughput. One batched JPEG decode (nvJPEG on CUDA), then
letterbox + resize + normalise as tensor ops, ONE forward pass of the underlying
``DetectionModel`` (never ``YOLO.predict``, whose per-image pre- and post-processing is
what a batch is meant to avoid), and a fixed-shape top-k of candidate boxes per image, all
queued on the device without waiting (``launch``): the caller gets a ``PendingBatch``
whose candidates and descriptors land in pinned host memory behind the forward pass. On
the host (``collect``), the few candidates above the threshold go through class-aware NMS
(boxes suppress only boxes of their own image and class) and are mapped back to the frame. So the next batch is fetched, decoded and
queued while the device still runs this one, and no step in between waits for the device.

On CUDA each batch is padded to a multiple of ``pad_batch_to`` frames, and the work of
each batch shape is captured once as a CUDA graph and replayed: for a small model,
launching its few hundred kernels one by one from Python costs more than the kernels
themselves. For frames of one size (the usual batch) the graph holds letterbox, forward
pass and candidates; a batch of mixed sizes is letterboxed op by op and replays the
forward pass's graph. A frame descriptor (the global-average-pooled feature map of the
last backbone layer, L2-normalised) is taken by a forward hook in the same pass.

The model is named in ``DetectSettings.model`` and loaded by ultralytics' own loader: a
``.pt`` file, an ultralytics model name found in its weights folder, or a model yaml
(random weights, for tests). Nothing is downloaded: a missing file is a ``ModelError``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simplejpeg

from stages import shipped
from stages.devices import resolve_device
from stream.errors import InputError, ModelError
from stream.schemas import Detection
from stream.settings import DetectSettings

# ultralytics must never reach the network at run time (asset downloads, hub checks).
os.environ.setdefault("YOLO_OFFLINE", "1")
# ...nor unpickle arbitrary objects from a .pt: its opt-in safe loading (weights_only with
# an allow-list of model classes, ultralytics 8.4) is read once, when it is imported.
os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")

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
#: CUDA graphs kept (one per batch shape); shapes beyond these run eagerly.
MAX_GRAPHS = 32

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
class Letterbox:
    """Where each image of a batch lies in the model input (host arrays, for mapping boxes back)."""

    shape: tuple[int, int]  # model input (h, w)
    scale: np.ndarray  # (n,) resize factor
    pad: np.ndarray  # (n, 2) left, top padding in input pixels
    size: np.ndarray  # (n, 2) original width, height


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
class _Graph:
    """A captured pass (forward, or letterbox + forward + candidates): replay it after
    copying a batch into ``input``."""

    graph: torch.cuda.CUDAGraph
    input: torch.Tensor
    output: torch.Tensor
    features: torch.Tensor
    #: Tensors outside the graph's pool that it reads and the model would drop: the
    #: head's anchors of this shape (it caches only the last shape's; replaying a graph
    #: whose anchors were freed read freed memory on an H200).
    keep: tuple[torch.Tensor, ...] = ()


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


class Detector:
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
        if self.cuda:
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

    def decode(self, blobs: Sequence[bytes | None], names: Sequence[str] | None = None) -> list:
        """Decode JPEGs to frames on the detector's device: nvJPEG in one batched call, or
        (``decode="cpu"``) libjpeg-turbo threads and one upload.

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
        if self.settings.decode == "cpu":
            images = self._decode_host([blobs[i] for i in todo], [names[i] for i in todo])
            for i, image in zip(todo, images, strict=True):
                out[i] = image
            self._mark("decode", started)
            return out
        tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in todo]
        if self._decode_stream is None:
            images = self._decode_batch(tensors, [names[i] for i in todo])
        else:
            with self._device_lock, torch.cuda.stream(self._decode_stream):
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

    def _decode_host(self, blobs: list[bytes], names: list[str]) -> list:
        """libjpeg-turbo decode in the pool's threads (the GIL is released), straight into one
        pinned buffer per frame size, then one upload and one HWC to CHW copy per size."""
        out: list = [None] * len(blobs)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, blob in enumerate(blobs):
            try:
                height, width, _, _ = simplejpeg.decode_jpeg_header(blob)
            except ValueError as exc:
                out[i] = InputError(f"{names[i]}: frame does not decode as JPEG ({exc})")
                continue
            groups.setdefault((height, width), []).append(i)
        for (height, width), index in groups.items():
            host = torch.empty((len(index), height, width, 3), dtype=torch.uint8, pin_memory=self.cuda)
            rows = host.numpy()

            def decode_row(k: int, index: list[int] = index, rows: np.ndarray = rows) -> str | None:
                try:
                    simplejpeg.decode_jpeg(blobs[index[k]], colorspace="RGB", buffer=rows[k])
                except ValueError as exc:
                    return str(exc)
                return None

            errors = list(self._host_pool().map(decode_row, range(len(index))))
            if self._decode_stream is None:
                frames = host.permute(0, 3, 1, 2).contiguous()
            else:
                with self._device_lock, torch.cuda.stream(self._decode_stream):
                    frames = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
                    self._decode_stream.synchronize()  # the pinned buffer is free to go after this
            for k, i in enumerate(index):
                failed = errors[k]
                out[i] = frames[k] if failed is None else InputError(f"{names[i]}: frame does not decode as JPEG ({failed})")
        return out

    def _host_pool(self) -> ThreadPoolExecutor:
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="jpeg-decode")
        return self._decode_pool

    def _decode_one(self, data: torch.Tensor, name: str) -> torch.Tensor | InputError:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as exc:
            reason = str(exc).rsplit(", ", 1)[-1].strip()
            return InputError(f"{name}: frame does not decode as JPEG ({reason})")

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
        """Detect objects in decoded frames with one forward pass (``launch`` + ``collect``)."""
        if not images:
            return []
        return self.collect(self.launch(images))

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

    def padded_size(self, frames: int) -> int:
        """Rows of the model input for a batch of ``frames`` (padded on CUDA only)."""
        step = self.settings.pad_batch_to if self.cuda else 1
        return -(-frames // step) * step

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Letterbox]:
        """Letterbox, resize and normalise a batch on the device.

        Frames of one size (the usual case) are resized in a single ``interpolate`` call;
        rows past the frames (padding up to ``padded_size``) stay blank.
        """
        self._hold(images)
        n = len(images)
        sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
        shape = self.input_shape(sizes)
        canvas = torch.full((self.padded_size(n), 3, *shape), PAD_VALUE, dtype=self.dtype, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        for frame, index in groups.items():
            rows = slice(0, n) if len(groups) == 1 else torch.tensor(index, device=self.device)
            self._paste(canvas, rows, torch.stack([images[i] for i in index]), frame)
        return canvas, letterbox(shape, sizes)

    def _paste(self, canvas: torch.Tensor, rows: slice | torch.Tensor, frames: torch.Tensor, frame: tuple[int, int]) -> None:
        """Resize ``uint8`` frames of one size, normalise them and put them in their place
        in ``canvas`` rows (the one letterbox of the op-by-op path and the captured one)."""
        _, nh, nw, top, left = placement(tuple(canvas.shape[2:]), *frame)
        x = frames.to(self.device, self.dtype, non_blocking=True)
        if (nh, nw) != frame:
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        canvas[rows, :, top : top + nh, left : left + nw] = x.mul_(1 / 255)

    def _hold(self, images: Sequence[torch.Tensor]) -> None:
        """Frames made on the decode stream: keep the allocator from reusing them too early."""
        if self._decode_stream is not None:
            for im in images:
                im.record_stream(torch.cuda.current_stream(self.device))

    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward pass.

        Returns:
            Raw predictions ``(B, 4 + nc, anchors)`` (xywh, scores), or ``(B, N, 6)`` from
            an end-to-end head, and the pooled descriptors ``(B, D)``.
        """
        graph = self._graph(batch) if self.cuda and self.settings.cuda_graphs else None
        if graph is not None:
            graph.input.copy_(batch)
            graph.graph.replay()
            return graph.output, graph.features
        return self._predictions(self.net(batch)), self._features

    def _predictions(self, out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        preds = out[0] if isinstance(out, (list, tuple)) else out
        self._end2end = preds.shape[-1] == 6  # NMS-free head: (B, N, x1 y1 x2 y2 score cls)
        return preds

    def _graph(self, batch: torch.Tensor) -> _Graph | None:
        """The captured forward pass for this batch shape (captured on first sight)."""

        def capture() -> _Graph:
            static = batch.clone()
            return self._capture(static, lambda: (self._predictions(self.net(static)), self._features))

        return self._cached_graph(tuple(batch.shape), capture)

    def _cached_graph(self, key: tuple, capture: Callable[[], _Graph]) -> _Graph | None:
        """The graph of ``key``, captured on first sight; ``None`` once ``MAX_GRAPHS`` are kept."""
        if key not in self._graphs:
            if len(self._graphs) >= MAX_GRAPHS:
                return None
            self._graphs[key] = capture()
        return self._graphs[key]

    def _replay_fused(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, Letterbox] | None:
        """On CUDA, for frames of one size (the usual batch): copy them into a captured graph
        of letterbox + forward + candidates and replay it. ``None`` where it does not apply.

        Measured on an H200: the letterbox and top-k launched op by op took 0.04 ms per
        frame next to the forward pass's 0.13 (YOLO11n), host time that one replay saves.
        """
        sizes = {(int(im.shape[1]), int(im.shape[2])) for im in images}
        if not (self.cuda and self.settings.cuda_graphs and len(sizes) == 1):
            return None
        ((fh, fw),) = sizes
        n, shape = len(images), self.input_shape([(fh, fw)])
        rows = self.padded_size(n)
        graph = self._cached_graph((rows, "frames", fh, fw, *shape), lambda: self._capture_fused(rows, (fh, fw), shape))
        if graph is None:
            return None
        self._hold(images)
        torch.stack(list(images), out=graph.input[:n])  # rows past n keep old frames: their results are dropped
        graph.graph.replay()
        return graph.output, graph.features, letterbox(shape, [(fh, fw)] * n)

    def _capture_fused(self, rows: int, frame: tuple[int, int], shape: tuple[int, int]) -> _Graph:
        static = torch.zeros((rows, 3, *frame), dtype=torch.uint8, device=self.device)

        def body() -> tuple[torch.Tensor, torch.Tensor]:
            # What ``preprocess`` then ``forward`` then ``candidates`` do, in one graph.
            canvas = torch.full((rows, 3, *shape), PAD_VALUE, dtype=self.dtype, device=self.device)
            self._paste(canvas, slice(None), static, frame)
            return self.candidates(self._predictions(self.net(canvas))), self._features

        return self._capture(static, body)

    def _capture(self, static: torch.Tensor, body: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> _Graph:
        """Capture ``body`` (which reads ``static``) as a CUDA graph returning (output, features)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with self._device_lock:
            with torch.cuda.stream(side):
                for _ in range(3):  # autotuning and first allocations stay out of the graph
                    body()
            current.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                output, features = body()
        keep = tuple(
            t
            for m in self.net.modules()
            for t in (getattr(m, "anchors", None), getattr(m, "strides", None))
            if isinstance(t, torch.Tensor)
        )
        return _Graph(graph, static, output, features, keep)

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


def letterbox(shape: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> Letterbox:
    """Where frames of these ``(h, w)`` sizes lie in a model input of ``shape``."""
    placed = {size: placement(shape, *size) for size in set(sizes)}
    scale = np.array([placed[size][0] for size in sizes], dtype=np.float32)
    pad = np.array([(placed[size][4], placed[size][3]) for size in sizes], dtype=np.float32).reshape(-1, 2)
    size = np.array([(w, h) for h, w in sizes], dtype=np.float32).reshape(-1, 2)
    return Letterbox(shape, scale, pad, size)


def placement(shape: tuple[int, int], height: int, width: int) -> tuple[float, int, int, int, int]:
    """Where a ``height`` x ``width`` frame lies in a model input of ``shape`` (letterbox).

    Returns:
        ``(scale, new_height, new_width, top, left)``.
    """
    r = min(shape[0] / height, shape[1] / width)
    nh, nw = round(height * r), round(width * r)
    return r, nh, nw, (shape[0] - nh) // 2, (shape[1] - nw) // 2


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


def _safe_check(path: str) -> None:
    """Unpickle a ``.pt`` the safe way first when ultralytics was imported before its safe
    loading was switched on (by something that imported it ahead of this module): a file
    that holds anything but the allow-listed model classes raises here, never runs."""
    from ultralytics.nn import tasks

    if path.endswith(".pt") and not tasks.SAFE_LOAD:
        tasks.torch_safe_load(path, safe_only=True)


def load_yolo(name: str):  # noqa: ANN201 - ultralytics.YOLO, imported lazily
    """Load a YOLO detector by ultralytics' own loader.

    Raises:
        ModelError: missing, unreadable, or not a detection model; the message names the file.
    """
    from ultralytics import YOLO

    path = resolve_weights(name)
    try:
        _safe_check(path)
        yolo = YOLO(path, verbose=False)
    except Exception as exc:  # ultralytics raises many unrelated types for a bad file
        message = f"model file {name}: does not load as an ultralytics model ({type(exc).__name__}: {exc})"
        raise ModelError(message) from exc
    if yolo.task != "detect" or not hasattr(yolo.model, "names"):
        message = f"model file {name}: is a {yolo.task!r} model, not a detector"
        raise ModelError(message)
    return yolo
