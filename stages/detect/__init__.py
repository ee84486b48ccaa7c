"""The detector: an ultralytics YOLO run as a bare ``nn.Module`` over batches of JPEGs.

The hot path is built for throughput. One batched JPEG decode (nvJPEG on CUDA), then
letterbox + resize + normalise as tensor ops, ONE forward pass of the underlying
``DetectionModel`` (on the CPU, passes of 4 frames: ``stages.devices.CPU_FORWARD_ROWS``;
never ``YOLO.predict``, whose per-image pre- and post-processing is what a batch is
meant to avoid), and a fixed-shape top-k of candidate boxes per image, all
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
(random weights, for tests). Nothing is downloaded: a missing file is a ``ModelError

The package, by concern: ``weights`` finds and loads the model file, ``decode`` turns JPEG
bytes into device frames (nvJPEG, or libjpeg-turbo threads), ``graphs`` letterboxes a batch
and captures and replays its CUDA graphs, ``detector`` holds ``Detector`` (launch, collect,
candidates, NMS) and its result types. Import the names from ``stages.detect``.
"""

from __future__ import annotations

import os

# ultralytics must never reach the network at run time (asset downloads, hub checks).
os.environ.setdefault("YOLO_OFFLINE", "1")
# ...nor unpickle arbitrary objects from a .pt: its opt-in safe loading (weights_only with
# an allow-list of model classes, ultralytics 8.4) is read once, when it is imported.
os.environ.setdefault("ULTRALYTICS_SAFE_LOAD", "1")

# The submodules import torch and (lazily) ultralytics: only after the environment above.
from stages.detect.decode import Decoded  # noqa: E402
from stages.detect.detector import (  # noqa: E402
    MAX_CANDIDATES,
    STAGES,
    Detector,
    ExtraHeads,
    FrameResult,
    PendingBatch,
    Timings,
    normalise_name,
)
from stages.detect.graphs import MAX_GRAPHS, PAD_VALUE, STRIDE, Letterbox, letterbox, placement  # noqa: E402
from stages.detect.weights import load_yolo, metadata_labels, resolve_weights  # noqa: E402

__all__ = [
    "MAX_CANDIDATES",
    "MAX_GRAPHS",
    "PAD_VALUE",
    "STAGES",
    "STRIDE",
    "Decoded",
    "Detector",
    "ExtraHeads",
    "FrameResult",
    "Letterbox",
    "PendingBatch",
    "Timings",
    "letterbox",
    "load_yolo",
    "metadata_labels",
    "normalise_name",
    "placement",
    "resolve_weights",
]
