"""The verdicts client: reading from an id, following, and through a consumer group."""

from __future__ import annotations

import asyncio

from brokers.base import Broker
from stream import codec, names
from stream.schemas import DriveSummary, Verdict
from workers.client import VerdictClient


def verdict(window: int) -> Verdict:
    return Verdict(drive_id="d1", window=window, t_start=window * 2.0, t_end=window * 2.0 + 2, roadwork=False, confidence=0.1)


async def put(broker: Broker, messages) -> list[str]:
    stream = names.stream_name(names.VERDICTS, ns=broker.namespace)
    return [await broker.publish(stream, codec.encode(m)) for m in messages]


async def collect(iterator) -> list:
    return [item async for item in iterator]


async def test_read_resumes_after_the_given_id(broker: Broker):
    # Given four verdicts and a drive summary
    ids = await put(broker, [verdict(i) for i in range(4)] + [DriveSummary(drive_id="d1", windows=4, roadwork_windows=0)])
    client = VerdictClient(broker)
    # When read from the start, then from the second id on
    everything = await collect(client.read())
    rest = await collect(client.read(from_id=ids[1]))
    # Then both are decoded in order and the resume skips what was handled
    assert [i.id for i in everything] == ids
    assert isinstance(everything[-1].message, DriveSummary)
    assert [i.message.window for i in rest[:-1]] == [2, 3]


async def test_follow_waits_for_new_verdicts(broker: Broker):
    # Given a follower that wants three verdicts, and one published so far
    await put(broker, [verdict(0)])
    client = VerdictClient(broker, poll_s=0.01)
    follower = asyncio.create_task(collect(client.read(follow=True, limit=3)))
    await asyncio.sleep(0.05)
    # When two more arrive later
    await put(broker, [verdict(1), verdict(2)])
    # Then the follower gets all three
    got = await asyncio.wait_for(follower, timeout=5)
    assert [i.message.window for i in got] == [0, 1, 2]


async def test_group_members_share_the_verdicts_and_ack_them(broker: Broker):
    # Given six verdicts and two readers of one group
    await put(broker, [verdict(i) for i in range(6)])
    client = VerdictClient(broker)
    # When each reads what the group hands it
    first = await collect(client.consume("maps", "r1", follow=False, count=3, block_ms=10))
    second = await collect(client.consume("maps", "r2", follow=False, count=3, block_ms=10))
    # Then together they saw each verdict once, and nothing is left pending
    windows = sorted(i.message.window for i in first + second)
    assert windows == list(range(6))
    stats = await broker.stats(client.stream)
    assert stats.group("maps").pending == 0


async def test_undecodable_entries_are_skipped(broker: Broker):
    # Given garbage between two verdicts
    stream = names.stream_name(names.VERDICTS, ns=broker.namespace)
    await put(broker, [verdict(0)])
    await broker.publish(stream, b"\x00garbage")
    await put(broker, [verdict(1)])
    # Then the client reads the two verdicts
    got = await collect(VerdictClient(broker).read())
    assert [i.message.window for i in got] == [0, 1]


def _cli():
    from workers.cli import cli
    from workers.cli.verdicts import register

    if "verdicts" not in cli.commands:
        register(cli)
    return cli


def _publish_sync(url: str, messages) -> list[str]:
    from brokers.connect import connect

    async def go():
        broker, blobs = connect(url)
        try:
            return await put(broker, messages)
        finally:
            await broker.close()
            await blobs.close()

    return asyncio.run(go())


def test_verdicts_command_prints_a_table_and_json_lines(redis_url):
    # Given two verdicts on the stream
    import json

    from click.testing import CliRunner

    ids = _publish_sync(redis_url, [verdict(0), verdict(1).copy_with(roadwork=True, confidence=0.9)])
    runner = CliRunner(env={"COLUMNS": "200"})
    # When listed as a table, as JSON, and from the first id on
    table = runner.invoke(_cli(), ["verdicts", "--redis", redis_url])
    lines = runner.invoke(_cli(), ["verdicts", "--redis", redis_url, "--json"]).output.splitlines()
    resumed = runner.invoke(_cli(), ["verdicts", "--redis", redis_url, "--json", "--from", ids[0]]).output.splitlines()
    # Then the table shows both windows, the JSON carries ids, and --from skips the first
    assert table.exit_code == 0 and "ROADWORK" in table.output and "d1" in table.output
    assert [json.loads(line)["id"] for line in lines] == ids
    assert [json.loads(line)["window"] for line in resumed] == [1]
