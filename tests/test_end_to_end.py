"""End to end on the real Redis server: footage in, verdicts out, every CPU stage a process.

One six-camera drive (two 10 s clip sets, the second with only the front and back
cameras) goes through ``roadstream submit`` and one ``roadstream worker`` process per
stage (ingest, detect with a YOLO built from ``yolo11n.yaml``, fuse; no VLM). The first
run is left alone; the second has a worker of each stage SIGKILLed mid-run and restarted.
Both must give one verdict per window and the same verdicts.

The detector's weights are built once, seeded, and saved to a file both runs load, so its
output is the same in every process. Random weights see nothing in particular, so the
class bias of class ``0`` (mapped to ``cone``) is raised until every frame has a couple of
confident boxes: windows seen by six cameras then hold more fused objects than windows
seen by two, and ``fuse.threshold`` sits between the two, so verdicts differ by window.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from fixtures.teslacam import CAMERAS, ClipSpec, make_drive
from stages.discover import discover
from stream import codec, names
from stream.schemas import DriveMarker, DriveSummary, Verdict

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CLIP_S = 10.0
MINUTES = 2
SAMPLE_FPS = 4
WINDOW_S = 2.5
#: Cameras of the second clip set: the others are missing there (as on real drives).
SECOND = ("front", "back")
#: Class-0 logit bias added to the random head: about two boxes of score ~0.3 per frame.
BIAS_SHIFT = 8.0
#: Between a six-camera window's confidence and a two-camera window's (see the module doc).
THRESHOLD = 0.93
DEADLINE_S = 90.0


# -- footage, weights, settings ---------------------------------------------------------


def build_weights(path: Path) -> Path:
    """A seeded ``yolo11n.yaml`` detector whose class 0 fires on every frame, saved once."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    yolo = YOLO("yolo11n.yaml", verbose=False)
    with torch.no_grad():
        for branch in yolo.model.model[-1].cv3:
            branch[-1].bias[0] += BIAS_SHIFT
    yolo.save(str(path))
    return path


@dataclass(frozen=True)
class Setup:
    """The drive on disk and the environment every process runs with."""

    footage: Path
    drive_id: str
    env: dict[str, str]
    logs: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """The six-camera drive, the saved weights and a settings file, made once."""
    root = tmp_path_factory.mktemp("e2e")
    spec = ClipSpec(duration_s=CLIP_S, fps=10.0, size=(160, 120))
    missing = {(1, camera) for camera in CAMERAS if camera not in SECOND}
    # step_s = clip length: the two clip sets follow each other with no gap.
    make_drive(
        root / "footage", cameras=CAMERAS, minutes=MINUTES, spec=spec, missing=missing, step_s=int(CLIP_S)
    )
    (drive,) = discover(root / "footage").drives
    weights = build_weights(root / "yolo11n-seeded.pt")
    config = root / "roadstream.yaml"
    # Mappings and lists: the env can't carry them. Roots: the footage is not under the cwd.
    config.write_text(f'detect:\n  classes: {{"0": cone}}\ningest:\n  roots: ["{root / "footage"}"]\n')
    env = {
        "ROADSTREAM_CONFIG": str(config),
        "ROADSTREAM_DETECT__MODEL": str(weights),
        "ROADSTREAM_DETECT__SCORER": "",
        "ROADSTREAM_DETECT__DEVICE": "cpu",
        "ROADSTREAM_DETECT__IMGSZ": "160",
        "ROADSTREAM_DETECT__HALF": "false",
        "ROADSTREAM_DETECT__WINDOW_S": "4",
        "ROADSTREAM_DETECT__STRIDE_S": "2",
        "ROADSTREAM_INGEST__SAMPLE_FPS": str(SAMPLE_FPS),
        "ROADSTREAM_INGEST__LONG_SIDE": "160",
        "ROADSTREAM_FUSE__WINDOW_S": str(WINDOW_S),
        "ROADSTREAM_FUSE__THRESHOLD": str(THRESHOLD),
        # Verdicts must come from complete windows, never from a timeout during a restart.
        "ROADSTREAM_FUSE__WATERMARK_TIMEOUT_S": "120",
        # Short claim idle and leases: a killed worker's entries move on within a second.
        "ROADSTREAM_BROKER__CLAIM_IDLE_MS": "500",
        "ROADSTREAM_BROKER__LEASE_TTL_MS": "900",
        # One frame partition, so backpressure is the same whatever the drive id hashes
        # to: its bound lies above the frames detect holds for its open windows (6 × 16)
        # and below the drive's frames, so ingest waits for detect mid-drive.
        "ROADSTREAM_BROKER__FRAME_PARTITIONS": "1",
        "ROADSTREAM_BROKER__MAX_LAG": "120",
        "ROADSTREAM_WORKER__RECLAIM_INTERVAL_S": "0.2",
        "ROADSTREAM_WORKER__HEARTBEAT_S": "0.2",
        "ROADSTREAM_WORKER__GRACE_S": "3",
        "ROADSTREAM_VLM__BACKEND": "",
    }
    return Setup(root / "footage", drive.drive_id, env, tmp_path_factory.mktemp("logs"))


def expected_windows() -> int:
    """Windows of the drive: its length over ``fuse.window_s``."""
    return math.ceil(MINUTES * CLIP_S / WINDOW_S)


def expected_frames() -> dict[str, int]:
    """Frames per camera: every tick of the clips it has."""
    per_clip = int(CLIP_S * SAMPLE_FPS)
    return {c: per_clip * (MINUTES if c in SECOND else 1) for c in CAMERAS}


# -- processes ----------------------------------------------------------------------------


class Pipeline:
    """``roadstream`` worker processes of one namespace, and what they wrote to Redis."""

    def __init__(self, setup: Setup, url: str, namespace: str) -> None:
        self.setup = setup
        self.url = url
        self.namespace = namespace
        self.env = {**os.environ, **setup.env, "ROADSTREAM_NAMESPACE": namespace}
        self.client = redis.Redis.from_url(url)
        self.workers: dict[str, subprocess.Popen] = {}
        self.starts = 0

    def roadstream(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "workers.cli", *args]

    def start(self, stage: str) -> None:
        """Start (or restart) the worker process of one stage."""
        self.starts += 1
        log = (self.setup.logs / f"{self.namespace}-{stage}-{self.starts}.log").open("wb")
        command = self.roadstream("worker", stage, "--redis", self.url)
        self.workers[stage] = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def kill(self, stage: str) -> None:
        """SIGKILL one stage's worker: no drain, no lease release, nothing acked."""
        proc = self.workers[stage]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def submit(self) -> None:
        """``roadstream submit FOOTAGE``: queue the drive's ingest job."""
        command = self.roadstream("submit", str(self.setup.footage), "--redis", self.url)
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=60)

    def eval(self, labels: Path) -> dict:
        """``roadstream eval --json`` over this namespace's verdicts."""
        command = self.roadstream("eval", "--labels", str(labels), "--redis", self.url, "--json")
        done = subprocess.run(command, env=self.env, check=True, capture_output=True, text=True, timeout=60)
        return json.loads(done.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """SIGTERM every worker (they drain), SIGKILL what is still there after a while."""
        for proc in self.workers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.workers.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- what is in Redis ----------------------------------------------------------------

    def outputs(self) -> list:
        """Every entry of the verdicts stream, decoded."""
        stream = names.stream_name(names.VERDICTS, ns=self.namespace)
        return [codec.decode(f[b"d"], (Verdict, DriveSummary)) for _, f in self.client.xrange(stream)]

    def count(self, hop: str, partitions: int = 0) -> int:
        """Entries of a hop (all partitions of a partitioned one)."""
        if not partitions:
            return self.client.xlen(names.stream_name(hop, ns=self.namespace))
        return sum(self.client.xlen(names.stream_name(hop, p, self.namespace)) for p in range(partitions))

    def ingest_ended(self) -> bool:
        """Whether ingest published the drive's "ended" marker."""
        stream = names.stream_name(names.DRIVES, ns=self.namespace)
        markers = [codec.decode(f[b"d"], DriveMarker) for _, f in self.client.xrange(stream)]
        return any(m.event == "ended" for m in markers)

    def summarised(self) -> bool:
        """Whether fuse published the drive summary."""
        return any(isinstance(m, DriveSummary) for m in self.outputs())

    def wait_for(self, condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
        """Poll until ``condition`` holds; fail naming ``what`` (and any dead worker)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            dead = {s: p.returncode for s, p in self.workers.items() if p.poll() is not None}
            assert not dead, f"worker(s) exited while waiting for {what}: {dead} (logs in {self.setup.logs})"
            assert time.monotonic() < deadline, f"timed out waiting for {what} (logs in {self.setup.logs})"
            time.sleep(0.05)


@dataclass
class Outcome:
    """What a run left on the verdicts stream, and the eval figures of its verdicts."""

    verdicts: list[Verdict]
    summaries: list[DriveSummary]
    figures: dict
    labels: Path


def write_labels(path: Path, drive_id: str) -> Path:
    """Labels: roadwork in the first clip set (six cameras), none in the second."""
    path.write_text(
        f"drive_id,t_start,t_end,label\n{drive_id},0,{CLIP_S},1\n{drive_id},{CLIP_S},{MINUTES * CLIP_S},0\n"
    )
    return path


def finish(pipeline: Pipeline) -> Outcome:
    """Wait for the drive summary, stop the workers, read the verdicts and evaluate them."""
    try:
        pipeline.wait_for(pipeline.summarised, "the drive summary")
        time.sleep(0.5)  # a late duplicate, if any, would land now
    finally:
        pipeline.stop()
    outputs = pipeline.outputs()
    labels = write_labels(pipeline.setup.logs / f"{pipeline.namespace}-labels.csv", pipeline.setup.drive_id)
    return Outcome(
        [m for m in outputs if isinstance(m, Verdict)],
        [m for m in outputs if isinstance(m, DriveSummary)],
        pipeline.eval(labels),
        labels,
    )


@pytest.fixture(scope="module")
def db(redis_server_url: str) -> Iterator[str]:
    """The test database, flushed before and after this module (both runs share it)."""
    with redis.Redis.from_url(redis_server_url) as client:
        client.flushdb()
        yield redis_server_url
        client.flushdb()


@pytest.fixture(scope="module")
def undisturbed(setup: Setup, db: str) -> Outcome:
    """A run with every worker left alone."""
    pipeline = Pipeline(setup, db, "e2e-plain")
    for stage in (names.FUSE, names.DETECT, names.INGEST):
        pipeline.start(stage)
    pipeline.submit()
    return finish(pipeline)


def identity(v: Verdict) -> tuple:
    """What must not change between runs: window, decision, confidence and evidence."""
    return (
        v.drive_id,
        v.window,
        v.roadwork,
        round(v.confidence, 9),
        tuple(v.cameras),
        tuple(sorted(v.objects.items())),
    )


# -- the undisturbed run -------------------------------------------------------------------


def test_one_verdict_per_window_and_never_two(undisturbed: Outcome, setup: Setup) -> None:
    # Given the undisturbed run over a 20 s drive with 2.5 s windows
    windows = [(v.drive_id, v.window) for v in undisturbed.verdicts]
    # Then each window has exactly one verdict, windows 0 … n-1 of the one drive
    assert len(windows) == len(set(windows))
    assert sorted(windows) == [(setup.drive_id, i) for i in range(expected_windows())]


def test_the_drive_summary_accounts_for_every_frame(undisturbed: Outcome, setup: Setup) -> None:
    # Given the undisturbed run
    (summary,) = undisturbed.summaries
    # Then the one summary counts every window and every ingested frame, and its only
    # problems say which cameras did not record the second clip set
    assert summary.drive_id == setup.drive_id
    assert summary.windows == expected_windows()
    assert summary.frame_counts == expected_frames()
    (_, second) = discover(setup.footage).drives[0].minutes
    absent = sorted(c for c in CAMERAS if c not in SECOND)
    assert summary.problems == [f"{c}: no clip in 1 of 2 minute(s) ({second.start}): the camera did not record them"
                                for c in absent]  # fmt: skip
    assert summary.missing == {c: [second.start] for c in absent}
    assert summary.roadwork_windows == sum(v.roadwork for v in undisturbed.verdicts)


def test_verdicts_carry_fused_evidence_and_timings(undisturbed: Outcome) -> None:
    # Given the undisturbed run, whose detector boxes something in every frame
    six = [v for v in undisturbed.verdicts if v.t_end <= CLIP_S]
    two = [v for v in undisturbed.verdicts if v.t_start >= CLIP_S]
    # Then windows cite their supporting cameras, six-camera windows are the confident ones,
    # and every verdict says how long its frames took from ingest
    assert all(v.cameras == sorted(CAMERAS) for v in six)
    assert all(v.cameras == sorted(SECOND) for v in two)
    assert min(v.confidence for v in six) > max(v.confidence for v in two)
    assert all(v.timings_ms["ingest_to_verdict_ms"] > 0 for v in undisturbed.verdicts)
    assert all(v.models["detect"] == "yolo11n-seeded.pt" for v in undisturbed.verdicts)


def test_eval_figures_come_from_the_verdicts_and_labels(undisturbed: Outcome) -> None:
    # Given labels that call the first clip set roadwork and the second not
    truth = {v.window: v.t_end <= CLIP_S for v in undisturbed.verdicts}
    # When `roadstream eval` compares them with the verdicts on the stream
    window = undisturbed.figures["window"]
    # Then its confusion matrix is the one the verdicts and labels make, and MCC follows
    pairs = [(truth[v.window], v.roadwork) for v in undisturbed.verdicts]
    tp, fp = pairs.count((True, True)), pairs.count((False, True))
    tn, fn = pairs.count((False, False)), pairs.count((True, False))
    assert (window["tp"], window["fp"], window["tn"], window["fn"]) == (tp, fp, tn, fn)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn) or 1)
    assert window["mcc"] == pytest.approx(mcc)
    assert window["accuracy"] == pytest.approx((tp + tn) / len(pairs))
    assert undisturbed.figures["drive"]["n"] == 1


# -- killed and restarted ------------------------------------------------------------------


def test_workers_killed_mid_run_give_the_same_verdicts_once(
    undisturbed: Outcome, setup: Setup, db: str
) -> None:
    # Given the same drive and fresh workers in another namespace
    pipeline = Pipeline(setup, db, "e2e-kill")
    frames = sum(expected_frames().values())
    try:
        pipeline.start(names.FUSE)
        pipeline.start(names.INGEST)
        pipeline.submit()
        # When ingest is killed mid-drive: no detect yet, so backpressure holds it at one camera
        pipeline.wait_for(lambda: pipeline.count(names.FRAMES, 1) > 120, "ingest's first frames")
        assert not pipeline.ingest_ended()
        pipeline.kill(names.INGEST)
        pipeline.start(names.INGEST)
        pipeline.start(names.DETECT)
        # … then detect, once it published some of the drive's detections …
        pipeline.wait_for(lambda: pipeline.count(names.DETECTIONS, 8) > frames // 4, "some detections")
        assert pipeline.count(names.DETECTIONS, 8) < frames
        pipeline.kill(names.DETECT)
        pipeline.start(names.DETECT)
        # … then fuse, once it published a verdict but before the drive is done
        pipeline.wait_for(lambda: bool(pipeline.outputs()), "a first verdict")
        assert not pipeline.summarised()
        pipeline.kill(names.FUSE)
        pipeline.start(names.FUSE)
        killed = finish(pipeline)
    finally:
        pipeline.stop()
    # Then the verdicts are those of the undisturbed run, none doubled, none lost
    got = [identity(v) for v in killed.verdicts]
    assert len(got) == len(set(got)) == expected_windows()
    assert sorted(got) == sorted(identity(v) for v in undisturbed.verdicts)
    (summary,) = killed.summaries
    assert summary.frame_counts == expected_frames()
    assert killed.figures == undisturbed.figures
