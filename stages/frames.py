"""Turn a sampled frame into the bytes ingest stores: resized, then JPEG or raw RGB.

The fast path for PyAV frames does resize and colour conversion in one swscale call
straight to full-range YUV 4:2:0 and hands the planes to libjpeg-turbo (simplejpeg), so
no RGB image is ever made for a JPEG. ``raw`` is H×W×3 RGB bytes, row-major. A frame
with a display rotation (``frame.rotation``, from the MP4 display matrix) is stored turned
as players show it, so the detector sees it upright.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import simplejpeg


@dataclass(frozen=True)
class Encoded:
    """A frame's stored pixels."""

    data: bytes
    width: int
    height: int
    encoding: str  # jpeg | raw


def target_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    """Size with the long side at most ``long_side``, aspect kept, both even (4:2:0)."""
    scale = min(1.0, long_side / max(width, height)) if long_side > 0 else 1.0
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def encode_frame(image: Any, *, long_side: int = 640, encoding: str = "jpeg", quality: int = 85) -> Encoded:
    """Resize and encode one frame.

    Parameters:
        image: an ``av.VideoFrame`` (its display ``rotation`` applied) or an upright
            H×W×3 RGB uint8 array.
        long_side: the longest side after resizing (no upscaling); 0 keeps the size.
        encoding: ``jpeg`` or ``raw``.
        quality: JPEG quality, 1–100.

    Returns:
        The encoded bytes with their size.

    Raises:
        ValueError: an unknown encoding.
    """
    if encoding not in ("jpeg", "raw"):
        message = f"unknown frame encoding {encoding!r} (jpeg or raw)"
        raise ValueError(message)
    if isinstance(image, np.ndarray):
        return _encode_array(image, long_side, encoding, quality)
    turns = display_turns(image)
    width, height = target_size(image.width, image.height, long_side)
    if encoding == "raw":
        rgb = _turned(image.reformat(width, height, format="rgb24").to_ndarray(), turns)
        return Encoded(rgb.tobytes(), rgb.shape[1], rgb.shape[0], "raw")
    yuv = image.reformat(width, height, format="yuvj420p").to_ndarray()
    y, u, v = (_turned(plane, turns) for plane in _planes(yuv, width, height))
    data = simplejpeg.encode_jpeg_yuv_planes(y, u, v, quality=quality)
    return Encoded(data, y.shape[1], y.shape[0], "jpeg")


def display_turns(image: Any) -> int:
    """Quarter turns counter-clockwise that show a PyAV frame as players do (0–3).

    Cameras and phones write multiples of 90 degrees; anything else is rounded to one.
    """
    return round((getattr(image, "rotation", 0) or 0) / 90) % 4


def _turned(array: np.ndarray, turns: int) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(array, turns)) if turns else array


def _planes(yuv: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # PyAV packs 4:2:0 as Y rows then U then V, each chroma plane a quarter of Y.
    flat = yuv.reshape(-1)
    luma, chroma = width * height, (width // 2) * (height // 2)
    y = flat[:luma].reshape(height, width)
    u = flat[luma : luma + chroma].reshape(height // 2, width // 2)
    v = flat[luma + chroma : luma + 2 * chroma].reshape(height // 2, width // 2)
    return y, u, v


def _encode_array(rgb: np.ndarray, long_side: int, encoding: str, quality: int) -> Encoded:
    import cv2  # only the decord path hands over arrays

    height, width = rgb.shape[:2]
    new_w, new_h = target_size(width, height, long_side)
    if (new_w, new_h) != (width, height):
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    rgb = np.ascontiguousarray(rgb)
    if encoding == "raw":
        return Encoded(rgb.tobytes(), new_w, new_h, "raw")
    return Encoded(simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB"), new_w, new_h, "jpeg")


def decode_jpeg(data: bytes) -> np.ndarray:
    """An H×W×3 RGB array from stored JPEG bytes (for tests and consumers)."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB")
