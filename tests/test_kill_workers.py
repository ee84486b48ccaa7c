"""Failure test with real processes: workers SIGKILLed mid-batch, again and again."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import redis

from fixtures.relay import frame
from stream import codec, names
from stream.schemas import FrameRef

pytestmark = [pytest.mark.redis, pytest.mark.slow]

NAMESPACE = "killtest"


def spawn(url: str, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "ROADSTREAM_NAMESPACE": NAMESPACE,
        "ROADSTREAM_BROKER__CLAIM_IDLE_MS": "400",
        "ROADSTREAM_BROKER__LEASE_TTL_MS": "600",
        "ROADSTREAM_WORKER__RECLAIM_INTERVAL_S": "0.2",
        "ROADSTREAM_WORKER__HEARTBEAT_S": "0.2",
        "ROADSTREAM_WORKER__BATCH_SIZE": "16",
    }
    return subprocess.Popen([sys.executable, "-m", "fixtures.relay_worker", url, *extra], env=env)


def output_seqs(client: redis.Redis, hop: str) -> list[tuple[str, int, int]]:
    entries = client.xrange(names.stream_name(hop, ns=NAMESPACE))
    decoded = [codec.decode(fields[b"d"], FrameRef) for _, fields in entries]
    return [(m.camera, m.seq, m.tick) for m in decoded]


def run_with_kills(url: str, extra: tuple[str, ...], expected: int, hop: str = "bench-out") -> list:
    """Run a steady worker and a victim that is SIGKILLed and restarted until done."""
    client = redis.Redis.from_url(url)
    rng = random.Random(7)
    steady = spawn(url, *extra)
    victim = spawn(url, *extra)
    kills = 0
    deadline = time.monotonic() + 90
    try:
        while len(client.xrange(names.stream_name(hop, ns=NAMESPACE))) < expected:
            assert time.monotonic() < deadline, "inputs were lost: outputs stopped short"
            time.sleep(rng.uniform(0.9, 1.5))  # past the ~0.7 s start, into its batches
            if kills < 8:
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                kills += 1
                victim = spawn(url, *extra)
        time.sleep(1.0)  # late duplicates, if any, would land now
        return output_seqs(client, hop)
    finally:
        for proc in (steady, victim):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert kills >= 2, "the run ended before the victim was killed twice: make it longer"


def test_sigkilled_stateless_workers_lose_and_double_nothing(redis_url: str) -> None:
    # Given 1500 frames and two relay workers, one of which is killed over and over
    client = redis.Redis.from_url(redis_url)
    stream = names.stream_name("bench-in", ns=NAMESPACE)
    for i in range(1500):
        client.xadd(stream, {"d": codec.encode(frame("d1", i))})

    # When the run completes
    seqs = run_with_kills(redis_url, ("--delay", "0.05"), 1500)

    # Then every input has exactly one output
    assert len(seqs) == 1500
    assert sorted(s for _, s, _ in seqs) == list(range(1500))


def test_sigkilled_stateful_workers_lose_and_double_nothing(redis_url: str) -> None:
    # Given 4 cameras × 200 frames on the partitioned hop and a grouping stage (groups of 5)
    client = redis.Redis.from_url(redis_url)
    cameras = ("front", "back", "left_repeater", "right_repeater")
    for i in range(200):
        for cam in cameras:
            p = names.frame_partition("d1", cam, 16)
            client.xadd(names.stream_name(names.FRAMES, p, NAMESPACE), {"d": codec.encode(frame("d1", i, cam))})

    # When the run completes with one of two workers killed repeatedly
    got = run_with_kills(redis_url, ("--grouping", "--delay", "0.1"), 4 * 40)

    # Then each group was emitted once, with exactly its five members
    assert len(got) == 160
    want = {(cam, g, sum(range(5 * g, 5 * g + 5))) for cam in cameras for g in range(40)}
    assert set(got) == want
