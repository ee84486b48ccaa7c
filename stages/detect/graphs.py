"""Letterbox and CUDA graphs for the detector: where each frame lies in the model input,
the batch's letterbox + resize + normalise as tensor ops, and each batch shape's work
captured once as a CUDA graph, cached (up to ``MAX_GRAPHS``) and replayed.

``CudaGraphs`` is a part of ``Detector`` (a mixin): it uses the detector's ``settings``,
``net``, ``device``, ``dtype``, ``cuda``, ``max_rows``, ``_features``, ``_graphs``, ``_device_lock``,
``_decode_stream`` and ``candidates``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from stages.devices import CPU_FORWARD_ROWS, in_row_chunks, padded_rows

#: Grey of ultralytics' letterbox padding.
PAD_VALUE = 114 / 255
#: The stride every YOLO input side must be a multiple of.
STRIDE = 32
#: CUDA graphs kept (one per batch shape); shapes beyond these run eagerly.
MAX_GRAPHS = 32


@dataclass
class Letterbox:
    """Where each image of a batch lies in the model input (host arrays, for mapping boxes back)."""

    shape: tuple[int, int]  # model input (h, w)
    scale: np.ndarray  # (n,) resize factor
    pad: np.ndarray  # (n, 2) left, top padding in input pixels
    size: np.ndarray  # (n, 2) original width, height


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


class CudaGraphs:
    """The letterbox and graph half of ``Detector``: batch shapes, preprocessing, the
    forward pass and its captured graphs."""

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
        """Rows of the model input for a batch of ``frames`` (padded on CUDA only, to a
        multiple of ``pad_batch_to`` but not past ``max_rows``, the worker's batch)."""
        if not self.cuda:
            return frames
        return padded_rows(frames, self.settings.pad_batch_to, self.max_rows)

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
        """One forward pass (on the CPU, in passes of ``CPU_FORWARD_ROWS`` frames).

        Returns:
            Raw predictions ``(B, 4 + nc, anchors)`` (xywh, scores), or ``(B, N, 6)`` from
            an end-to-end head, and the pooled descriptors ``(B, D)``.
        """
        graph = self._graph(batch) if self.cuda and self.settings.cuda_graphs else None
        if graph is not None:
            graph.input.copy_(batch)
            graph.graph.replay()
            return graph.output, graph.features
        if self.device.type != "cpu":
            return self._predictions(self.net(batch)), self._features
        # Each pass leaves its own descriptors in _features: take them per pass.
        return in_row_chunks(lambda rows: (self._predictions(self.net(rows)), self._features), batch, CPU_FORWARD_ROWS)

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
