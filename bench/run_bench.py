"""Footage to verdicts at the machine's limit: ``roadstream run`` against its ceilings, one run.

Builds TeslaCam-format footage (six cameras, ``--size`` at ``--fps``; ``--drives`` drives
of ``--drive-minutes`` clip sets plus one long drive of ``--long-minutes``; each clip
``--clip-seconds`` long; the whole set ``--copies`` times over), then reports side by side:

* ``run``: ``roadstream run`` (``workers.run.run_footage``, the CLI's code) with its own
  plan (or ``--workers``), over all the footage, and over the long drive alone;
  wall seconds include starting the processes and loading the models;
* ``ceiling_pyav``: bare PyAV decode of every frame of every clip, one process per core
  (one decoder thread each); ``ceiling_keyframes``: the same decoding keyframes only;
* ``ceiling_nvdec``: NVDEC (PyNvVideoCodec) decode of every frame, ``--nvdec-sessions``
  threads in one process, frames left on the GPU (only where the library and CUDA are);
* ``stage_ingest`` / ``stage_detect`` / ``stage_fuse``: each stage alone with the plan's
  process count, on a private redis-server: ingest over all drives (nothing consumes),
  then detect over the frames ingest left, then fuse over the detections. Rate = outputs
  / (last output − first output), from the Redis entry ids' times (model loading and
  process start are outside that span; the first batch's own time is too).

Each section reports footage seconds per wall second (``x_real_time``, six-camera drive
seconds), frames per second (decoded frames for the ceilings, sampled frames otherwise),
and the CPU and GPU busy share while it ran (``/proc/stat``; NVML where present), with
the machine's steal share and, per stage, cores used and threads waiting for a CPU.
Writes one JSON file (``--out``) and prints it.

    nice python3 bench/run_bench.py --quick                 # a tiny setting, any machine
    python3 bench/run_bench.py --out bench-h200.json         # the full setting (GPU box)
    python3 bench/run_bench.py --footage /data/bench-footage # reuse built footage

Clips are built once per (camera, clip length) with real clips as content where
``--sources`` has them (``/work/shared/footage``; synthetic pictures otherwise) and remuxed
under every drive's names with their own times: the decoding cost is the same, the build
takes minutes less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import av

from bench.run_probe import RunProbe
from fixtures import teslacam as tc
from stages.discover import discover
from stages.nvdec import nvdec_unavailable
from stream import codec, names
from stream.schemas import DriveMarker
from stream.settings import Settings, load_settings
from workers.children import Children
from workers.plan import Plan
from workers.run import (
    choose_plan,
    footage_roots,
    one_shot,
    private_broker,
    private_redis,
    run_footage,
    shipped_models,
    submit,
)

SOURCES = Path("/work/shared/footage")  # roadwork/ and clear/ clips: the built drives' content
STAMP = "%Y-%m-%d_%H-%M-%S"
POLL_S = 0.2
#: The stages of the "stages" section, in order: each reads what the ones before it wrote.
STAGES_ALONE = ("ingest", "detect", "fuse")


# -- footage ---------------------------------------------------------------------------------


def build_footage(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The drives under ``root/short-NN`` and ``root/long`` (and ``root/copyK-…`` for
    ``--copies``); returns their shape, also written to ``root/footage.json``.

    Odd short drives show clear roads (``--sources``/clear) on every camera,
    the others roadwork clips: the verdicts of two runs can then be scored against the
    content (``labels.json``), not only against each other.
    """
    width, height = (int(v) for v in args.size.split("x"))
    spec = tc.ClipSpec(duration_s=args.clip_seconds, fps=args.fps, size=(width, height), keyint=round(args.fps))
    templates: dict[str, Any] = {}
    for label in ("roadwork", "clear"):
        folder = args.sources / label
        sources = sorted(folder.glob("*.mp4")) if folder.exists() else []
        chosen = {c: sources[i % len(sources)] for i, c in enumerate(tc.CAMERAS)} if sources else None
        templates[label] = tc.make_drive(root / f"template-{label}", minutes=1, cameras=tc.CAMERAS, spec=spec,
                                         sources=chosen, layout="flat")  # fmt: skip
        if not sources:
            templates["content"] = "synthetic"
    one = [(f"short-{i:02d}", args.drive_minutes) for i in range(args.drives)] + [("long", args.long_minutes)]
    # --copies: the set again under other names and times (copy 0 keeps the plain names).
    layout = [(f"copy{c}-{name}" if c else name, i, minutes) for c in range(args.copies)
              for i, (name, minutes) in enumerate(one)]  # fmt: skip
    labels = {}
    start = datetime(2024, 5, 1, 8, 0, 0)
    # Drives start this far apart: none overlaps the next, however long the long one is.
    apart = timedelta(hours=1 + int(max(args.drive_minutes, args.long_minutes) * args.clip_seconds // 3600))
    for d, (name, i, minutes) in enumerate(layout):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        label = "clear" if "short-" in name and i % 2 else "roadwork"  # each copy the same set
        labels[name] = label
        for m in range(minutes):
            when = start + d * apart + timedelta(seconds=m * args.clip_seconds)
            for camera in tc.CAMERAS:
                _copy_with_time(templates[label].clip(0, camera), folder / f"{when.strftime(STAMP)}-{camera}.mp4", when)
    for label in ("roadwork", "clear"):
        shutil.rmtree(root / f"template-{label}")
    (root / "labels.json").write_text(json.dumps(labels))
    shape = {"drives": len(layout), "copies": args.copies, "short_drives": args.drives, "drive_minutes": args.drive_minutes,
             "long_minutes": args.long_minutes, "clip_seconds": args.clip_seconds, "size": args.size, "fps": args.fps,
             "content": templates.get("content", "real clips")}  # fmt: skip
    (root / "footage.json").write_text(json.dumps(shape))
    return {**shape, "labels": labels}


def _copy_with_time(source: Path, target: Path, when: datetime) -> None:
    # Discovery orders and chains clips by their MP4 creation_time: hard links of one
    # template would all start at the same instant and be taken for repeats of one clip
    # (the first H200 runs processed 900 frames of 17 drives that way). A remux (no
    # re-encode: the SEI travels in the packets) gives each copy its own time.
    with av.open(str(source)) as inp, av.open(str(target), "w", format="mp4") as out:
        out.metadata["creation_time"] = when.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)


def footage_seconds(root: Path) -> float:
    """Six-camera drive seconds: clip sets × their length (from the first camera's clips)."""
    total = 0.0
    for path in root.rglob("*-front.mp4"):
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total += float(stream.duration * stream.time_base) if stream.duration else 0.0
    return total


# -- busy share ---------------------------------------------------------------------------------


class Busy:
    """CPU (``/proc/stat``) and GPU (NVML) busy share while a section runs."""

    def __init__(self) -> None:
        self._gpu: list[float] = []
        # pid -> (label, first ticks, last ticks, first run-queue wait ns, last wait ns)
        self._procs: dict[int, tuple[str, int, int, int, int]] = {}
        # (seconds since start, CPU ticks so far per stage): cores per stage over time
        self._ticks: list[tuple[float, dict[str, int]]] = []
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu0 = self._cpu_times()

    @staticmethod
    def _cpu_times() -> tuple[int, int, int]:
        """(all, idle + iowait, steal) jiffies of the whole machine (``/proc/stat``)."""
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4], fields[7]

    @staticmethod
    def _run_delay_ns(pid: str) -> int:
        """Nanoseconds the process's threads spent runnable but waiting for a CPU
        (``/proc/PID/task/*/schedstat``, second field; 0 where the kernel keeps none)."""
        total = 0
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, IndexError, ValueError):
                    total += int(Path(task.path, "schedstat").read_text().split()[1])
        return total

    def __enter__(self) -> Busy:
        self._cpu0 = self._cpu_times()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._sample_gpu, daemon=True)
        self._thread.start()
        self._proc_thread = threading.Thread(target=self._sample_processes, daemon=True)
        self._proc_thread.start()
        return self

    @staticmethod
    def _ours(pid: int) -> bool:
        """``pid`` is this process or one of its descendants (other work on the box is not counted)."""
        me = os.getpid()
        while pid > 1:
            if pid == me:
                return True
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                return False
            pid = int(status.split("PPid:", 1)[1].split()[0])
        return False

    @classmethod
    def _label(cls, pid: str) -> str | None:
        """The stage of a worker process (``workers.cli worker STAGE``), ``redis`` or ``run``; None if not ours."""
        if not cls._ours(int(pid)):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return None
        words = [a.decode(errors="replace") for a in argv]
        if "workers.cli" in words and "worker" in words:
            at = words.index("worker")
            return words[at + 1] if at + 1 < len(words) else None
        if words and "redis-server" in words[0]:  # it rewrites its argv[0] ("redis-server *:0")
            return "redis"
        return "run" if int(pid) == os.getpid() else None

    def _sample_processes(self) -> None:
        # Which process is the bottleneck: each worker's CPU seconds (utime + stime) over
        # the section, from /proc/PID/stat, sampled until it exits.
        while True:
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                known = self._procs.get(int(entry.name))
                label = known[0] if known else self._label(entry.name)
                if label is None:
                    continue
                try:
                    fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                ticks = int(fields[11]) + int(fields[12])
                wait = self._run_delay_ns(entry.name)
                self._procs[int(entry.name)] = (label, known[1] if known else ticks, ticks,
                                                known[3] if known else wait, wait)  # fmt: skip
            totals: dict[str, int] = {}
            for label, first, last, _, _ in self._procs.values():
                totals[label] = totals.get(label, 0) + last - first
            self._ticks.append((time.monotonic() - self._t0, totals))
            if self._stop.wait(1.0):
                return

    def _sample_gpu(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVML here (no driver): no GPU figure
            return
        while not self._stop.wait(0.5):
            rates = [pynvml.nvmlDeviceGetUtilizationRates(h) for h in handles]
            self._gpu.append(sum(r.gpu for r in rates) / len(rates) / 100 if rates else 0.0)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        total1, idle1, steal1 = self._cpu_times()
        total0, idle0, steal0 = self._cpu0
        self.cpu = 1 - (idle1 - idle0) / max(1, total1 - total0)
        # A virtual machine's CPU time taken by its host: high, every process crawls while
        # none looks busy.
        self.steal = (steal1 - steal0) / max(1, total1 - total0)
        self.seconds = time.monotonic() - self._t0
        if self._thread is not None:
            self._thread.join()
            self._proc_thread.join()
        self.gpu = sum(self._gpu) / len(self._gpu) if self._gpu else None

    def figures(self) -> dict[str, float | None]:
        """``cpu_busy``, ``cpu_steal`` and ``gpu_busy`` (0-1; GPU ``None`` without NVML)."""
        return {"cpu_busy": round(self.cpu, 3), "cpu_steal": round(self.steal, 3),
                "gpu_busy": None if self.gpu is None else round(self.gpu, 3),
                "cores_by_process": self.by_process(), "cores_over_time": self.over_time()}  # fmt: skip

    def over_time(self, step_s: float = 3.0) -> list[dict[str, float]]:
        """Cores each stage used in every ``step_s`` seconds of the section (``t``: the
        step's end, seconds since the section started): which stage starved when."""
        hz = os.sysconf("SC_CLK_TCK")
        rows, last = [], (0.0, {})
        for t, totals in self._ticks:
            if t - last[0] >= step_s:
                span = t - last[0]
                rows.append({"t": round(t, 1), **{k: round((v - last[1].get(k, 0)) / hz / span, 2)
                                                  for k, v in sorted(totals.items())}})  # fmt: skip
                last = (t, totals)
        return rows

    def by_process(self) -> dict[str, dict[str, float]]:
        """Per stage (and ``redis``, ``run``): processes, cores used in all, the busiest one's
        share, and ``waiting_for_cpu``: threads runnable but not running, on average.

        A process near 1.0 is bound by one core (its event loop or the GIL): the stage it
        serves is the place to look when the section's rate falls short. Processes that are
        neither busy nor waiting for a CPU wait on something else (I/O, a lock, each other).
        """
        hz = os.sysconf("SC_CLK_TCK")
        wall = max(self.seconds, 1e-6)
        stages: dict[str, list[float]] = {}
        waits: dict[str, float] = {}
        for label, first, last, wait0, wait1 in self._procs.values():
            stages.setdefault(label, []).append((last - first) / hz / wall)
            waits[label] = waits.get(label, 0.0) + (wait1 - wait0) / 1e9 / wall
        return {label: {"processes": len(shares), "cores": round(sum(shares), 2), "busiest": round(max(shares), 2),
                        "waiting_for_cpu": round(waits[label], 2)}
                for label, shares in sorted(stages.items())}  # fmt: skip


def section(name: str, seconds: float, footage_s: float, frames: int, busy: Busy, **extra: Any) -> dict[str, Any]:
    """One line of the report."""
    row = {"section": name, "wall_s": round(seconds, 2), "x_real_time": round(footage_s / seconds, 2),
           "frames": frames, "frames_per_s": round(frames / seconds, 1), **busy.figures(), **extra}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


# -- ceilings -------------------------------------------------------------------------------------


def _decode_all(path: str, keyframes: bool) -> int:
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        if keyframes:
            stream.codec_context.skip_frame = "NONKEY"
        return sum(1 for _ in container.decode(stream))


def ceiling_pyav(clips: list[str], cores: int, keyframes: bool) -> tuple[int, float, Busy]:
    """Every clip decoded by a pool of one process per core; (frames, seconds, busy)."""
    with ProcessPoolExecutor(cores) as pool, Busy() as busy:
        list(pool.map(_decode_all, clips[:cores], [keyframes] * cores))  # warm the pool
        started = time.monotonic()
        frames = sum(pool.map(_decode_all, clips, [keyframes] * len(clips), chunksize=1))
        seconds = time.monotonic() - started
    return frames, seconds, busy


def ceiling_nvdec(clips: list[str], sessions: int) -> tuple[int, float, Busy]:
    """Every clip decoded by NVDEC, ``sessions`` decoders at once in one process, frames on the GPU."""
    import PyNvVideoCodec as nvc

    def decode(path: str) -> int:
        decoder = nvc.SimpleDecoder(path, gpu_id=0, use_device_memory=True,
                                    output_color_type=nvc.OutputColorType.NATIVE)  # fmt: skip
        count = 0
        while frames := decoder.get_batch_frames(32):
            count += len(frames)
        return count

    with ThreadPoolExecutor(sessions) as pool, Busy() as busy:
        started = time.monotonic()
        frames = sum(pool.map(decode, clips))
        seconds = time.monotonic() - started
    return frames, seconds, busy


# -- run ---------------------------------------------------------------------------------------------


def bench_settings(args: argparse.Namespace) -> Settings:
    """The run's settings: the shipped models, ``--set`` overrides, ``--sample``."""
    overrides: dict[str, Any] = {"ingest": {"sample": args.sample}}
    for item in args.set or []:
        key, _, value = item.partition("=")
        section_name, _, field = key.partition(".")
        overrides.setdefault(section_name, {})[field] = value
    return one_shot(shipped_models(load_settings(environ={}, **overrides)))


def bench_run(
    folder: Path, settings: Settings, workers: str | None, probe: bool = False
) -> tuple[dict[str, Any], float, int, Busy]:
    """``roadstream run`` over ``folder``; (result summary, seconds, frames, busy).

    ``probe``: sample the run's Redis while it runs (``bench/run_probe.py``: flow-control
    bounds and hop backlogs); the summary gets ``probe``."""
    plans: list[Plan] = []
    probes: list[RunProbe] = []

    def start_probe(url: str) -> None:
        # The bounds run's private server was started with (recorded, not recomputed).
        if probe and (private := private_broker(url)) is not None:
            probes.append(RunProbe(url, settings.namespace, private.max_used_memory, private.max_blob_bytes))

    with tempfile.TemporaryDirectory(prefix="run-bench-out-") as out, Busy() as busy:
        try:
            result = run_footage(folder, settings, out, workers=workers, on_plan=plans.append, on_broker=start_probe)
        finally:
            for p in probes:
                p.stop()
    frames = sum(sum(s.summary.frame_counts.values()) for s in result.drives.values() if s.summary)
    failed = {d: s.failure for d, s in result.drives.items() if s.failure}
    folders = {d: Path(s.drive.minutes[0].files["front"]).parent.name for d, s in result.drives.items()
               if "front" in s.drive.minutes[0].files}  # fmt: skip
    windows = {(folders.get(v.drive_id, v.drive_id), v.window): v.roadwork for v in result.verdicts}
    summary = {"plan": plans[0].describe() if plans else "", "verdicts": len(result.verdicts),
               "roadwork_windows": sum(v.roadwork for v in result.verdicts), "failed_drives": failed,
               "windows": windows}  # fmt: skip
    if probes:
        summary["probe"] = probes[0].summary()
    return summary, result.seconds, frames, busy


def score(windows: dict, labels: dict[str, str], reference: dict | None = None) -> dict[str, Any]:
    """Window verdicts against the drives' content (and against a reference run's verdicts)."""
    right = sum(flag == (labels.get(folder) == "roadwork") for (folder, _), flag in windows.items())
    out: dict[str, Any] = {"windows_matching_content": f"{right}/{len(windows)}"}
    if reference is not None:
        same = sum(reference.get(key) == flag for key, flag in windows.items())
        differ = "" if set(windows) == set(reference) else " (not the same windows)"
        out["windows_as_run"] = f"{same}/{len(reference)}{differ}"
    return out


# -- stages alone ------------------------------------------------------------------------------------


async def _span(broker, pattern: str, kind: str) -> tuple[int, float]:
    """(entries of ``kind``, seconds from the first to the last) over streams matching ``pattern``."""
    times = []
    for stream in await broker.streams(pattern):
        for entry in await broker.range(stream, count=10_000_000):
            if codec.decode(entry.data).KIND == kind:
                times.append(entry.order[0])  # the ms the entry was added
    return len(times), (max(times) - min(times)) / 1000 if len(times) > 1 else 0.0


async def _wait(check, timeout_s: float) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout_s`` passed (False: the figures are partial)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def stages_alone(folder: Path, settings: Settings, plan: Plan, timeout_s: float,
                       stages: Sequence[str] = STAGES_ALONE) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Ingest, then detect, then fuse (those of ``stages``, a prefix of the three), each
    alone on one private redis-server."""
    from brokers.connect import connect

    # Nothing consumes while a stage runs alone: no backpressure bound may stop it.
    bounds = settings.broker.model_copy(update={"max_lag": 10**12, "max_blob_bytes": 2**40, "blob_ttl_s": 24 * 3600})
    settings = settings.model_copy(update={"broker": bounds})
    found = discover(folder)
    drives = {d.drive_id for d in found.drives}
    ns = settings.namespace
    out: dict[str, dict[str, Any]] = {}
    with private_redis(settings.broker.model_copy(update={"max_blob_bytes": 8 * 2**30})) as url, \
            tempfile.TemporaryDirectory(prefix="run-bench-") as work:  # fmt: skip
        broker, blobs = connect(url, namespace=ns, settings=settings.broker)
        try:
            for stage, done in (("ingest", _ingest_done), ("detect", _detect_done), ("fuse", _fuse_done)):
                if stage not in stages:
                    continue
                alone = Plan({stage: plan.workers[stage]}, plan.detect_devices, plan.nvdec_ingest, plan.cores, plan.gpus)
                children = Children(alone, settings, url, Path(work) / stage)
                (Path(work) / stage).mkdir()
                with Busy() as busy:
                    children.start()
                    try:
                        if stage == "ingest":
                            # As run splits with several ingest processes (ingest.split names another)
                            split = settings.ingest.split if "split" in settings.ingest.model_fields_set else "span"
                            await submit(broker, found.drives, settings, split=split)
                        finished = await _wait(lambda s=stage, d=done: d(broker, ns, drives, children), timeout_s)
                    finally:
                        await asyncio.to_thread(children.stop)
                hop, kind = {"ingest": ("frames", "frame"), "detect": ("detections", "detections"),
                             "fuse": ("verdicts", "verdict")}[stage]  # fmt: skip
                count, seconds = await _span(broker, f"{ns}:{hop}*", kind)
                out[stage] = {"processes": alone.workers[stage], "outputs": count, "span_s": seconds, "busy": busy,
                              "finished": finished}  # fmt: skip
        finally:
            await broker.close()
            await blobs.close()
    return out


async def _drives_with(broker, stream: str, count: int, seen) -> set[str]:
    """Drive ids of the messages on ``stream`` for which ``seen(message)`` holds."""
    return {message.drive_id for entry in await broker.range(stream, count=count)
            if seen(message := codec.decode(entry.data))}  # fmt: skip


async def _ingest_done(broker, ns: str, drives: set[str], children: Children) -> bool:
    children.check()
    ended = await _drives_with(broker, names.stream_name(names.DRIVES, ns=ns), 100_000,
                               lambda m: isinstance(m, DriveMarker) and m.event == "ended")  # fmt: skip
    return ended >= drives


async def _detect_done(broker, ns: str, drives: set[str], children: Children) -> bool:
    children.check()
    for stream in await broker.streams(f"{ns}:{names.FRAMES}:*"):
        group = (await broker.stats(stream)).group(names.DETECT)
        if group is None or group.lag or group.pending:
            return False
    return True


async def _fuse_done(broker, ns: str, drives: set[str], children: Children) -> bool:
    children.check()
    summaries = await _drives_with(broker, names.stream_name(names.VERDICTS, ns=ns), 1_000_000,
                                   lambda m: m.KIND == "drive_summary")  # fmt: skip
    return summaries >= drives


# -- main ------------------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``--quick`` sets a tiny footage and skips nothing)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="Tiny footage: 2 drives + a 3-clip long drive, 320x240.")
    parser.add_argument("--drives", type=int, default=8, help="Short drives (besides the long one).")
    parser.add_argument("--drive-minutes", type=int, default=1, help="Clip sets per short drive.")
    parser.add_argument("--long-minutes", type=int, default=10, help="Clip sets of the long drive.")
    parser.add_argument("--clip-seconds", type=float, default=60.0, help="Length of each clip.")
    parser.add_argument("--size", default="1280x960")
    parser.add_argument("--fps", type=float, default=36.0)
    parser.add_argument("--copies", type=int, default=1,
                        help="Build the drive set this many times over (remuxed, each with its own names and times): "
                             "more footage, so that the run's one-time start weighs less, as on a disk of footage.")
    parser.add_argument("--footage", type=Path, help="Use (or build once into) this folder.")
    parser.add_argument("--sources", type=Path, default=SOURCES,
                        help="Content clips under roadwork/ and clear/ (synthetic pictures where absent).")
    parser.add_argument("--build-only", action="store_true", help="Build --footage and stop.")
    parser.add_argument("--workers", help="Passed to run as --workers (default: its own plan).")
    parser.add_argument("--sample", choices=("ticks", "keyframes"), default="ticks")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="A setting of the run.")
    parser.add_argument("--nvdec-sessions", type=int, default=8)
    parser.add_argument("--probe", action="store_true",
                        help="Sample the run's Redis (bounds, hop backlogs): where the run waits.")
    parser.add_argument("--skip", action="append", default=[],
                        choices=("run", "single", "keyframes", "long", "ceilings", "stages"),
                        help="Leave a section out (repeatable).")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=3600.0, help="Seconds a stage alone may take.")
    parser.add_argument("--stages", default="ingest,detect,fuse",
                        help="Which stages run alone in the stages section (comma-separated; detect and fuse read "
                             "what the stages before them wrote).")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("run-bench.json"))
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if not stages or stages != list(STAGES_ALONE[: len(stages)]):
        parser.error(f"--stages: {args.stages!r} is not ingest, ingest,detect or ingest,detect,fuse "
                     "(detect and fuse alone read what the stages before them wrote)")  # fmt: skip
    args.stages = stages
    if args.copies < 1:
        parser.error(f"--copies: {args.copies} is not a count of drive sets (1 or more)")
    if args.quick:
        args.drives, args.drive_minutes, args.long_minutes = 2, 1, 3
        args.clip_seconds, args.size = 2.0, "320x240"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Build the footage, run every section, write and return the report."""
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="run-bench-footage-") as scratch:
        root = args.footage or Path(scratch)
        shape = build_footage(root, args) if not any(root.glob("*/*.mp4")) else reused_footage(root, args)
        if args.build_only:
            print(json.dumps(shape))
            return {"footage": shape}
        report: dict[str, Any] = {"machine": machine(), "footage": shape, "args": {k: str(v) for k, v in vars(args).items()}}
        report["sections"] = sections(root, args)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


def reused_footage(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The shape of footage built earlier (its ``footage.json``, where it has one): the build
    options given now are not what it was built with, and are said to be ignored."""
    known = root / "footage.json"
    shape = json.loads(known.read_text()) if known.exists() else {}
    asked = {"copies": 1, "short_drives": 8, "drive_minutes": 1, "long_minutes": 10, "clip_seconds": 60.0}
    ignored = [k for k, default in asked.items() if getattr(args, k.replace("short_", ""), default) != default]
    if ignored:
        print(f"--footage {root} is reused as built: {', '.join(ignored)} given now are ignored", file=sys.stderr)
    return {"reused": str(root), **shape}


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    from stages.devices import cuda_device_count

    gpus = cuda_device_count()
    name = None
    if gpus:
        import torch

        name = torch.cuda.get_device_name(0)
    return {"host": platform.node(), "cores": len(os.sched_getaffinity(0)), "gpus": gpus, "gpu": name,
            "cpu": platform.processor() or platform.machine(), "nvdec": nvdec_unavailable() or "available"}  # fmt: skip


def sections(root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every section's row, in the order of the module docstring."""
    rows = []
    settings = bench_settings(args)
    total_s = footage_seconds(root)
    long_s = footage_seconds(root / "long")
    plan = choose_plan(settings, args.workers)
    clips = sorted(str(p) for p in root.rglob("*.mp4"))
    labels = json.loads((root / "labels.json").read_text()) if (root / "labels.json").exists() else {}
    reference = None
    if "run" not in args.skip:
        summary, seconds, frames, busy = bench_run(root, settings, args.workers, args.probe)
        reference = summary.pop("windows")
        rows.append(section("run", seconds, total_s, frames, busy, **summary, **score(reference, labels)))
    if "single" not in args.skip:
        # The single-process mode (the run of before): the "before" figure and the same-verdicts check.
        summary, seconds, frames, busy = bench_run(root, settings, "1")
        windows = summary.pop("windows")
        rows.append(section("run_single_process", seconds, total_s, frames, busy, **summary,
                            **score(windows, labels, reference)))  # fmt: skip
    if "keyframes" not in args.skip and args.sample != "keyframes":
        keyed = settings.model_copy(update={"ingest": settings.ingest.model_copy(update={"sample": "keyframes"})})
        summary, seconds, frames, busy = bench_run(root, keyed, args.workers)
        windows = summary.pop("windows")
        rows.append(section("run_keyframes", seconds, total_s, frames, busy, **summary,
                            **score(windows, labels, reference)))  # fmt: skip
    if "long" not in args.skip:
        summary, seconds, frames, busy = bench_run(root / "long", settings, args.workers)
        summary.pop("windows")
        rows.append(section("run_long_drive_alone", seconds, long_s, frames, busy, **summary))
    if "ceilings" not in args.skip:
        cores = plan.cores
        for keyframes in (False, True):
            frames, seconds, busy = ceiling_pyav(clips, cores, keyframes)
            name = "ceiling_keyframes" if keyframes else "ceiling_pyav"
            rows.append(section(name, seconds, total_s, frames, busy, processes=cores))
        if nvdec_unavailable() is None:
            frames, seconds, busy = ceiling_nvdec(clips, args.nvdec_sessions)
            rows.append(section("ceiling_nvdec", seconds, total_s, frames, busy, sessions=args.nvdec_sessions))
    if "stages" not in args.skip:
        alone = asyncio.run(stages_alone(root, footage_roots(settings, root), plan, args.timeout, args.stages))
        frames = alone["ingest"]["outputs"] if "ingest" in alone else 0
        for stage, figures in alone.items():
            rows.append(section(f"stage_{stage}", max(figures["span_s"], 1e-6), total_s, frames, figures["busy"],
                                processes=figures["processes"], outputs=figures["outputs"],
                                finished=figures["finished"]))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
