"""The run probe (``bench/run_probe.py``) reads the flow-control state right: the share of
samples over each bound and each hop's backlog, from a real Redis."""

from __future__ import annotations

import time

import redis

from bench.run_probe import RunProbe


def test_probe_reports_bounds_and_backlogs_of_a_real_server(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    # Given two partitions of the frames hop with 3 and 2 entries undelivered to detect, one
    # entry of the detections hop delivered and not acked, and 10 MiB of blobs in flight
    for stream, n in (("pr:frames:{0}", 3), ("pr:frames:{1}", 2), ("pr:detections:{0}", 1)):
        for i in range(n):
            client.xadd(stream, {"i": i})
        client.xgroup_create(stream, "g", id="0")
    client.xreadgroup("g", "c", {"pr:detections:{0}": ">"}, count=1)
    client.set("pr:blob-bytes-in-flight", 10 * 2**20)
    # When the probe samples with a blob bound below that and a memory bound above the server's use
    probe = RunProbe(redis_url, "pr", max_used_memory=2**40, max_blob_bytes=2**20, period_s=0.05)
    deadline = time.monotonic() + 10
    while len(probe.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    probe.stop()
    got = probe.summary()
    # Then every sample saw the backlogs and the blob bound passed, none the memory bound
    assert got["samples"] >= 3 and got["errors"] == 0
    assert got["backlog_frames"]["median"] == 5 and got["backlog_frames"]["zero_share"] == 0
    assert got["backlog_detections"]["max"] == 1  # pending counts as backlog
    assert got["backlog_jobs"]["max"] == 0
    assert got["over_blob_bound"] == 1.0 and got["over_memory_bound"] == 0.0
    assert got["blob_mb_mean"] == 10.0
    assert got["backlog_frames"]["lag_unknown_share"] == 0.0


def test_probe_counts_a_lag_redis_cannot_give_as_unknown(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    # Given a frames partition with a group that read nothing, and an entry deleted inside
    # its range (Redis then reports no lag for the group)
    ids = [client.xadd("lu:frames:{0}", {"i": i}) for i in range(3)]
    client.xgroup_create("lu:frames:{0}", "g", id="0")
    client.xdel("lu:frames:{0}", ids[1])
    assert client.xinfo_groups("lu:frames:{0}")[0]["lag"] is None
    # When sampled / Then every sample says the lag was unknown
    probe = RunProbe(redis_url, "lu", 0, 2**30, period_s=0.05)
    deadline = time.monotonic() + 10
    while len(probe.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    probe.stop()
    assert probe.summary()["backlog_frames"]["lag_unknown_share"] == 1.0


def test_probe_reports_errors_instead_of_stopping(redis_url: str) -> None:
    probe = RunProbe("redis://127.0.0.1:1/0", "pr", 0, 2**20, period_s=0.05)  # nothing listens on port 1
    deadline = time.monotonic() + 10
    while not probe.errors and time.monotonic() < deadline:
        time.sleep(0.05)
    probe.stop()
    got = probe.summary()
    assert got["samples"] == 0 and got["errors"] >= 1 and "ConnectionError" in got["first_error"]


def test_probe_timeline_says_when_frames_began_reached_half_and_ended(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.xadd("tl:frames:{0}", {"i": 0})
    client.xgroup_create("tl:frames:{0}", "g", id="0")
    client.xadd("tl:detections:{0}", {"i": 0})
    client.xgroup_create("tl:detections:{0}", "g", id="0")
    probe = RunProbe(redis_url, "tl", 0, 2**30, period_s=0.05)

    def wait_samples(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(probe.samples) < n and time.monotonic() < deadline:
            time.sleep(0.02)

    # Given a frames hop with 1 entry, then 3 more about 0.5 s later, then 6 more and a
    # detection about 0.5 s after that
    wait_samples(10)
    for _ in range(3):
        client.xadd("tl:frames:{0}", {"i": 1})
    wait_samples(20)
    for _ in range(6):
        client.xadd("tl:frames:{0}", {"i": 2})
    client.xadd("tl:detections:{0}", {"i": 1})
    wait_samples(30)
    probe.stop()
    # When summarised / Then half the frames (5 of 10) came at the third step, after the
    # first and with the last, and the last detection with them
    line = probe.summary()["timeline_s"]
    assert line["first_frame"] < line["half_frames"] == line["last_frame"]
    assert line["last_detection"] == line["last_frame"]


def test_probe_does_not_take_a_hop_of_unknown_lag_for_an_empty_one(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    # Given a frames partition whose group read nothing, with an entry deleted inside its
    # range: two entries wait, but Redis reports no lag (and nothing is pending)
    ids = [client.xadd("uz:frames:{0}", {"i": i}) for i in range(3)]
    client.xgroup_create("uz:frames:{0}", "g", id="0")
    client.xdel("uz:frames:{0}", ids[1])
    probe = RunProbe(redis_url, "uz", 0, 2**30, period_s=0.05)
    deadline = time.monotonic() + 10
    while len(probe.samples) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    probe.stop()
    # When summarised / Then no sample counts the hop as empty: its lag is unknown
    got = probe.summary()["backlog_frames"]
    assert got["lag_unknown_share"] == 1.0
    assert got["zero_share"] == 0.0
