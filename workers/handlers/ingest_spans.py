"""A long drive's camera ingested as spans of minutes: published in order, whoever finishes.

Span jobs of one camera decode at once in different processes, but the camera's
partition must receive its frames in time order with ``seq`` 0, 1, 2 … So a span job does
not publish its frames: it stores their pixels in the blob store, then a *span record*
(its ``FrameRef``s, numbered from 0, and its share of the camera's record) as a broker
value, and then advances the camera's *chain*: while the span after the chain's cursor has
a record, publish that span's frames renumbered from the cursor's frame count, and move
the cursor past it. The span job that finds the next record missing stops: that span is
still decoding, and its job advances the chain when it stores its record. Each job
writes its record before it reads the cursor, and advances the cursor only after
publishing, so the last span to finish always publishes what is left.

Two jobs may advance the chain at once, or a job may write a stale cursor: every
publication has the deduplicating key of the frame's final ``seq``, so a span published
twice reaches the stream once, and the cursor only ever falls back to a span that is
published again (deduplicated) by the job that moved it back. The job that moves the
cursor past the last span stores the camera's record (``workers.handlers.ingest_parts``),
and the drive ends as a drive split per camera does. Then each span record becomes a
tombstone: the frames it listed are published, and the broker keeps no copy of them.
A span dead-lettered for good stores an empty record naming its minutes and queues its
job once more, which finds the record and moves the chain past the gap.

A span's pixels wait in the blob store until its turn. Only spans that are not next to
publish wait for memory room (``broker.max_blob_bytes``), so spans held back by an
earlier one can never starve it of room; and they wait only while their camera's chain
moves (``HELD_STUCK_S`` in the handler), so spans holding every ingest process cannot
wait for ever on an earlier span whose job waits for a process after its worker died.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import msgpack

from stream import codec
from stream.schemas import FrameRef
from workers.handlers.ingest_parts import CameraRecord

#: What a published span's record becomes (its frames are on the stream).
PUBLISHED = b"published"


def span_key(namespace: str, drive_id: str, camera: str, index: int, cut: str) -> str:
    """Broker value key of one span's record (span ``index`` of the cut ``Span.cut``).

    The cut names how the drive was split: a drive submitted again with other spans
    (another ``ingest.span_s``) is a chain of its own, whose frames, numbered alike, are
    deduplicated, instead of spans of another cut that publish minutes twice.
    """
    return f"{namespace}:ingest-span:{drive_id}:{camera}:{cut}:{index}"


def chain_key(namespace: str, drive_id: str, camera: str, cut: str) -> str:
    """Broker value key of a camera's chain cursor (of the cut ``Span.cut``)."""
    return f"{namespace}:ingest-chain:{drive_id}:{camera}:{cut}"


@dataclass
class Cursor:
    """How far a camera's spans are published.

    Attributes:
        next: the span to publish next (``count`` when all are).
        frames: frames published so far: the next span's first ``seq``.
    """

    next: int = 0
    frames: int = 0

    def encode(self) -> bytes:
        """JSON bytes."""
        return json.dumps([self.next, self.frames]).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Cursor:
        """From ``encode``'s bytes; a fresh cursor for ``None`` (nothing published yet)."""
        if data is None:
            return cls()
        first, frames = json.loads(data)
        return cls(int(first), int(frames))


@dataclass
class SpanRecord:
    """What one span of a camera decoded.

    Attributes:
        record: the span's share of the camera's record (frames, ticks, problems …).
        refs: its frames in order, ``seq`` numbered from 0 within the span.
    """

    record: CameraRecord
    refs: list[FrameRef]

    def encode(self) -> bytes:
        """msgpack bytes: the record's JSON and each frame's stream encoding."""
        return msgpack.packb({"record": self.record.encode(), "refs": [codec.encode(r) for r in self.refs]})

    @classmethod
    def decode(cls, data: bytes) -> SpanRecord:
        """From ``encode``'s bytes.

        Raises:
            stream.errors.DecodeError: a frame does not decode.
        """
        raw = msgpack.unpackb(data)
        return cls(CameraRecord.decode(raw["record"]), [codec.decode(r, FrameRef) for r in raw["refs"]])


def join(spans: list[CameraRecord]) -> CameraRecord:
    """A camera's record from its spans' records, in span order.

    Frames and missed ticks add up; ticks are the union; missing minutes and problems
    (whose minute indices are the drive's) follow in span order; the first UTC is the
    first span's that has one, the last the last span's. A failed span adds its problem
    and no frames: the camera's count stays exact (the spans that published are known).
    """
    firsts = [s.first for s in spans if s.first is not None]
    lasts = [s.last for s in spans if s.last is not None]
    return CameraRecord(
        frames=sum(s.frames for s in spans), ticks=sorted({t for s in spans for t in s.ticks}),
        missing=[m for s in spans for m in s.missing], problems=[p for s in spans for p in s.problems],
        first=firsts[0] if firsts else None, last=lasts[-1] if lasts else None,
        missed_ticks=sum(s.missed_ticks for s in spans),
    )
