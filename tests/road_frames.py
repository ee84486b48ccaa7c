"""Synthetic clear-road frames for the copy-paste tests (a helper module, no tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.train.sources import Item


def road_frame(path: Path, source: str) -> Item:
    """Write a 640×360 clear road frame (sky above a horizon at row 160, grey asphalt
    below) to ``path``; returns it as a clear ``frames`` item of ``source``."""
    import cv2

    image = np.zeros((360, 640, 3), np.uint8)
    image[:160] = (200, 170, 140)
    image[160:] = (70, 70, 70)
    cv2.imwrite(str(path), image)
    return Item(path, 0, source, "frames", "", (), path.name)
