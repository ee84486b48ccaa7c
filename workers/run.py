"""``roadstream run FOOTAGE``: every stage in one process, footage in, output folder out.

1. Discover the drives (a folder without footage is refused before anything starts).
   The detect stage runs the shipped models (``stages/models/``: the cone detector and the
   roadwork frame scorer) unless the settings name others (``shipped_models``).
2. Pick the broker: the given URL; else a private ``redis-server`` on a Unix socket in a
   temporary folder when one is on the PATH (stopped at the end); else the in-process
   ``MemoryBroker``.
3. Plan the workers from the cores and GPUs (``workers.plan``; ``--workers`` overrides)
   and start them: as ``roadstream worker STAGE`` processes (``workers.children``), or, for
   a single plan or the embedded broker, one worker of each stage as asyncio tasks here
   (vera and vlm only when a VLM backend is configured). Submit the drives' ingest jobs
   (one per camera with several ingest processes, longest drives first) and wait until
   every drive is done: its ``DriveSummary`` arrived, or ingest's drive-ended marker says
   it has no frames at all, or a job of it was dead-lettered.
4. Collect verdicts and summaries, fetch the key frames of roadwork windows, and write
   ``verdicts.jsonl``, ``drives.jsonl`` (drive summaries), ``drives.geojson`` and ``report.html``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from brokers.base import Broker
from brokers.blobs import BlobStore
from brokers.connect import connect, forget_memory
from stages import shipped
from stages.discover import Discovery, FoundDrive, discover
from stages.jobs import SPAN_S, part_name, split_job
from stages.report import thumbnail_keys, write_report
from stream import codec, ids, names
from stream.errors import ConfigError, DecodeError, RoadstreamError
from stream.schemas import DeadLetter, DriveMarker, DriveSummary, Job, Verdict
from stream.settings import BrokerSettings, Settings
from workers.children import ChildFailed, Children
from workers.plan import Plan, machine_plan, parse_workers
from workers.runtime import Worker
from workers.supervisor import build_workers

#: The shipped weights, found in the installed package (never the current folder).
MODELS_DIR = shipped.MODELS_DIR
SHIPPED_DETECTOR = shipped.DETECTOR
SHIPPED_SCORER = shipped.SCORER

#: Seconds to wait for a private redis-server to accept connections.
REDIS_START_S = 10.0
#: Fuse's watermark timeout in a run (``one_shot``).
RUN_WATERMARK_TIMEOUT_S = 900.0
#: Seconds an interrupted run gives its workers to stop before cancelling or killing them.
INTERRUPT_GRACE_S = 2.0
#: Memory of the private redis-server beyond the frame blobs: streams, dedupe keys.
REDIS_BASE_BYTES = 512 * 1024 * 1024
POLL_S = 0.1


class RunError(RoadstreamError):
    """The run could not start or could not finish (the message says why)."""


class RunInterrupted(RunError):  # noqa: N818 - reads as the condition it reports
    """The run was interrupted (Ctrl-C, SIGTERM); it carries what had finished.

    Attributes:
        drives: every drive's state when the run stopped.
        verdicts: the verdicts received by then.
    """

    def __init__(self, drives: dict[str, DriveState], verdicts: list[Verdict]) -> None:
        done = sum(s.done for s in drives.values())
        super().__init__(f"interrupted: {done} of {len(drives)} drive(s) finished, {len(verdicts)} verdict(s)")
        self.drives = drives
        self.verdicts = verdicts


class NoFootage(RunError):  # noqa: N818 - reads as the condition it reports
    """The footage folder holds no drive."""


@dataclass
class DriveState:
    """What the run knows about one drive."""

    drive: FoundDrive
    summary: DriveSummary | None = None
    failure: str | None = None
    #: Drive-clock seconds covered by the windows decided so far (the latest window's end).
    closed_s: float = 0.0

    @property
    def done(self) -> bool:
        """Summarised, or known never to be."""
        return self.summary is not None or self.failure is not None


@dataclass
class RunResult:
    """The outcome of a run."""

    found: Discovery
    broker: str
    stages: list[str]
    drives: dict[str, DriveState]
    verdicts: list[Verdict] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0
    plan: Plan | None = None
    save_frames: bool = False
    save_video: bool = False
    #: Roadwork spans ``save_video`` could not cut, and why.
    video_notes: list[str] = field(default_factory=list)


def shipped_models(settings: Settings) -> Settings:
    """The settings with ``shipped`` models replaced by the shipped files' paths.

    ``detect.model`` and ``detect.scorer`` default to the shipped models for every way of
    running the detect stage; a model named anywhere (config file, environment, ``--set``;
    ``detect.scorer=""`` turns the scorer off) wins.
    """
    detect = shipped.resolve(settings.detect)
    if detect is settings.detect:
        return settings
    return settings.model_copy(update={"detect": detect})


def footage_roots(settings: Settings, footage: str | Path) -> Settings:
    """The settings with ``ingest.roots`` set to the run's footage folder, unless set: a
    worker without roots takes only footage under the current folder."""
    if settings.ingest.roots:
        return settings
    ingest = settings.ingest.model_copy(update={"roots": [str(Path(footage).resolve())]})
    return settings.model_copy(update={"ingest": ingest})


def one_shot(settings: Settings) -> Settings:
    """The settings with fuse's watermark timeout raised to ``RUN_WATERMARK_TIMEOUT_S``,
    unless the settings name one.

    In a run every camera partition ends with ingest's marker (a broken clip, a
    dead-lettered job or part too) and a dead worker's entries are taken over, so windows
    close on the drive's progress; the timeout is only fuse's stall guard, which gives up
    a drive's cameras when no entry of the drive arrived for it (and for
    ``fuse.stall_lag_factor`` times the observed lag). With per-camera jobs and several
    processes, cameras of a drive progress unevenly (a camera's job may wait for a free
    ingest process, and detect drains its partitions in turn): before windows closed on
    progress, the 30 s default closed windows before a late camera's frames came (seen
    on the sample drive, 2 cores, ingest=2). Since they do, the raise no longer decides
    verdicts; it is kept so that a camera job queued behind other drives' jobs is not
    taken for a stalled camera, at no cost while nothing truly stalls.
    """
    if "watermark_timeout_s" in settings.fuse.model_fields_set:
        return settings
    timeout = max(settings.fuse.watermark_timeout_s, RUN_WATERMARK_TIMEOUT_S)
    fuse = settings.fuse.model_copy(update={"watermark_timeout_s": timeout})
    return settings.model_copy(update={"fuse": fuse})


def stages_for(settings: Settings) -> list[str]:
    """The stages this run needs: vera and vlm only with a VLM backend configured."""
    stages = [names.INGEST, names.DETECT]
    if settings.vlm.backend:
        stages += [names.VERA, names.VLM]
    return [*stages, names.FUSE]


@dataclass(frozen=True)
class PrivateBroker:
    """The bounds ``private_redis`` started its server with, as started (not recomputed).

    Attributes:
        url: the server's ``unix://`` URL.
        maxmemory: the server's ``maxmemory``, bytes (``noeviction``: writes past it fail).
        max_blob_bytes: the producers' frame-blob bound it was sized for, bytes.
        max_used_memory: the producers' ``used_memory`` bound, bytes (0: none given).
        persistence: whether it writes anything to disk (never: no RDB, no AOF).
    """

    url: str
    maxmemory: int
    max_blob_bytes: int
    max_used_memory: int
    persistence: bool = False


#: The servers ``private_redis`` is running now, by URL.
_PRIVATE: dict[str, PrivateBroker] = {}


def private_broker(url: str) -> PrivateBroker | None:
    """The bounds of the server ``private_redis`` runs at ``url``; ``None`` for any other
    URL (a user's own Redis, on a Unix socket or not, is never taken for a private one)."""
    return _PRIVATE.get(url)


@contextlib.contextmanager
def private_redis(broker: BrokerSettings | None = None) -> Iterator[str | None]:
    """A throwaway ``redis-server`` on a Unix socket; yields its URL, or ``None`` without one.

    While it runs, ``private_broker(url)`` gives the bounds it was started with.

    Parameters:
        broker: transport bounds; the server's memory bound follows ``max_blob_bytes``
            (``private_maxmemory``), ``max_used_memory`` is recorded as given.

    Raises:
        RunError: the server did not accept connections within ``REDIS_START_S``.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    broker = broker or BrokerSettings()
    with tempfile.TemporaryDirectory(prefix="roadstream-") as folder:
        socket = Path(folder) / "redis.sock"
        args = [binary, *private_redis_args(socket, Path(folder), broker)]
        # Its own session: a Ctrl-C at the terminal must not kill it under a run that is
        # still talking to it (the run stops it below).
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f"unix://{socket}?db=0"
        try:
            deadline = time.monotonic() + REDIS_START_S
            while not socket.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    message = f"private redis-server did not start (see {folder}/redis.log)"
                    raise RunError(message)
                time.sleep(0.02)
            # Recorded from the same settings the arguments were made from, so what the
            # CLI and the benches report is what the server runs with.
            _PRIVATE[url] = PrivateBroker(url, private_maxmemory(broker), broker.max_blob_bytes,
                                          broker.max_used_memory)
            yield url
        finally:
            _PRIVATE.pop(url, None)
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


#: Share of the machine's available memory ``run``'s private server may grow to (the
#: JVM's default heap bound is a quarter of physical memory, for the same reason: a bound
#: a process on a shared machine rarely needs to be told).
RUN_MEMORY_SHARE = 0.25
#: The largest ``max_blob_bytes`` ``sized_for_machine`` picks.
RUN_MAX_BLOB_BYTES = 16 * 1024**3


#: A cgroup v1 ``memory.limit_in_bytes`` at or above this means no limit (v1 writes
#: ``PAGE_COUNTER_MAX`` pages, 2**63 rounded down to a page, when none is set).
CGROUP_V1_UNLIMITED = 2**62


def available_memory_bytes(
    proc: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup"
) -> int | None:
    """Bytes of memory available to this process: the smaller of Linux's ``MemAvailable``
    and the room left in its memory cgroup (``cgroup_memory_room``).

    Parameters:
        proc: the proc file system (``meminfo``, ``self/cgroup``); tests point it at a tree.
        cgroup_root: where the cgroup file systems are mounted.

    Returns:
        Bytes, or ``None`` where neither can be read (not Linux). Never raises.
    """
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (Path(proc) / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)  # the file says kB (KiB)
    room = cgroup_memory_room(proc, cgroup_root)
    if room is not None:
        found.append(room)
    return min(found) if found else None


def cgroup_memory_room(
    proc: str | Path = "/proc", cgroup_root: str | Path = "/sys/fs/cgroup"
) -> int | None:
    """Bytes this process's memory cgroup may still grow by: the smallest limit less usage
    over its cgroup and every ancestor (a parent's limit bounds its children too).

    cgroup v1 (a ``memory`` controller line in ``self/cgroup``, mounted at
    ``cgroup_root/memory``): ``memory.limit_in_bytes`` less ``memory.usage_in_bytes``, a
    limit of ``CGROUP_V1_UNLIMITED`` or more meaning none. cgroup v2 (the ``0::PATH`` line,
    ``cgroup_root/cgroup.controllers`` present): ``memory.max`` less ``memory.current``,
    ``max`` meaning none. Levels of the path missing under the mount (a container that
    sees the host's path but has its own cgroup mounted at the root) are skipped.

    Returns:
        Bytes (0 when over the limit), or ``None`` when no level sets a limit or nothing
        can be read. Never raises.
    """
    v1, v2 = _cgroup_paths(Path(proc))
    root = Path(cgroup_root)
    if v1 is not None and (root / "memory").is_dir():
        base, path, files = root / "memory", v1, ("memory.limit_in_bytes", "memory.usage_in_bytes")
    elif v2 is not None and (root / "cgroup.controllers").is_file():
        base, path, files = root, v2, ("memory.max", "memory.current")
    else:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".", "..")]
    rooms = []
    for depth in range(len(parts), -1, -1):  # the process's own cgroup, then each parent
        level = base.joinpath(*parts[:depth])
        with contextlib.suppress(OSError, ValueError):
            limit = (level / files[0]).read_text().strip()
            if limit == "max" or int(limit) >= CGROUP_V1_UNLIMITED:
                continue
            used = int((level / files[1]).read_text().strip())
            rooms.append(max(0, int(limit) - used))
    return min(rooms) if rooms else None


def _cgroup_paths(proc: Path) -> tuple[str | None, str | None]:
    """(the v1 memory controller's cgroup path, the v2 path) from ``proc/self/cgroup``."""
    v1 = v2 = None
    with contextlib.suppress(OSError):
        for line in (proc / "self" / "cgroup").read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":
                v2 = path
            elif "memory" in controllers.split(","):
                v1 = path
    return v1, v2


def sized_for_machine(settings: Settings, available: int | None = None) -> Settings:
    """The settings with ``broker.max_blob_bytes`` sized for ``run``'s private server.

    The server holds more than the blobs in flight: a frame's blob stays
    ``broker.spent_blob_ttl_s`` (120 s) after its window closed, so its memory grows with
    the frame rate. With the 512 MiB default a 16-core GPU box spent 59 % of a run over
    the memory bound, its producers waiting (5.2× real time; 13.6× with 4 GiB:
    ``bench/run_bench.py --probe``, README). So the private server may grow to
    ``RUN_MEMORY_SHARE`` of the available memory: ``max_blob_bytes`` becomes half of it
    less ``REDIS_BASE_BYTES`` (``private_maxmemory`` doubles it back), never below the
    default nor above ``RUN_MAX_BLOB_BYTES``. A ``max_blob_bytes`` or ``max_used_memory``
    the settings name is kept.

    Parameters:
        available: bytes of memory available (``available_memory_bytes()`` when ``None``).
    """
    broker = settings.broker
    if {"max_blob_bytes", "max_used_memory"} & broker.model_fields_set:
        return settings
    available = available_memory_bytes() if available is None else available
    if not available:
        return settings
    budget = int(available * RUN_MEMORY_SHARE)
    blob = min(max((budget - REDIS_BASE_BYTES) // 2, broker.max_blob_bytes), RUN_MAX_BLOB_BYTES)
    return settings.model_copy(update={"broker": broker.model_copy(update={"max_blob_bytes": blob})})


def private_maxmemory(broker: BrokerSettings) -> int:
    """The private server's ``maxmemory`` (see ``private_redis_args``)."""
    return 2 * broker.max_blob_bytes + REDIS_BASE_BYTES


def memory_bound(settings: Settings) -> Settings:
    """The settings with producers held back at the private server's ``maxmemory`` less
    half the room kept for streams, unless ``broker.max_used_memory`` is set: writes then
    slow down before the server refuses them."""
    if settings.broker.max_used_memory:
        return settings
    bound = private_maxmemory(settings.broker) - REDIS_BASE_BYTES // 2
    broker = settings.broker.model_copy(update={"max_used_memory": bound})
    return settings.model_copy(update={"broker": broker})


def private_redis_args(socket: Path, folder: Path, broker: BrokerSettings) -> list[str]:
    """Arguments of ``run``'s private ``redis-server``: a one-shot server.

    No persistence (no RDB snapshot, no AOF: a run that dies is run again), a Unix socket
    only, and a memory bound: twice the blob bytes producers may keep in flight (they
    overshoot it by the chunks being written when they look) plus ``REDIS_BASE_BYTES`` for
    streams and dedupe keys. ``noeviction``: past the bound writes fail loudly rather than
    silently dropping frames or dedupe keys.
    """
    maxmemory = private_maxmemory(broker)
    return ["--port", "0", "--unixsocket", str(socket), "--unixsocketperm", "700",
            "--save", "", "--appendonly", "no", "--maxmemory", str(maxmemory), "--maxmemory-policy", "noeviction",
            "--dir", str(folder), "--logfile", str(folder / "redis.log")]  # fmt: skip


async def submit(broker: Broker, drives: list[FoundDrive], settings: Settings | None = None,
                 split: str | None = None) -> None:  # fmt: skip
    """Queue the drives' ingest jobs: one per drive, per camera, or per camera and span
    (``ingest.split``, ``ingest.span_s``).

    Deduplicated as ``roadstream submit`` does: by drive id, and camera and span for a part.

    Parameters:
        split: overrides ``settings.ingest.split`` (``drive`` without settings).
    """
    split = split or (settings.ingest.split if settings is not None else "drive")
    span_s = settings.ingest.span_s if settings is not None else SPAN_S
    stream = names.stream_name(names.JOBS, ns=broker.namespace)
    await broker.ensure_group(stream, names.INGEST)
    # Longest drives first: their camera jobs start together (in step) and the short
    # drives fill the processes that free up (longest-job-first scheduling).
    for drive in sorted(drives, key=lambda d: -len(d.minutes)):
        for job in split_job(drive.to_job(submitted_utc=time.time()), split, span_s):
            await broker.publish(stream, codec.encode(job), dedupe_key=submit_key(job))


def submit_key(job: Job) -> str:
    """Dedupe key of a submitted job: the drive, and the cameras (and span) of a part."""
    part = part_name(job)
    return ids.output_key("submit", job.drive_id, part) if part else ids.output_key("submit", job.drive_id)


class _Watcher:
    """Follows the verdicts, drives and dead-letter streams to know when drives are done."""

    def __init__(self, broker: Broker, drives: dict[str, DriveState]) -> None:
        self.broker = broker
        self.drives = drives
        self.verdicts: dict[tuple[str, int], Verdict] = {}
        self._last: dict[str, str] = {}

    async def poll(self) -> None:
        """Read what arrived since the last poll."""
        ns = self.broker.namespace
        for data in await self._new(names.stream_name(names.VERDICTS, ns=ns)):
            self._on_verdict(data)
        for data in await self._new(names.stream_name(names.DRIVES, ns=ns)):
            self._on_drive(data)
        for data in await self._new(self.broker.dead_letter_stream):
            self._on_dead_letter(data)

    async def _new(self, stream: str) -> list[bytes]:
        last = self._last.get(stream)
        entries = await self.broker.range(stream, start=f"({last}" if last else "-", count=10_000)
        if entries:
            self._last[stream] = entries[-1].id
        return [e.data for e in entries]

    def _on_verdict(self, data: bytes) -> None:
        with contextlib.suppress(DecodeError):
            message = codec.decode(data, (Verdict, DriveSummary))
            if isinstance(message, Verdict):
                self.verdicts.setdefault((message.drive_id, message.window), message)
                state = self.drives.get(message.drive_id)
                if state is not None:
                    state.closed_s = max(state.closed_s, message.t_end)
            elif message.drive_id in self.drives:
                self.drives[message.drive_id].summary = message

    def _on_drive(self, data: bytes) -> None:
        with contextlib.suppress(DecodeError):
            marker = codec.decode(data, DriveMarker)
            state = self.drives.get(marker.drive_id)
            # A drive without a single frame never reaches fuse: ingest's marker ends it.
            if state and marker.event == "ended" and not sum(marker.frame_counts.values()):
                problems = "; ".join(marker.problems) or "no camera had a decodable frame"
                state.failure = state.failure or f"no frames: {problems}"

    def _on_dead_letter(self, data: bytes) -> None:
        with contextlib.suppress(DecodeError):
            letter = codec.decode(data, DeadLetter)
            if letter.group != names.INGEST:
                return
            job = codec.decode(letter.raw, Job)
            state = self.drives.get(job.drive_id)
            if state:
                state.failure = state.failure or f"ingest failed: {letter.error}"


async def _wait(watcher: _Watcher, check: Callable[[], None], workers: list[Worker],
                progress: Callable[[list[Worker], dict[str, DriveState]], None] | None, timeout_s: float | None) -> None:  # fmt: skip
    started = time.monotonic()
    while True:
        await watcher.poll()
        if progress is not None:
            progress(workers, watcher.drives)
        if all(s.done for s in watcher.drives.values()):
            return
        check()
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            waiting = ", ".join(d for d, s in watcher.drives.items() if not s.done)
            message = f"gave up after {timeout_s:.0f} s waiting for drive(s) {waiting}"
            raise RunError(message)
        await asyncio.sleep(POLL_S)


def _tasks_alive(workers: list[Worker], tasks: list[asyncio.Task]) -> Callable[[], None]:
    def check() -> None:
        for worker, task in zip(workers, tasks, strict=True):
            if task.done():
                error = task.exception() if not task.cancelled() else None
                message = f"the {worker.group} worker stopped: {error or 'cancelled'}"
                raise RunError(message)

    return check


def _start_order(stages: list[str]) -> list[str]:
    # Stages that load models first (their loading blocks the loop), ingest last.
    return [s for s in stages if s not in (names.FUSE, names.INGEST)] + [names.FUSE, names.INGEST]


async def _start(workers: list[Worker], tasks: list[asyncio.Task]) -> None:
    # One at a time: a stage that loads a model blocks the loop for seconds, and a
    # neighbour's read in flight meanwhile would time out.
    for worker in workers:
        task = asyncio.create_task(worker.run(), name=f"run-{worker.group}")
        tasks.append(task)
        while not worker.started and not task.done():
            await asyncio.sleep(0.02)
        if task.done():
            error = task.exception() if not task.cancelled() else None
            message = f"the {worker.group} worker did not start: {error or 'cancelled'}"
            raise RunError(message)


async def _stop(workers: list[Worker], tasks: list[asyncio.Task], grace_s: float | None = None) -> None:
    for worker in workers:
        worker.stop()
    if grace_s is not None and tasks:
        _, pending = await asyncio.wait(tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_drives(
    found: Discovery,
    settings: Settings,
    url: str,
    out_dir: str | Path,
    *,
    plan: Plan | None = None,
    progress: Callable[[list[Worker], dict[str, DriveState]], None] | None = None,
    timeout_s: float | None = None,
    save_frames: bool = False,
    save_video: bool = False,
) -> RunResult:
    """Run every stage over the discovered drives on the broker at ``url``; write the output.

    Parameters:
        found: the drives (``stages.discover.discover``), at least one.
        settings: all settings.
        url: the broker URL.
        out_dir: where the output files go.
        plan: worker processes per stage (``workers.plan``); ``None`` or a single plan
            runs one worker of each stage as tasks in this process. A memory broker
            cannot be shared with other processes: its runs are always single.
        progress: called every poll with the in-process workers (none with processes)
            and the drives' states.
        timeout_s: give up after this long (``None``: wait as long as it takes).
        save_frames: also write the key frames with their boxes (``frames/``).
        save_video: also write an annotated video of each roadwork span (``videos/``).

    Returns:
        The result, with the written paths.

    Raises:
        RunError: a worker stopped with an error, or the timeout passed.
    """
    started = time.monotonic()
    stages = stages_for(settings)
    broker, blobs = connect(url, namespace=settings.namespace, settings=settings.broker)
    drives = {d.drive_id: DriveState(d) for d in found.drives}
    watcher = _Watcher(broker, drives)
    try:
        if plan is None or plan.single or url.startswith("memory"):
            counts = await _in_process(stages, settings, broker, blobs, found, watcher, progress, timeout_s)
        else:
            counts = await _in_children(plan, settings, url, broker, found, watcher, progress, timeout_s)
        result = RunResult(found, url, stages, drives, sorted(watcher.verdicts.values(), key=_order))
        result.counts = counts
        result.plan = plan
        result.save_frames, result.save_video = save_frames, save_video
        result.paths = await _write(out_dir, result, blobs, settings)
        if save_video:
            await asyncio.to_thread(_write_videos, Path(out_dir), result)
        result.seconds = time.monotonic() - started
        return result
    except asyncio.CancelledError as exc:  # asyncio.run's answer to SIGINT
        verdicts = sorted(watcher.verdicts.values(), key=_order)
        raise RunInterrupted(drives, verdicts) from exc
    finally:
        await blobs.close()
        await broker.close()


async def _in_process(stages, settings, broker, blobs, found, watcher, progress,
                      timeout_s) -> dict[str, dict[str, int]]:  # fmt: skip
    workers = build_workers(dict.fromkeys(_start_order(stages), 1), settings, broker, blobs)
    tasks: list[asyncio.Task] = []
    try:
        await _start(workers, tasks)
        # One ingest worker gains nothing from per-camera jobs, and would run a drive's
        # cameras one after another (a long drive's windows would wait for the last one).
        await submit(broker, found.drives, settings, split="drive")
        await _wait(watcher, _tasks_alive(workers, tasks), workers, progress, timeout_s)
    except asyncio.CancelledError:
        await _stop(workers, tasks, INTERRUPT_GRACE_S)
        raise
    finally:
        await _stop(workers, tasks)
    return {w.group: dict(w.counts) for w in workers}


async def _in_children(plan, settings, url, broker, found, watcher, progress,
                       timeout_s) -> dict[str, dict[str, int]]:  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="roadstream-run-") as folder:
        children = Children(plan, settings, url, Path(folder))
        try:
            children.start()
            # Several ingest processes share a drive through per-camera (and, for a long
            # drive, per-span) jobs; one_shot has raised fuse's watermark timeout for the
            # unevenness that brings.
            single_ingest = plan.workers.get(names.INGEST, 1) < 2 and not plan.nvdec_ingest
            split = "drive" if single_ingest else "span"
            if "split" in settings.ingest.model_fields_set:  # the user's choice stands
                split = settings.ingest.split
            await submit(broker, found.drives, settings, split=split)
            try:
                await _wait(watcher, children.check, [], progress, timeout_s)
            except ChildFailed as exc:
                raise RunError(str(exc)) from exc
        except asyncio.CancelledError:
            await asyncio.to_thread(children.stop, INTERRUPT_GRACE_S)
            raise
        finally:
            await asyncio.to_thread(children.stop)
    return {}


def _write_videos(out_dir: Path, result: RunResult) -> None:
    from stages.span_video import write_span_videos

    summaries = [s.summary for s in result.drives.values() if s.summary is not None]
    drives = {d: state.drive for d, state in result.drives.items()}
    videos = write_span_videos(out_dir / "videos", drives, result.verdicts, summaries)
    if videos.paths:
        result.paths["videos"] = out_dir / "videos"
    result.video_notes = videos.notes


def _order(v: Verdict) -> tuple[str, int]:
    return v.drive_id, v.window


async def _write(out_dir: str | Path, result: RunResult, blobs: BlobStore, settings: Settings) -> dict[str, Path]:
    keys = thumbnail_keys(result.verdicts)
    images = {k: b for k, b in zip(keys, await blobs.get_many(keys), strict=True) if b}
    summaries = [s.summary for s in result.drives.values() if s.summary is not None]
    footage = [*result.found.problems, *result.found.notes]
    local_starts = {d: state.drive.minutes[0].start for d, state in result.drives.items()}
    return write_report(out_dir, result.verdicts, summaries, images, threshold=settings.fuse.threshold, footage=footage,
                        save_frames=result.save_frames, local_starts=local_starts)  # fmt: skip


def run_footage(
    footage: str | Path,
    settings: Settings,
    out_dir: str | Path,
    *,
    url: str | None = None,
    workers: str | None = None,
    progress: Callable[[list[Worker], dict[str, DriveState]], None] | None = None,
    timeout_s: float | None = None,
    on_broker: Callable[[str], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    save_frames: bool = False,
    save_video: bool = False,
) -> RunResult:
    """Discover, pick a broker, plan the worker processes and run (see the module docstring).

    Parameters:
        workers: ``--workers``: ``1`` (one process) or ``STAGE=N,…`` over the machine's
            plan (``workers.plan``); ``None``: the machine's plan.
        on_plan: called with the plan before anything starts.
        save_frames: also write the key frames with their boxes (``frames/``).

    Raises:
        FootageError: the footage path does not exist.
        NoFootage: no drive was found.
        RunError: the run failed, or ``workers`` does not parse.
    """
    found = discover(footage)
    if not found.drives:
        message = f"{found.root}: no TeslaCam footage found (expected YYYY-MM-DD_HH-MM-SS-<camera>.mp4 clips)"
        raise NoFootage(message)
    settings = footage_roots(one_shot(shipped_models(settings)), found.root)
    plan = choose_plan(settings, workers)
    options = {"progress": progress, "timeout_s": timeout_s, "save_frames": save_frames, "save_video": save_video}
    if url is not None:
        return _run(found, settings, url, out_dir, on_broker, _shown(plan, url, on_plan), options)
    # Bounded before the server starts, so that it records the bounds the run uses.
    bounded = memory_bound(sized_for_machine(settings))
    with private_redis(bounded.broker) as private:
        if private is not None:
            settings = bounded
            return _run(found, settings, private, out_dir, on_broker, _shown(plan, private, on_plan), options)
    name = f"run-{uuid.uuid4().hex[:8]}"
    try:
        return _run(found, settings, f"memory://{name}", out_dir, on_broker, _shown(plan, "memory://", on_plan), options)
    finally:
        forget_memory(name)


def choose_plan(settings: Settings, workers: str | None = None) -> Plan:
    """The machine's plan for this run's stages, with ``--workers`` applied.

    Raises:
        RunError: ``workers`` does not parse.
    """
    plan = machine_plan(settings, stages_for(settings))
    if workers is None:
        return plan
    try:
        return parse_workers(workers, plan)
    except ConfigError as exc:
        raise RunError(str(exc)) from exc


def _shown(plan: Plan, url: str, on_plan: Callable[[Plan], None] | None) -> Plan:
    # The embedded broker lives in this process: no other process can share it.
    if url.startswith("memory") and not plan.single:
        plan = parse_workers("1", plan)
    if on_plan is not None:
        on_plan(plan)
    return plan


def _run(found, settings, url, out_dir, on_broker, plan, options) -> RunResult:
    if on_broker is not None:
        on_broker(url)
    return asyncio.run(run_drives(found, settings, url, out_dir, plan=plan, **options))
