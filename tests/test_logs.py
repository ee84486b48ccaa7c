"""Structured logs: JSON lines that carry the stage, drive and window of a record."""

from __future__ import annotations

import asyncio
import json
import logging

from brokers.memory import MemoryBlobStore, MemoryBroker
from fixtures.relay import BAD_INPUT_DRIVE, RelayHandler, frame
from stream import codec, names
from stream.settings import load_settings
from tests.test_runtime import dead_letters, wait_until
from workers.logs import JsonFormatter
from workers.runtime import Worker


def test_json_lines_carry_the_context_fields() -> None:
    # Given a record with a drive and a window in its extras
    record = logging.LogRecord("roadstream.fuse", logging.INFO, __file__, 1, "verdict %s", ("w3",), None)
    record.drive, record.window, record.stage = "d42", 3, "fuse"

    # When it is formatted as JSON
    line = json.loads(JsonFormatter().format(record))

    # Then the message and the context are keys of one object
    assert line["msg"] == "verdict w3"
    assert (line["drive"], line["window"], line["stage"], line["level"]) == ("d42", 3, "fuse", "info")
    assert "consumer" not in line  # absent fields are left out, not null


async def test_a_dead_letter_is_logged_with_its_drive(caplog) -> None:
    # Given a worker and a frame its stage rejects as bad input
    broker = MemoryBroker(namespace="logtest")
    settings = load_settings(environ={}, worker={"max_wait_ms": 10, "heartbeat_s": 0.05}, namespace="logtest")
    await broker.publish(names.stream_name("bench-in", ns="logtest"), codec.encode(frame(BAD_INPUT_DRIVE, 1)))
    worker = Worker(RelayHandler(), broker, MemoryBlobStore(), settings, consumer="w1")

    # When it dead-letters the frame
    with caplog.at_level(logging.WARNING, logger="roadstream.worker"):
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: _one_letter(broker))
        worker.stop()
        await task

    # Then the log record names the drive, the stage and the entry
    (record,) = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert (record.drive, record.stage) == (BAD_INPUT_DRIVE, "relay")
    assert record.entry and record.stream.endswith("bench-in")


async def _one_letter(broker: MemoryBroker) -> bool:
    return len(await dead_letters(broker)) == 1
