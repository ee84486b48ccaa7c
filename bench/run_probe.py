"""Where a ``roadstream run`` waits: samples its Redis once a second from a thread.

``run_bench --probe`` starts one on the run's broker URL. Each sample reads what the
stages' flow control looks at (``workers/runtime.py``): the server's ``used_memory``
against ``broker.max_used_memory`` (producers wait above it), the blob bytes in flight
against ``broker.max_blob_bytes`` (producers wait above it), and each hop's backlog
(lag plus pending of its consumer group, summed over partitions), and the entries added
to each hop so far, from which the summary's timeline says when the first frame, half of
them, and the last one were published and the last detection made (seconds since the
probe started, which is when the run's Redis server was up). A hop whose backlog
stays near zero starves its consumer: the stage before it is the bound. Producers waiting
on memory or blob bytes while the consumers idle point at the bounds themselves.

Only reads: ``INFO memory``, ``GET``, ``SCAN``, ``XINFO GROUPS`` and ``XINFO STREAM``.
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from stream import names

#: Hops whose backlog is sampled: what ingest, detect and fuse consume.
HOPS = (names.JOBS, names.FRAMES, names.DETECTIONS)


class RunProbe:
    """A sampling thread on one Redis URL; ``summary()`` after ``stop()``.

    Parameters:
        url: the run's broker (``redis://`` or ``unix://``).
        namespace: the streams' prefix.
        max_used_memory: the producers' memory bound in bytes (0: none).
        max_blob_bytes: the producers' blob bound in bytes.
        period_s: seconds between samples.
    """

    def __init__(
        self, url: str, namespace: str, max_used_memory: int, max_blob_bytes: int, period_s: float = 1.0
    ) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.ns, self.period_s = namespace, period_s
        self.max_used_memory, self.max_blob_bytes = max_used_memory, max_blob_bytes
        self.samples: list[dict[str, float]] = []
        self.errors: list[str] = []
        self._streams: dict[str, list[bytes]] = {}
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-probe", daemon=True)
        self._thread.start()

    def _find_streams(self) -> None:
        for hop in HOPS:
            found = set(self.client.scan_iter(match=f"{self.ns}:{hop}*", _type="STREAM", count=1000))
            self._streams[hop] = sorted(found)

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(self.period_s):
            try:
                # Partitions appear as drives start; until the first one, look every sample.
                if n % 10 == 0 or not self._streams.get(names.FRAMES) or not self._streams.get(names.DETECTIONS):
                    self._find_streams()
                n += 1
                sample = {"t": time.monotonic(), "used_memory": float(self.client.info("memory")["used_memory"]),
                          "blob_bytes": float(self.client.get(f"{self.ns}:blob-bytes-in-flight") or 0)}  # fmt: skip
                for hop, streams in self._streams.items():
                    backlog = added = unknown = 0
                    for stream in streams:
                        for group in self.client.xinfo_groups(stream):
                            # Redis gives no lag after deletions inside the group's range:
                            # counted apart, not taken for an empty hop.
                            unknown += group.get("lag") is None
                            backlog += int(group.get("lag") or 0) + int(group.get("pending") or 0)
                        added += int(self.client.xinfo_stream(stream).get("entries-added") or 0)
                    sample[f"backlog_{hop}"] = float(backlog)
                    sample[f"added_{hop}"] = float(added)
                    sample[f"lag_unknown_{hop}"] = float(unknown > 0)
                self.samples.append(sample)
            except Exception as exc:  # noqa: BLE001 - the run goes on; a gap in samples is reported
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def timeline(self) -> dict[str, float | None]:
        """Seconds since the probe started at which the frames hop got its first entry,
        half of its entries and the last, and the detections hop its first (detect is
        up: its models loaded) and its last (within a sample period; markers count as
        entries)."""

        def first_at(key: str, share: float) -> float | None:
            final = max((s.get(key, 0.0) for s in self.samples), default=0.0)
            if not final:
                return None
            goal = max(1.0, final * share)
            return next(round(s["t"] - self.started, 1) for s in self.samples if s.get(key, 0.0) >= goal)

        frames, detections = f"added_{names.FRAMES}", f"added_{names.DETECTIONS}"
        return {"first_frame": first_at(frames, 0.0), "half_frames": first_at(frames, 0.5),
                "last_frame": first_at(frames, 1.0), "first_detection": first_at(detections, 0.0),
                "last_detection": first_at(detections, 1.0)}  # fmt: skip

    def stop(self) -> None:
        """Stop sampling (the thread ends within one period)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict[str, Any]:
        """Shares of samples over each bound, and each hop's backlog (mean, median, max)."""
        good = self.samples
        out: dict[str, Any] = {"samples": len(good), "errors": len(self.errors)}
        if self.errors:
            out["first_error"] = self.errors[0]
        if not good:
            return out
        if self.max_used_memory:
            out["over_memory_bound"] = round(sum(s["used_memory"] > self.max_used_memory for s in good) / len(good), 3)
        out["over_blob_bound"] = round(sum(s["blob_bytes"] > self.max_blob_bytes for s in good) / len(good), 3)
        out["used_memory_mb_max"] = round(max(s["used_memory"] for s in good) / 2**20, 1)
        out["blob_mb_mean"] = round(statistics.fmean(s["blob_bytes"] for s in good) / 2**20, 1)
        out["timeline_s"] = self.timeline()
        # Frames and detections published so far, every few samples: each stage's rate over time.
        frames, detections = f"added_{names.FRAMES}", f"added_{names.DETECTIONS}"
        out["added_over_time"] = [[round(s["t"] - self.started, 1), int(s.get(frames, 0)), int(s.get(detections, 0))]
                                  for s in good[::3]]  # fmt: skip
        for hop in HOPS:
            values = [s.get(f"backlog_{hop}", 0.0) for s in good]
            unknown = sum(s.get(f"lag_unknown_{hop}", 0.0) for s in good) / len(good)
            # A sample whose lag Redis could not give is not an empty hop (``lag_unknown_share``).
            empty = sum(s.get(f"backlog_{hop}", 0.0) == 0 and not s.get(f"lag_unknown_{hop}") for s in good)
            out[f"backlog_{hop}"] = {"mean": round(statistics.fmean(values), 1), "median": statistics.median(values),
                                     "max": max(values), "zero_share": round(empty / len(values), 3),
                                     "lag_unknown_share": round(unknown, 3)}  # fmt: skip
        return out
