"""Hooks: every metric and count goes through ``Worker.emit``, and a broken hook stops nothing."""

from __future__ import annotations

import logging

import pytest

from brokers.memory import MemoryBlobStore, MemoryBroker
from fixtures.relay import RelayHandler
from stream.settings import load_settings
from workers.hooks import Hooks, PrometheusHooks
from workers.metrics import ENTRIES_OUT
from workers.runtime import Worker


class Broken(Hooks):
    def entries_out(self, group: str, count: int) -> None:
        raise RuntimeError("exporter down")


class Seen(Hooks):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def entries_out(self, group: str, count: int) -> None:
        self.events.append((group, count))


def make_worker(*hooks: Hooks) -> Worker:
    settings = load_settings(environ={})
    return Worker(RelayHandler(), MemoryBroker(), MemoryBlobStore(), settings, consumer="w", hooks=hooks)


def test_an_event_reaches_counts_prometheus_and_extra_hooks(caplog: pytest.LogCaptureFixture) -> None:
    # Given a worker with a broken hook before a working one
    seen = Seen()
    worker = make_worker(Broken(), seen)
    before = ENTRIES_OUT.labels(worker.group)._value.get()

    # When it emits an event
    with caplog.at_level(logging.ERROR, logger="roadstream.worker"):
        worker.emit("entries_out", 3)

    # Then the counts, the Prometheus counter and the working hook have it, and the
    # broken hook was logged, not raised
    assert worker.counts["out"] == 3
    assert ENTRIES_OUT.labels(worker.group)._value.get() == before + 3
    assert seen.events == [(worker.group, 3)]
    assert "Broken.entries_out failed" in caplog.text


def test_the_base_hooks_do_nothing() -> None:
    # Given the no-op base, every event can be called on it
    hooks = Hooks()
    hooks.entries_in("g", 1)
    hooks.partitions("g", "c", 2, ["s"])
    hooks.lag("g", "s", 1, 0)
    assert isinstance(PrometheusHooks(), Hooks)
