"""Which torch device a stage runs on: ``auto`` resolves to the first GPU, else the CPU.

As ultralytics does: a CUDA device when torch sees one, the CPU otherwise. Anything
other than ``auto`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is passed through unchanged.
"""

from __future__ import annotations

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
