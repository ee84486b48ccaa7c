"""One Redis server against a three-primary Redis Cluster, side by side in one run.

Two measures, each with 1 client and with several (each client its own process, all
started together), on a private ``redis-server`` and on a private local cluster of three
primaries (no replicas: ``--replicas`` adds them):

* **hop**: entries per second through one hop as ``bench/hop_bench.py`` runs it (our
  producer, a ``Worker`` running the relay stage: decode, validate, encode, idempotent
  publish, ack); each client has a stream pair of its own, tagged ``{i}`` so that the
  clients' streams spread over the cluster's primaries as partitions do;
  With ``--replicas 1 --replica-acks 1`` the cluster's clients wait for a replica on
  every publish, as the cluster deploy files set it;
* **blob fetch**: frame blobs (``--blob-bytes`` each) fetched in batches of ``--batch``
  keys by ``RedisBlobStore.get_many``, as detect does; on the cluster one pipeline per
  primary, in parallel.

Per client and aggregate (all clients together) for each; the cluster's figures are also
given as a share of the single server's. Prints one JSON line at the end.

Usage: ``python bench/cluster_bench.py [--clients 1,3] [--entries N] [--seconds S] [--rounds R]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # redis_servers: the test suite's cluster builder

from bench.private_redis import redis_server  # noqa: E402
from brokers.base import Publish  # noqa: E402
from brokers.redis import RedisBlobStore, RedisBroker  # noqa: E402
from fixtures.relay import RelayHandler, frame  # noqa: E402
from stream import codec  # noqa: E402
from stream.settings import load_settings  # noqa: E402

NS = "clusterbench"
CAMERAS = ("front", "back", "left_repeater", "right_repeater", "left_pillar", "right_pillar")


@contextlib.contextmanager
def redis_cluster(masters: int, replicas: int) -> Iterator[str]:
    """A private local cluster's ``redis+cluster://`` URL (nodes on free loopback ports)."""
    from redis_servers import RedisClusterServers

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as folder, RedisClusterServers(
        Path(folder), masters=masters, replicas=replicas
    ) as cluster:
        yield cluster.start().url()


async def hop_client(url: str, client: int, entries: int, batch: int, replica_acks: int = 0) -> float:
    """Entries per second of one client's hop (producer and relay worker, one process)."""
    from workers.runtime import Worker

    ns = f"{NS}{{{spread_tag(client)}}}"
    settings = load_settings(environ={}, namespace=ns, worker={"batch_size": batch, "max_wait_ms": 5},
                             broker={"replica_acks": replica_acks if "cluster" in url else 0})  # fmt: skip
    broker = RedisBroker(url=url, namespace=ns, settings=settings.broker)
    blobs = RedisBlobStore(url, namespace=ns)
    handler = RelayHandler(dedupe=True)
    worker = Worker(handler, broker, blobs, settings, consumer=f"bench-{client}")
    # The relay reads stream_name("bench-in") of its namespace: one namespace per client,
    # its hash tag chosen so that client i's streams are on primary i % 3 (the slot
    # ranges ``--cluster create`` gives three primaries), as partitions spread.
    src, out = worker.stream("bench-in"), worker.stream("bench-out")
    await broker.ensure_group(src, handler.group)
    data = [codec.encode(frame(f"drive-{client}", i)) for i in range(entries)]
    started = time.perf_counter()
    runner = asyncio.create_task(worker.run())
    for i in range(0, entries, batch):
        await broker.publish_many([Publish(src, d) for d in data[i : i + batch]])
    while worker.counts["out"] < entries:
        await asyncio.sleep(0.002)
    elapsed = time.perf_counter() - started
    worker.stop()
    await runner
    assert (await broker.stats(out)).length == entries
    await broker.close()
    await blobs.close()
    return entries / elapsed


def spread_tag(client: int, primaries: int = 3) -> str:
    """A hash tag whose slot is in the ``client % primaries``-th of equal slot ranges."""
    from redis.crc import key_slot

    share = 16384 // primaries + 1
    return next(f"c{client}-{n}" for n in range(10_000) if key_slot(f"c{client}-{n}".encode()) // share == client % primaries)


async def fetch_client(url: str, client: int, keys: int, batch: int, blob_bytes: int, seconds: float) -> float:
    """Blobs per second one client fetches in batches of ``batch`` keys for ``seconds``."""
    store = RedisBlobStore(url, namespace=f"{NS}{client}", fetch_keys=64)
    # Frames of six cameras of a drive, as a detect worker's batch holds them: six slots.
    names = [f"d{client}:{CAMERAS[i % len(CAMERAS)]}:{i}" for i in range(keys)]
    blob = os.urandom(blob_bytes)
    for i in range(0, keys, 256):
        await store.put_many({k: blob for k in names[i : i + 256]}, ttl_s=600)
    await _barrier_sleep()
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        picked = [names[(i + j) % keys] for j in range(batch)]
        got = await store.get_many(picked)
        assert all(g is not None for g in got)
        done += len(got)
        i += batch
    rate = done / (time.perf_counter() - start)
    await store.close()
    return rate


_START_AT = multiprocessing.Value("d", 0.0)


async def _barrier_sleep() -> None:
    """Wait for the common start time, so that the clients measure together."""
    delay = _START_AT.value - time.time()
    if delay > 0:
        await asyncio.sleep(delay)


def _run(args: tuple) -> float:
    kind, url, client, options = args
    if kind == "hop":
        async def main() -> float:
            await _barrier_sleep()
            return await hop_client(url, client, options["entries"], options["hop_batch"], options["replica_acks"])
        return asyncio.run(main())
    return asyncio.run(fetch_client(url, client, options["keys"], options["batch"], options["blob_bytes"], options["seconds"]))


def measure(kind: str, url: str, clients: int, options: dict) -> list[float]:
    """Per-client rates of ``clients`` processes started together."""
    _START_AT.value = time.time() + 3.0 + 0.5 * clients  # imports and setup first
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        return pool.map(_run, [(kind, url, c, options) for c in range(clients)])


def flush(url: str) -> None:
    from redis_servers import sync_client
    import redis

    with sync_client(url) as client:
        if isinstance(client, redis.RedisCluster):
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        else:
            client.flushdb()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,3", help="client counts, comma-separated")
    parser.add_argument("--entries", type=int, default=10_000, help="hop entries per client")
    parser.add_argument("--hop-batch", type=int, default=128)
    parser.add_argument("--keys", type=int, default=512, help="blobs stored per fetch client")
    parser.add_argument("--batch", type=int, default=64, help="blobs per fetch (detect's batch)")
    parser.add_argument("--blob-bytes", type=int, default=48_000, help="a 1280x960 JPEG at quality 75 is about this")
    parser.add_argument("--seconds", type=float, default=4.0, help="fetch time per client")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, interleaved; the median is shown")
    parser.add_argument("--only", choices=("hop", "fetch"), help="run one measure only")
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--replica-acks", type=int, default=0, help="broker.replica_acks of the cluster's hop clients")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    options = vars(args)
    results: dict = {}
    with redis_server(None, None) as single, redis_cluster(args.masters, args.replicas) as cluster:
        targets = {"single": single, "cluster": cluster}
        for _ in range(args.rounds):
            for kind in [args.only] if args.only else ["hop", "fetch"]:
                for clients in counts:
                    for name, url in targets.items():  # interleaved: drift hits both alike
                        flush(url)
                        rates = measure(kind, url, clients, options)
                        results.setdefault(kind, {}).setdefault(str(clients), {}).setdefault(name, []).append(rates)
    summary: dict = {"cpus": os.cpu_count(), "options": {k: v for k, v in options.items()}, "results": {}}
    for kind, by_clients in results.items():
        unit = "entries/s" if kind == "hop" else "blobs/s"
        for clients, by_target in by_clients.items():
            row = {}
            for name, rounds in by_target.items():
                per_client = statistics.median(statistics.mean(r) for r in rounds)
                aggregate = statistics.median(sum(r) for r in rounds)
                row[name] = {"per_client": round(per_client), "aggregate": round(aggregate), "rounds": rounds}
            share = {m: row["cluster"][m] / row["single"][m] for m in ("per_client", "aggregate")}
            row["cluster_share"] = {m: round(v, 3) for m, v in share.items()}
            summary["results"].setdefault(kind, {})[clients] = row
            print(f"{kind:5s} {clients} client(s): single {row['single']['per_client']:>8} {unit} per client, "
                  f"{row['single']['aggregate']:>8} aggregate | cluster {row['cluster']['per_client']:>8} per client, "
                  f"{row['cluster']['aggregate']:>8} aggregate | cluster/single {share['per_client']:.2f} per client, "
                  f"{share['aggregate']:.2f} aggregate")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
