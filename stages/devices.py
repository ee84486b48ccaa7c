"""Which torch device a stage runs on: ``auto`` resolves to the first GPU, else the CPU.

As ultralytics does: a CUDA device when torch sees one, the CPU otherwise. Anything
other than ``auto`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is passed through unchanged.
On the CPU, models run a batch in passes of a few frames (``in_row_chunks``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

AUTO = "auto"


def resolve_device(device: str, *, cuda_available: bool | None = None) -> str:
    """The concrete device for a setting.

    Parameters:
        device: ``auto`` or a torch device string.
        cuda_available: whether CUDA is usable; asked of torch when ``None``.

    Returns:
        ``cuda:0`` or ``cpu`` for ``auto``; ``device`` itself otherwise.
    """
    if device.strip().lower() != AUTO:
        return device
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return "cuda:0" if cuda_available else "cpu"


def cuda_device_count() -> int:
    """GPUs torch can use here (0 without CUDA, or without torch's CUDA build)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


#: Frames per forward pass on the CPU. glibc serves a block over 32 MB (its largest mmap
#: threshold) with fresh pages every time, and a batch's activations are such blocks. On
#: 32-frame batches of 640×480, 2-core dev machine (``bench/cpu_forward_bench.py``): one
#: pass with glibc's defaults ran YOLO11n (at 640) 6.1 frames/s and the EfficientNet-Lite0
#: scorer 12.6; passes of 4 ran them 8.4 and 23.9, and 11.0 and 25.3 with ``keep_freed_heap``.
CPU_FORWARD_ROWS = 4
#: glibc ``mallopt`` parameters (``malloc.h``).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def padded_rows(frames: int, step: int, cap: int | None = None) -> int:
    """Rows of a batch of ``frames`` padded up to a multiple of ``step``, but never past
    ``cap`` (the largest batch the worker reads) unless the batch itself is larger.

    On CUDA each padded size is one shape: cuDNN's plans and a captured graph, seconds
    at its first sight (bench/detect_startup.py). ``padded_rows(5, 32, 8) == 8``,
    ``padded_rows(40, 32, 48) == 48``, ``padded_rows(40, 32) == 64``.
    """
    rows = -(-frames // max(1, step)) * max(1, step)
    return min(rows, max(frames, cap)) if cap else rows


@functools.cache
def keep_freed_heap() -> bool:
    """Have glibc keep freed heap memory for reuse instead of handing it back to the kernel.

    A CPU forward pass frees and reallocates the same tens of MB every batch; glibc's
    defaults trim the heap and map large blocks afresh, so each pass faults its pages in
    again. Blocks up to 32 MB (glibc's largest mmap threshold) then come from the heap;
    the process keeps its peak heap. With passes of 4 frames (``bench/cpu_forward_bench.py``,
    2 cores), YOLO11n went from 9,400 page faults a frame and 8.4 frames/s to 1,800 and
    11.0. Process-wide, once; called by models placed on the CPU.

    Returns:
        Whether it took effect (``False`` where the C library is not glibc).
    """
    import ctypes

    try:
        # The process's own symbols: libc's, without find_library's ldconfig subprocess.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))


def in_row_chunks(forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], batch: torch.Tensor,
                  rows: int) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``forward`` over ``batch`` in passes of at most ``rows`` rows, outputs joined on dim 0.

    Parameters:
        forward: a pass returning a tuple of tensors whose first dimension is the batch's.
        batch: ``(N, ...)``.
        rows: rows per pass (≥ 1).

    Returns:
        ``forward(batch)``'s tuple, each tensor ``(N, ...)``, in row order.
    """
    import torch

    if batch.shape[0] <= rows:
        return forward(batch)
    parts = [forward(batch[i : i + rows]) for i in range(0, batch.shape[0], rows)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))
