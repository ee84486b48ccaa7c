"""What the vlm stage asks about an escalated window: which key frames, and the question.

Pure: no backend, no broker. ``workers.handlers.vlm`` fetches the frames chosen here and sends the
prompt to the backend.
"""

from __future__ import annotations

import json
from collections import defaultdict

from stages.vlm.base import thin
from stream.schemas import CameraFrame, Escalation


def select_frames(frames: list[CameraFrame], limit: int) -> list[CameraFrame]:
    """At most ``limit`` frames, shared evenly across cameras, in camera then time order."""
    by_camera: dict[str, list[CameraFrame]] = defaultdict(list)
    for frame in sorted(frames, key=lambda f: (f.camera, f.t)):
        by_camera[frame.camera].append(frame)
    if limit <= 0:
        return [f for fs in by_camera.values() for f in fs]
    cameras = thin(sorted(by_camera), limit)  # more cameras than images: spread the cameras
    share = max(1, limit // len(cameras)) if cameras else 0
    return [f for camera in cameras for f in thin(by_camera[camera], share)]


def escalation_prompt(escalation: Escalation) -> str:
    """The question for one escalated window, with fuse's evidence as context."""
    evidence = json.dumps(escalation.evidence, sort_keys=True, default=str)[:1500]
    return (
        f"The images are key frames from a car's cameras (each labelled with its camera) between "
        f"{escalation.t_start:.1f} s and {escalation.t_end:.1f} s of a drive. An automatic detector was unsure "
        f"(confidence {escalation.confidence:.2f}) whether there is roadwork; its evidence: {evidence}.\n"
        "Is there roadwork (a construction or work zone) in view? Report roadwork (true/false), your "
        "confidence (0 to 1), the roadwork objects you see with the cameras that show them, how many lanes "
        "are affected, and a one-sentence description."
    )
