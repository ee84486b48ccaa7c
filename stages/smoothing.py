"""VERA's smoothing of segment anomaly scores over a drive (numpy only; fuse calls these).

1. Scene context: each segment's score becomes the softmax(temperature · cosine)-weighted
   mean of the scores of its top ``top_fraction`` most similar segments of the drive
   (itself included), by descriptor. Repeated scenes then agree with each other.
2. Temporal: a normalised 1-D Gaussian kernel (``size`` segments, ``sigma``) over the
   segments in time order; at the ends the kernel is renormalised over the part that
   lies inside, so edge scores are not pulled towards zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: VERA's defaults (CVPR 2025).
TOP_FRACTION = 0.15
TEMPERATURE = 10.0
KERNEL_SIZE = 15
SIGMA = 10.0


def scene_smooth(
    scores: Sequence[float],
    descriptors: Sequence[Sequence[float]],
    *,
    top_fraction: float = TOP_FRACTION,
    temperature: float = TEMPERATURE,
) -> np.ndarray:
    """Scene-context smoothing of one drive's segment scores.

    Parameters:
        scores: one score per segment.
        descriptors: one vector per segment, all the same length. A segment with an
            empty or all-zero descriptor is similar to nothing and keeps its score.
        top_fraction: share of the drive's segments each score is averaged over.
        temperature: softmax sharpness on the cosine similarities.

    Returns:
        The smoothed scores, same order.

    Raises:
        ValueError: scores and descriptors differ in count, or descriptors in length.
    """
    values = np.asarray(scores, dtype=np.float64)
    if len(descriptors) != len(values):
        message = f"scene_smooth: {len(values)} scores but {len(descriptors)} descriptors"
        raise ValueError(message)
    if len(values) == 0:
        return values
    unit, valid = _unit_rows(descriptors)
    similarity = unit @ unit.T
    k = max(1, math.ceil(top_fraction * len(values)))
    smoothed = values.copy()
    for i in np.flatnonzero(valid):
        candidates = np.flatnonzero(valid)
        nearest = candidates[np.argsort(-similarity[i, candidates], kind="stable")[:k]]
        weights = _softmax(temperature * similarity[i, nearest])
        smoothed[i] = float(weights @ values[nearest])
    return smoothed


def gaussian_kernel(size: int = KERNEL_SIZE, sigma: float = SIGMA) -> np.ndarray:
    """A normalised Gaussian kernel of ``size`` taps (odd sizes are centred)."""
    if size < 1 or sigma <= 0:
        message = f"gaussian_kernel: size must be >= 1 and sigma > 0, got size={size}, sigma={sigma}"
        raise ValueError(message)
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def temporal_smooth(scores: Sequence[float], *, size: int = KERNEL_SIZE, sigma: float = SIGMA) -> np.ndarray:
    """Gaussian smoothing of scores in time order, renormalised at the ends.

    Parameters:
        scores: one score per segment, in time order.
        size: kernel length in segments.
        sigma: kernel standard deviation in segments.

    Returns:
        The smoothed scores (a constant sequence stays constant).
    """
    values = np.asarray(scores, dtype=np.float64)
    if len(values) == 0:
        return values
    kernel = gaussian_kernel(size, sigma)
    weighted = np.convolve(values, kernel, mode="same")
    coverage = np.convolve(np.ones_like(values), kernel, mode="same")
    return weighted / coverage


def smooth_drive(
    scores: Sequence[float],
    descriptors: Sequence[Sequence[float]],
    *,
    top_fraction: float = TOP_FRACTION,
    temperature: float = TEMPERATURE,
    size: int = KERNEL_SIZE,
    sigma: float = SIGMA,
) -> np.ndarray:
    """Both smoothings, as VERA applies them: scene context first, then time."""
    scene = scene_smooth(scores, descriptors, top_fraction=top_fraction, temperature=temperature)
    return temporal_smooth(scene, size=size, sigma=sigma)


def _unit_rows(descriptors: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = {len(d) for d in descriptors if len(d)}
    if len(lengths) > 1:
        message = f"scene_smooth: descriptors differ in length: {sorted(lengths)}"
        raise ValueError(message)
    width = lengths.pop() if lengths else 1
    matrix = np.array([list(d) if len(d) else [0.0] * width for d in descriptors], dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1)
    valid = norms > 0
    matrix[valid] /= norms[valid, None]
    return matrix, valid


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max())
    return shifted / shifted.sum()
