"""The frame scorer's heads beside the detector's, and the two combined per frame.

The scorer (``stages.scorer.RoadworkScorer``) runs in the detector's launch over the same
decoded frames (an ``ExtraHeads`` callable); its outputs land in ``PendingBatch.extras``.
Here: what those heads are, and how a collected batch's detections and extras become one
``FrameScore`` per frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    from stages.detect.detector import FrameResult
    from stages.scorer import RoadworkScorer


@dataclass
class FrameScore:
    """The scorer's view of one frame: roadwork probability and the window's descriptor."""

    prob: float
    descriptor: np.ndarray


def normalize_rows(features: torch.Tensor) -> torch.Tensor:
    """L2-normalise pooled features row by row (as the detector's descriptor is)."""
    return F.normalize(features, dim=1)


def score_heads(scorer: RoadworkScorer, images: list, *, scorer_descriptor: bool) -> dict[str, Any]:
    """The scorer's heads over a batch of decoded frames (queued on the device).

    Returns:
        ``prob``: a tensor of one roadwork probability per frame; with
        ``scorer_descriptor``, ``descriptor``: the scorer's pooled features, L2-normalised,
        one row per frame (the window then compares frames by them).
    """
    probs, pooled = scorer.score_frames(images)
    heads = {"prob": probs}
    if scorer_descriptor:
        heads["descriptor"] = normalize_rows(pooled)
    return heads


def frame_scores(found: list[FrameResult], extras: dict[str, Any]) -> list[FrameScore | None]:
    """One ``FrameScore`` per collected frame (``None`` each when no scorer ran), its
    descriptor the scorer's when it gave one, else the detector's."""
    if "prob" not in extras:
        return [None] * len(found)
    probs = extras["prob"].tolist()
    if "descriptor" in extras:
        descriptors = list(extras["descriptor"].numpy().astype(np.float32))
    else:
        descriptors = [r.descriptor for r in found]
    return [FrameScore(p, d) for p, d in zip(probs, descriptors, strict=True)]
