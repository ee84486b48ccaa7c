"""Hooks: what the runtime reports about its work, for metrics and logs.

``Hooks`` is a no-op base (after dramatiq's ``Middleware``): override only what you need.
The runtime calls every hook through ``Worker.emit``, which logs a failing hook and
carries on, so a broken exporter never stops a stage. ``PrometheusHooks`` feeds
``workers.metrics``; ``CountingHooks`` keeps the counts the health record shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from workers import metrics


class Hooks:
    """No-op hooks; each method is one event of a worker of stage ``group``."""

    def entries_in(self, group: str, count: int) -> None:
        """``count`` entries were read and decoded."""

    def entries_out(self, group: str, count: int) -> None:
        """``count`` entries were published."""

    def entry_failed(self, group: str, reason: str) -> None:
        """An entry failed; ``reason`` is the error's type name."""

    def dead_lettered(self, group: str) -> None:
        """An entry went to the dead-letter stream."""

    def reclaimed(self, group: str, count: int) -> None:
        """``count`` entries were taken over from other consumers (or on a take-over)."""

    def batch_done(self, group: str, seconds: float, size: int) -> None:
        """A batch of ``size`` entries was handled in ``seconds``."""

    def trimmed(self, group: str, count: int) -> None:
        """``count`` entries were trimmed or capped away."""

    def partitions(self, group: str, consumer: str, owned: int, revoked_streams: Iterable[str]) -> None:
        """After a lease refresh: ``owned`` partitions; the streams of revoked ones."""

    def lag(self, group: str, stream: str, lag: int, pending: int) -> None:
        """A stream's lag and pending count for the group."""


class CountingHooks(Hooks):
    """Counts of entries in, out, failed, dead-lettered and trimmed (the health record's)."""

    def __init__(self) -> None:
        self.counts = {"in": 0, "out": 0, "failed": 0, "dead": 0, "trimmed": 0}

    def entries_in(self, group: str, count: int) -> None:
        self.counts["in"] += count

    def entries_out(self, group: str, count: int) -> None:
        self.counts["out"] += count

    def entry_failed(self, group: str, reason: str) -> None:
        self.counts["failed"] += 1

    def dead_lettered(self, group: str) -> None:
        self.counts["dead"] += 1

    def trimmed(self, group: str, count: int) -> None:
        self.counts["trimmed"] += count


class PrometheusHooks(Hooks):
    """Exports the events as the Prometheus metrics of ``workers.metrics``."""

    def entries_in(self, group: str, count: int) -> None:
        metrics.ENTRIES_IN.labels(group).inc(count)

    def entries_out(self, group: str, count: int) -> None:
        metrics.ENTRIES_OUT.labels(group).inc(count)

    def entry_failed(self, group: str, reason: str) -> None:
        metrics.ENTRIES_FAILED.labels(group, reason).inc()

    def dead_lettered(self, group: str) -> None:
        metrics.DEAD_LETTERS.labels(group).inc()

    def reclaimed(self, group: str, count: int) -> None:
        metrics.RECLAIMED.labels(group).inc(count)

    def batch_done(self, group: str, seconds: float, size: int) -> None:
        metrics.STAGE_SECONDS.labels(group).observe(seconds)
        metrics.BATCH_SIZE.labels(group).observe(size)

    def partitions(self, group: str, consumer: str, owned: int, revoked_streams: Iterable[str]) -> None:
        metrics.PARTITIONS_OWNED.labels(group, consumer).set(owned)
        for stream in revoked_streams:  # its lag is exported by its new owner now
            with contextlib.suppress(KeyError):
                metrics.GROUP_LAG.remove(group, stream)
                metrics.GROUP_PENDING.remove(group, stream)

    def lag(self, group: str, stream: str, lag: int, pending: int) -> None:
        metrics.GROUP_LAG.labels(group, stream).set(lag)
        metrics.GROUP_PENDING.labels(group, stream).set(pending)
