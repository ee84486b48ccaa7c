"""The fuse worker: binds ``stages.fuse.Fuser`` to the detections, anomaly and answers hops.

Partitioned by drive (``drive_partition``), so one worker sees all of a drive's entries in
order. Each batch goes through the fuser; what it emits is published *by the handler*
(through the runtime's publisher), then the drive's checkpoint is written to the blob
store, and only then are the entries of the published windows acknowledged:

    publish verdicts/escalations  →  checkpoint  →  ack

A crash before the checkpoint replays the entries, the fuser makes the same verdicts, and
the dedupe keys keep one of each. The checkpoint holds what acknowledged entries can no
longer tell a new owner: the published windows (for the drive summary) and the anomaly
history (for smoothing). Entries of open windows stay pending (the runtime touches them),
so a new owner rebuilds open windows by replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial

import msgpack

from brokers.blobs import BlobStore
from stages.calibration import load_coefficients
from stages.fuse import Fuser, Smoother, dedupe_key
from stages.step import Step
from stages.smoothing import smooth_drive
from stream import names
from stream.schemas import AnomalyScore, DriveMarker, Escalation, FrameDetections, Message, VlmAnswer
from stream.settings import Settings
from workers.handler import BatchResult, Delivery, Handler, Output

log = logging.getLogger("roadstream.fuse")


def checkpoint_key(drive_id: str) -> str:
    """Blob-store key of a drive's fuse checkpoint."""
    return f"fuse-checkpoint:{drive_id}"


def smoother_from(settings: Settings) -> Smoother:
    """VERA's scene-context then temporal smoothing, with the vlm section's parameters."""
    vlm = settings.vlm
    smooth = partial(
        smooth_drive,
        top_fraction=vlm.scene_top_fraction,
        temperature=vlm.scene_temperature,
        size=vlm.temporal_size,
        sigma=vlm.temporal_sigma,
    )
    return lambda scores, descriptors: [float(x) for x in smooth(scores, descriptors)]


class FuseHandler(Handler):
    """Fuses a drive's detections, anomaly scores and VLM answers into verdicts.

    Parameters:
        settings: all settings (``fuse``, and ``vlm.backend`` to know whether vera and
            vlm run: only then do windows wait for anomaly scores and escalate).
        blobs: the blob store, used for the per-drive checkpoints.
        clock: POSIX time, injectable for tests.
    """

    group = names.FUSE
    inputs = (names.DETECTIONS, names.ANOMALY, names.ANSWERS)
    partitioned = True
    accepts = (FrameDetections, DriveMarker, AnomalyScore, VlmAnswer)

    def __init__(self, settings: Settings, blobs: BlobStore, *, clock: Callable[[], float] = time.time) -> None:
        fuse = settings.fuse
        vlm_on = bool(settings.vlm.backend)
        coefficients = load_coefficients(fuse.calibration) if fuse.calibration else None
        self.fuser = Fuser(
            fuse, escalate=vlm_on, expect_anomaly=vlm_on, smoother=smoother_from(settings), coefficients=coefficients
        )
        self.settings = settings
        self.blobs = blobs
        self.clock = clock
        self._held: dict[tuple[str, str], Delivery] = {}
        self._partition_of: dict[str, int | None] = {}

    async def handle(self, batch: list[Delivery], prepared: object = None) -> BatchResult:
        """Feed a batch to the fuser; publish, checkpoint and ack what it closed."""
        await self._restore([d.message.drive_id for d in batch])  # type: ignore[attr-defined]
        now = self.clock()
        step = Step()
        for delivery in batch:
            token = (delivery.entry.stream, delivery.entry.id)
            self._held[token] = delivery
            self._partition_of[delivery.message.drive_id] = delivery.partition  # type: ignore[attr-defined]
            step.extend(self.fuser.add(delivery.message, token, now))
        # Timeouts are checked on every batch too: tick() runs only when reads come back empty.
        step.extend(self.fuser.tick(now))
        return await self._commit(step)

    async def tick(self) -> BatchResult:
        """Close windows whose watermark or VLM timeout passed."""
        return await self._commit(self.fuser.tick(self.clock()))

    async def revoked(self, partition: int) -> None:
        """Forget the drives of a partition another worker now owns."""
        for drive_id in [d for d, p in self._partition_of.items() if p == partition]:
            self.fuser.drop(drive_id)
            del self._partition_of[drive_id]
        self._held = {k: d for k, d in self._held.items() if d.partition != partition}

    async def _commit(self, step: Step) -> BatchResult:
        for message in step.outputs:
            log.info(
                "fuse: %s %s window %s",
                message.KIND,
                message.drive_id,  # type: ignore[attr-defined]
                getattr(message, "window", "-"),
                extra={"stage": names.FUSE, "drive": message.drive_id, "window": getattr(message, "window", None)},  # type: ignore[attr-defined]
            )
        outputs = [self._output(m) for m in step.outputs]
        if outputs and self.publisher is not None:
            await self.publisher.publish(outputs)  # before the checkpoint that says they are out
            outputs = []
        await self._checkpoint(self.fuser.take_dirty())
        if step.spent_blobs and not outputs:  # their verdicts are out: let the pixels go soon
            await self.blobs.expire_many(step.spent_blobs, self.settings.broker.spent_blob_ttl_s)
        ack = [self._held.pop(t) for t in step.release if t in self._held]
        return BatchResult(outputs=outputs, ack=ack)

    def _output(self, message: Message) -> Output:
        hop = names.ESCALATIONS if isinstance(message, Escalation) else names.VERDICTS
        return Output(hop=hop, message=message, dedupe_key=dedupe_key(message))

    async def _restore(self, drive_ids: Sequence[str]) -> None:
        unknown = sorted({d for d in drive_ids if d not in self.fuser.drives})
        if not unknown:
            return
        blobs = await self.blobs.get_many([checkpoint_key(d) for d in unknown])
        for drive_id, blob in zip(unknown, blobs, strict=True):
            if blob is not None:
                self.fuser.restore(drive_id, msgpack.unpackb(blob, raw=False, strict_map_key=False))
                log.info("fuse: drive %s restored from its checkpoint", drive_id)

    async def _checkpoint(self, drive_ids: set[str]) -> None:
        if not drive_ids:
            return
        for drive_id in sorted(d for d in drive_ids if d in self.fuser.drives):
            # Versioned by the drive's progress: a worker resumed after a pause past its
            # leases (its drive since taken over and moved on) finishes the batch in hand
            # and writes its checkpoint before it learns the partition is gone; an older
            # checkpoint over the new owner's made a later rebuild lose closed windows
            # and wait for frames it had already published (the pause test's rare hang).
            blob = msgpack.packb(self.fuser.snapshot(drive_id), use_bin_type=True)
            version = self.fuser.progress(drive_id)
            stored = await self.blobs.put_versioned(checkpoint_key(drive_id), blob, version,
                                                    ttl_s=self.settings.fuse.checkpoint_ttl_s)  # fmt: skip
            if not stored:
                log.info("fuse: checkpoint of drive %s not written: a newer one is stored (another worker "
                         "owns the drive now)", drive_id)  # fmt: skip
        for drive_id in drive_ids:
            drive = self.fuser.drives.get(drive_id)
            if drive is not None and drive.done:
                self.fuser.drop(drive_id)  # its checkpoint says done: late entries are acked


def build(settings: Settings, blobs: BlobStore) -> FuseHandler:
    """The registry's builder of the fuse stage."""
    return FuseHandler(settings, blobs)
