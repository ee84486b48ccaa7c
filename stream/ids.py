"""Deterministic ids: a redelivered entry yields the same output id.

Dedupe keys are what ``Broker.publish`` uses to keep a re-published output from becoming
a second entry, so they must depend only on *what* an output is, never on when or by
which worker it was made.
"""

from __future__ import annotations

import hashlib


def _digest(*parts: object, size: int = 10) -> str:
    text = "\x1f".join(str(p) for p in parts)
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def drive_id(location: str, first_timestamp: str) -> str:
    """Stable id of a drive from where its footage lies and its first clip time."""
    return "d" + _digest(location, first_timestamp, size=6)


def output_key(stage: str, *parts: object) -> str:
    """Dedupe key of one output of a stage, e.g. ``output_key("detect", drive, cam, seq)``."""
    return f"{stage}:{_digest(*parts)}"


def blob_key(drive: str, camera: str, seq: int) -> str:
    """Blob-store key of one sampled frame's pixels."""
    return f"{drive}:{camera}:{seq}"
