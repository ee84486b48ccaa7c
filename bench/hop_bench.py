"""Entries per second through one hop: publish → read → process → publish → ack.

Side by side in one run, on the same Redis server and the same small entries:

* ``bare``: a redis-py asyncio loop doing XADD (producer) and XREADGROUP / XADD / XACK
  batches (consumer) with nothing else;
* ``roadstream``: our producer (``Broker.publish_many``) and a ``Worker`` running the
  relay stage: msgpack decode, schema validation, encode, idempotent publish (Lua dedupe),
  ack — everything a real stage pays for;
* ``roadstream-nodedupe``: the same without dedupe keys, to show what idempotence costs.

Usage: ``python bench/hop_bench.py [--redis URL] [--entries N] [--batch B] [--rounds R] [--max-wait-ms W]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.private_redis import HELP, redis_server
from brokers.base import Publish
from brokers.redis import RedisBlobStore, RedisBroker
from fixtures.relay import RelayHandler, frame
from stream import codec, names
from stream.settings import load_settings
from workers.runtime import Worker

NS = "hopbench"
#: Reply parser of both sides: hiredis (C) when installed, or redis-py's own Python one.
CLIENT: dict = {}


async def bare(url: str, entries: list[bytes], batch: int) -> float:
    client = aioredis.from_url(url, **CLIENT)
    await client.flushdb()
    src, dst = f"{NS}:bare-in", f"{NS}:bare-out"
    await client.xgroup_create(src, "g", id="0", mkstream=True)
    started = time.perf_counter()

    async def produce() -> None:
        for i in range(0, len(entries), batch):
            pipe = client.pipeline(transaction=False)
            for data in entries[i : i + batch]:
                pipe.xadd(src, {"d": data})
            await pipe.execute()

    async def consume() -> None:
        done = 0
        while done < len(entries):
            reply = await client.xreadgroup("g", "c", {src: ">"}, count=batch, block=100)
            if not reply:
                continue
            got = reply[0][1]
            pipe = client.pipeline(transaction=False)
            for _, fields in got:
                pipe.xadd(dst, {"d": fields[b"d"]})
            pipe.xack(src, "g", *[entry_id for entry_id, _ in got])
            await pipe.execute()
            done += len(got)

    await asyncio.gather(produce(), consume())
    elapsed = time.perf_counter() - started
    await client.aclose()
    return len(entries) / elapsed


async def ours(url: str, entries: list[bytes], batch: int, dedupe: bool, wait_ms: int = 5) -> float:
    settings = load_settings(environ={}, namespace=NS, worker={"batch_size": batch, "max_wait_ms": wait_ms})
    broker = RedisBroker(url=url, namespace=NS, settings=settings.broker, **CLIENT)
    blobs = RedisBlobStore(url, namespace=NS, **CLIENT)
    await broker.client.flushdb()
    handler = RelayHandler(dedupe=dedupe)
    worker = Worker(handler, broker, blobs, settings, consumer="bench")
    src = names.stream_name("bench-in", ns=NS)
    out = names.stream_name("bench-out", ns=NS)
    await broker.ensure_group(src, handler.group)
    started = time.perf_counter()
    runner = asyncio.create_task(worker.run())

    async def produce() -> None:
        for i in range(0, len(entries), batch):
            await broker.publish_many([Publish(src, data) for data in entries[i : i + batch]])

    await produce()
    while worker.counts["out"] < len(entries):
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    worker.stop()
    await runner
    assert (await broker.stats(out)).length == len(entries)
    await broker.close()
    await blobs.close()
    return len(entries) / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", default=None, help=HELP + " (FLUSHDB between rounds)")
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-wait-ms", type=int, default=5, help="the worker's wait to fill a batch")
    parser.add_argument("--parser", choices=("hiredis", "python"), default="hiredis", help="reply parser, both sides")
    args = parser.parse_args()
    CLIENT["parser_class"] = _AsyncHiredisParser if args.parser == "hiredis" else _AsyncRESP2Parser
    entries = [codec.encode(frame("drive-1", i)) for i in range(args.entries)]
    rates: dict[str, list[float]] = {"bare": [], "roadstream": [], "roadstream-nodedupe": []}
    with redis_server(None, args.redis) as url:
        for _ in range(args.rounds):  # interleaved, so drift hits all three alike
            rates["bare"].append(await bare(url, entries, args.batch))
            rates["roadstream"].append(await ours(url, entries, args.batch, True, args.max_wait_ms))
            rates["roadstream-nodedupe"].append(await ours(url, entries, args.batch, False, args.max_wait_ms))
    median = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in median.items():
        print(f"{name:22s} {rate:10.0f} entries/s  ({rate / median['bare']:.0%} of bare)")
    summary = {
        "entries": args.entries,
        "batch": args.batch,
        "entry_bytes": len(entries[0]),
        "parser": args.parser,
        "median_rate": median,
        "ratio": median["roadstream"] / median["bare"],
        "ratio_nodedupe": median["roadstream-nodedupe"] / median["bare"],
        "rounds": rates,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    asyncio.run(main())
