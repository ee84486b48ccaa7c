"""Failure tests: real worker processes, real Redis, the real stages, and faults injected.

Two generated TeslaCam drives go through ingest, detect (a YOLO11n built from its yaml,
its weights fixed and saved to a ``.pt`` so every process computes the same) and fuse,
each stage in ``python -m workers.cli worker STAGE`` processes with short claim and lease
times. Each test injects one kind of fault and ends with every drive's full set of
verdicts, compared with a fault-free reference run on (drive, window, roadwork,
cameras): none lost, none doubled, one summary per drive.

Faults are timed on what the workers hold, not on the clock: a worker is killed or paused
while the broker shows it has entries pending, so a fast machine cannot make a test pass
without the fault having hit work in progress. The table of these tests is in
``docs/failure-tests.md``.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import redis
import yaml
from conftest import REDIS_URL_FIXTURES
from redis_servers import REDIS_CLI, REDIS_SERVER, RedisClusterServers, RedisServers, sync_client

from fixtures.teslacam import THREE, ClipSpec, Drive, make_drive, not_a_video
from stream import codec, names
from stream.schemas import DeadLetter, DriveSummary, FrameRef, Job, Verdict

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server on the PATH"),
]

NAMESPACE = "ftest"
#: Short enough that takeovers happen within a test, long enough for a loaded 2-core box.
TIMING_ENV = {
    "ROADSTREAM_BROKER__CLAIM_IDLE_MS": "2000",
    "ROADSTREAM_BROKER__LEASE_TTL_MS": "2000",
    "ROADSTREAM_WORKER__RECLAIM_INTERVAL_S": "0.3",
    "ROADSTREAM_WORKER__HEARTBEAT_S": "0.3",
    "ROADSTREAM_WORKER__GRACE_S": "2",
}
FRAME_PARTITIONS = 4
FUSE_PARTITIONS = 2
#: Seconds a run may take before a test calls the verdicts lost.
RUN_DEADLINE_S = 90.0
SPEC = ClipSpec(duration_s=5.0, fps=10.0, size=(160, 120))

VerdictKey = tuple[str, int, bool, tuple[str, ...]]
#: What a test's own client may meet while a server restarts or a cluster fails over.
SERVER_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError,
               redis.exceptions.TryAgainError, redis.exceptions.RedisClusterException)  # fmt: skip


# -- footage, model, settings ------------------------------------------------------------


@dataclass
class Setup:
    """What every run shares: the footage, the settings file, the drive ids."""

    footage: Path
    config: Path
    drives: list  # stages.discover.FoundDrive
    work: Path

    def env(self, namespace: str = NAMESPACE) -> dict[str, str]:
        """Environment of a worker process (one torch thread: two cores, many processes)."""
        return {
            **os.environ,
            **TIMING_ENV,
            "ROADSTREAM_CONFIG": str(self.config),
            "ROADSTREAM_NAMESPACE": namespace,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }

    @property
    def drive_ids(self) -> set[str]:
        return {d.drive_id for d in self.drives}


def fixed_weights_model(path: Path) -> Path:
    """A YOLO11n from its yaml whose detections depend on the picture, saved as ``.pt``.

    A freshly initialised YOLO's features are nearly constant, so its boxes would not
    depend on the frame. Re-estimating the batch-norm statistics on synthetic frames
    gives the features unit variance; a class bias then makes a few boxes per frame pass
    the confidence threshold, differently from frame to frame.
    """
    import numpy as np
    import torch

    from fixtures.teslacam import CAMERAS, _synthetic_frames
    from stages.detect import load_yolo

    torch.manual_seed(0)
    yolo = load_yolo("yolo11n.yaml")
    net = yolo.model
    frames = [f.to_ndarray() for cam in CAMERAS[:3] for f in _synthetic_frames(SPEC, cam, 12)]
    batch = torch.tensor(np.stack(frames)).permute(0, 3, 1, 2).float() / 255
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batch
    net.train()
    with torch.no_grad():
        net(torch.nn.functional.pad(batch, (0, 0, 4, 4), value=114 / 255))
    net.eval()
    for branch in net.model[-1].cv3:  # class-score convolutions: lift classes 0 and 1
        branch[-1].bias.data[:2] += 4.5
    yolo.save(str(path))
    return path


def write_config(path: Path, footage: Path, model: Path) -> Path:
    """The settings every worker of these tests reads (``ROADSTREAM_CONFIG``)."""
    config = {
        "broker": {"frame_partitions": FRAME_PARTITIONS, "fuse_partitions": FUSE_PARTITIONS},
        "worker": {"batch_size": 8, "max_wait_ms": 20},
        "ingest": {"sample_fps": 5.0, "long_side": 160, "decoder_threads": 1, "roots": [str(footage)]},
        "detect": {
            "model": str(model),
            "scorer": "",
            "imgsz": 160,
            "half": False,
            "conf": 0.2,
            "classes": {"0": "cone", "1": "worker"},
            "window_s": 2.0,
            "stride_s": 1.0,
        },
        # The stall guard gives up a drive's cameras only after no entry of the drive
        # arrived for this long (and 3x the pipeline's lag); here a stage's recovery (a
        # killed worker's replacement loading its model on a busy CI machine, then
        # replaying what the dead one held) may stall a drive longer than its default
        # 30 s. These tests check that nothing is lost or doubled, so it is out of their way.
        "fuse": {"window_s": 2.0, "watermark_timeout_s": 600.0},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def two_clip_drive(folder: Path, start: str) -> Drive:
    """Three cameras, two back-to-back 5 s clips each: 10 s of drive, 30 s of footage."""
    return make_drive(folder, start=start, cameras=THREE, minutes=2, spec=SPEC, step_s=5, layout="flat")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    """Two three-camera drives of 2 × 5 s (30 s of footage each), the model, the settings."""
    from stages.discover import discover

    work = tmp_path_factory.mktemp("failures")
    footage = work / "footage"
    two_clip_drive(footage / "a", "2024-05-01_10-00-00")
    two_clip_drive(footage / "b", "2024-05-02_11-00-00")
    model = fixed_weights_model(work / "yolo11n-fixed.pt")
    config = write_config(work / "roadstream.yaml", footage, model)
    return Setup(footage, config, discover(footage).drives, work)


# -- what a run produced -------------------------------------------------------------------


@dataclass
class Outcome:
    """The verdicts stream of one run, counted."""

    verdicts: Counter = field(default_factory=Counter)  # VerdictKey -> entries
    windows: Counter = field(default_factory=Counter)  # (drive, window) -> entries
    summaries: dict[str, list[DriveSummary]] = field(default_factory=dict)

    def keys(self, drives: set[str] | None = None) -> set[VerdictKey]:
        """The verdict keys, of some drives only when named."""
        return {k for k in self.verdicts if drives is None or k[0] in drives}

    def doubled(self) -> list:
        """(drive, window) pairs with more than one verdict entry."""
        return [w for w, n in self.windows.items() if n > 1]


def read_outcome(client: redis.Redis, namespace: str = NAMESPACE) -> Outcome:
    """Every verdict and summary on the verdicts stream."""
    outcome = Outcome()
    for _, fields in client.xrange(names.stream_name(names.VERDICTS, ns=namespace)):
        message = codec.decode(fields[b"d"], (Verdict, DriveSummary))
        if isinstance(message, Verdict):
            key = (message.drive_id, message.window, message.roadwork, tuple(sorted(message.cameras)))
            outcome.verdicts[key] += 1
            outcome.windows[(message.drive_id, message.window)] += 1
        else:
            outcome.summaries.setdefault(message.drive_id, []).append(message)
    return outcome


def dead_letters(client: redis.Redis, namespace: str = NAMESPACE) -> list[DeadLetter]:
    """The dead-letter stream, decoded."""
    entries = client.xrange(names.dead_letter_name(namespace))
    return [codec.decode(fields[b"d"], DeadLetter) for _, fields in entries]


def assert_complete(outcome: Outcome, reference: Outcome, drives: set[str]) -> None:
    """Every drive's verdicts equal the reference's, once each, with one summary each."""
    assert not outcome.doubled(), f"windows with two verdicts: {outcome.doubled()}"
    assert {d: len(s) for d, s in outcome.summaries.items() if d in drives} == dict.fromkeys(drives, 1)
    lost = reference.keys(drives) - outcome.keys(drives)
    extra = outcome.keys(drives) - reference.keys(drives)
    assert not lost and not extra, f"lost {sorted(lost)}; unexpected {sorted(extra)}"


# -- worker processes ------------------------------------------------------------------------


class Pipeline:
    """Worker processes of each stage on one Redis URL; kills, pauses and restarts them.

    Parameters:
        setup: the shared footage and settings.
        url: the broker URL the workers get with ``--redis``.
        logs: folder for each process's output (printed when a run fails).
    """

    def __init__(self, setup: Setup, url: str, logs: Path) -> None:
        self.setup = setup
        self.url = url
        self.logs = logs
        self.client = sync_client(url)
        self.procs: dict[int, tuple[str, subprocess.Popen]] = {}
        self.started = 0
        #: More environment for the workers started from now on.
        self.extra_env: dict[str, str] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def run(self, drives: list, per_stage: int = 1, split: str = "drive") -> None:
        """Start ``per_stage`` workers of each stage, wait until they are ready, submit
        ``drives`` (one job each, or ``split`` as ``ingest.split`` does)."""
        for stage in (names.INGEST, names.DETECT, names.FUSE):
            self.start(stage, per_stage)
        self.wait_ready()
        submit(self.url, drives, split)

    def start(self, stage: str, count: int = 1) -> None:
        """Start ``count`` workers of ``stage``."""
        for _ in range(count):
            self.started += 1
            log = (self.logs / f"{self.started:02d}-{stage}.log").open("wb")
            command = [sys.executable, "-m", "workers.cli", "worker", stage, "--redis", self.url]
            proc = subprocess.Popen(command, env={**self.setup.env(), **self.extra_env}, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.procs[proc.pid] = (stage, proc)

    def pids(self, stage: str) -> list[int]:
        """Live workers of a stage."""
        return [pid for pid, (s, p) in self.procs.items() if s == stage and p.poll() is None]

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until every live worker has written its health record (it reads its input)."""
        deadline = time.monotonic() + timeout_s
        while True:
            live = {pid for pid, (_, p) in self.procs.items() if p.poll() is None}
            healthy = {int(k.decode().rsplit("-", 2)[1]) for k in self.client.scan_iter(f"{NAMESPACE}:health:*")}
            if live <= healthy:
                return
            self.check_alive()
            assert time.monotonic() < deadline, (
                f"workers not ready: {sorted(live - healthy)}\n{self.log_tail()}"
            )
            time.sleep(0.1)

    def send(self, pid: int, sig: signal.Signals) -> None:
        """Send a signal to one of our workers; a killed one is reaped and forgotten."""
        _, proc = self.procs[pid]
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            proc.wait()
            del self.procs[pid]

    def check_alive(self) -> None:
        """Fail when a worker exited on its own (a crash the test did not cause)."""
        for pid, (stage, proc) in self.procs.items():
            assert proc.poll() is None, (
                f"{stage} worker {pid} exited with {proc.returncode}\n{self.log_tail()}"
            )

    def holders(self, stage: str) -> dict[int, int]:
        """pid -> entries it has pending, for our live workers of ``stage``."""
        held: Counter = Counter()
        for stream in stage_streams(stage):
            try:
                summary = self.client.xpending(stream, stage)
            except redis.ResponseError:  # no such stream or group yet
                continue
            for consumer in summary["consumers"] or []:
                held[consumer_pid(consumer["name"])] += consumer["pending"]
        return {pid: n for pid, n in held.items() if n and pid in self.pids(stage)}

    def wait_for_summaries(
        self,
        drives: set[str],
        on_poll: Callable[[], None] = lambda: None,
        until: Callable[[], bool] = lambda: True,
    ) -> Outcome:
        """Poll until every drive has its summary and ``until()`` holds; ``on_poll`` injects
        faults meanwhile."""
        deadline = time.monotonic() + RUN_DEADLINE_S
        while True:
            try:
                on_poll()
                outcome = read_outcome(self.client)
            except SERVER_DOWN:  # the server is being restarted, or a failover runs
                outcome = Outcome()
            if drives <= outcome.summaries.keys() and until():
                break
            waiting = sorted(drives - outcome.summaries.keys())
            assert time.monotonic() < deadline, (
                f"no summary for {waiting}: verdicts lost\n{self.state_dump()}\n{self.log_tail()}"
            )
            time.sleep(0.05)
        time.sleep(1.0)  # a late duplicate, if any, would land now
        return read_outcome(self.client)

    def state_dump(self) -> str:
        """Per stage stream: its length, and per group its lag and entries pending per
        consumer (which process holds what), for failure messages."""
        lines = []
        for stage in (names.DETECT, names.FUSE):
            for stream in stage_streams(stage):
                try:
                    length = self.client.xlen(stream)
                    groups = self.client.xinfo_groups(stream)
                except redis.ResponseError:
                    continue
                for group in groups:
                    pending = self.client.xpending(stream, group["name"])
                    held = {c["name"].decode() if isinstance(c["name"], bytes) else c["name"]: c["pending"]
                            for c in pending["consumers"] or []}  # fmt: skip
                    lines.append(f"{stream} len={length} group={group['name']} lag={group.get('lag')} "
                                 f"last={group.get('last-delivered-id')} pending={held}")  # fmt: skip
        return "\n".join(lines)

    def log_tail(self, lines: int = 15) -> str:
        """The end of every worker's log, for failure messages."""
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def close(self) -> None:
        """Kill every worker still running."""
        for _, proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
        self.client.close()


def stage_streams(stage: str) -> list[str]:
    """The streams a stage's group reads, every partition of them."""
    count = {names.DETECT: FRAME_PARTITIONS, names.FUSE: FUSE_PARTITIONS}.get(stage)
    hops = names.STAGE_INPUTS[stage]
    if count is None:
        return [names.stream_name(hop, ns=NAMESPACE) for hop in hops]
    return [names.stream_name(hop, p, NAMESPACE) for hop in hops for p in range(count)]


def consumer_pid(name: bytes | str) -> int:
    """The process id in a consumer name (``stage-host-pid-suffix``)."""
    text = name.decode() if isinstance(name, bytes) else name
    return int(text.rsplit("-", 2)[1])


def submit(url: str, drives: list, split: str = "drive") -> None:
    """Queue ingest jobs as ``roadstream submit`` does: one per drive, or ``split``, with
    spans of one 5 s clip (each camera minute of the drives here its own job)."""
    from stream.settings import load_settings
    from workers.cli.ingest import submit_jobs

    settings = load_settings(environ={})
    asyncio.run(submit_jobs(url, NAMESPACE, drives, settings.broker, split=split, span_s=5.0))


@pytest.fixture
def pipeline_factory(setup: Setup, tmp_path: Path) -> Iterator[Callable[[str], Pipeline]]:
    """Makes pipelines on a URL and kills their workers after the test."""
    made: list[Pipeline] = []

    def make(url: str) -> Pipeline:
        made.append(Pipeline(setup, url, tmp_path / f"logs-{len(made)}"))
        return made[-1]

    yield make
    for pipeline in made:
        pipeline.close()


# -- the reference run -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(setup: Setup, redis_server_url: str) -> Outcome:
    """The verdicts of a run with no fault: one worker process of each stage."""
    with redis.Redis.from_url(redis_server_url) as client:
        client.flushdb()
    pipeline = Pipeline(setup, redis_server_url, setup.work / "reference-logs")
    try:
        pipeline.run(setup.drives)
        outcome = pipeline.wait_for_summaries(setup.drive_ids)
    finally:
        pipeline.close()
    assert not outcome.doubled()
    assert {d for d, *_ in outcome.verdicts} == setup.drive_ids
    # The comparison means something only if the verdicts are not all alike.
    assert len({roadwork for _, _, roadwork, _ in outcome.verdicts}) == 2, outcome.verdicts
    return outcome


# -- the tests ---------------------------------------------------------------------------------


class Killer:
    """SIGKILLs workers of each stage while they hold entries, and starts a fresh one each time.

    Parameters:
        pipeline: the workers.
        per_stage: kills of each stage.
        seed: for the choice of victim and the pause between kills.
    """

    def __init__(self, pipeline: Pipeline, per_stage: int, seed: int = 7) -> None:
        self.pipeline = pipeline
        self.left = dict.fromkeys((names.INGEST, names.DETECT, names.FUSE), per_stage)
        self.rng = random.Random(seed)
        self.next_at = time.monotonic()
        self.kills: list[tuple[str, int, int]] = []  # (stage, pid, entries it held)

    def __call__(self) -> None:
        self.pipeline.check_alive()
        if time.monotonic() < self.next_at:
            return
        for stage in self.rng.sample(sorted(self.left), len(self.left)):
            holders = self.pipeline.holders(stage)
            if self.left[stage] and holders:
                victim = self.rng.choice(sorted(holders))
                self.pipeline.send(victim, signal.SIGKILL)
                self.pipeline.start(stage)
                self.kills.append((stage, victim, holders[victim], round(time.monotonic(), 1)))
                self.left[stage] -= 1
                self.next_at = time.monotonic() + self.rng.uniform(0.3, 1.2)
                return


@pytest.fixture(params=list(REDIS_URL_FIXTURES))
def server_url(request: pytest.FixtureRequest) -> str:
    """One Redis server's test database, then the test cluster (both flushed)."""
    return request.getfixturevalue(REDIS_URL_FIXTURES[request.param])


def test_workers_of_every_stage_sigkilled_mid_run_lose_and_double_no_verdict(
    setup, reference, server_url, pipeline_factory
):
    # Given two workers of each stage on the two drives (on one server, then on a cluster),
    # each drive's cameras split into spans of one clip (12 ingest jobs that publish in order)
    pipeline = pipeline_factory(server_url)
    pipeline.run(setup.drives, per_stage=2, split="span")

    # When workers of every stage are SIGKILLed while they hold entries, and restarted
    killer = Killer(pipeline, per_stage=2)
    outcome = pipeline.wait_for_summaries(setup.drive_ids, on_poll=killer)

    # Then every stage was hit mid-work, and each drive has all its verdicts, once: the
    # verdicts of one unsplit job per drive without faults
    assert {kill[0] for kill in killer.kills} == {names.INGEST, names.DETECT, names.FUSE}, killer.kills
    assert_complete(outcome, reference, setup.drive_ids)


def test_redis_killed_and_restarted_with_aof_mid_run_workers_reconnect_and_finish(
    setup, reference, tmp_path, pipeline_factory
):
    # Given a private redis-server with AOF fsynced on every write, and a worker of each stage
    with RedisServers(tmp_path / "redis") as servers:
        server = servers.start(appendonly=True)
        pipeline = pipeline_factory(server.url())
        pipeline.run(setup.drives)

        # When the server is SIGKILLed while detect holds frames, and started again 1 s later
        restarts = []

        def restart_mid_run() -> None:
            pipeline.check_alive()
            if not restarts and pipeline.holders(names.DETECT):
                server.restart(crash=True, down_s=1.0)
                restarts.append(time.monotonic())

        outcome = pipeline.wait_for_summaries(setup.drive_ids, on_poll=restart_mid_run)

        # Then the workers went on by themselves and every verdict came, once
        assert restarts, "the run ended before detect held anything"
        assert_complete(outcome, reference, setup.drive_ids)


@pytest.mark.parametrize(
    ("stage", "down_s"),
    [(names.INGEST, 1.0), (names.INGEST, 5.0), (names.DETECT, 5.0)],
    ids=["ingest-1s", "ingest-5s", "detect-5s"],
)
def test_redis_sigkilled_while_a_stage_holds_entries_and_back_later_loses_and_hangs_nothing(
    setup, reference, tmp_path, pipeline_factory, stage, down_s
):
    # Given a private redis-server with AOF, and a worker of each stage
    with RedisServers(tmp_path / "redis") as servers:
        server = servers.start(appendonly=True)
        pipeline = pipeline_factory(server.url())
        pipeline.run(setup.drives)

        # When the server is SIGKILLed while the stage holds entries, and is back down_s later
        # (ingest: a job mid-drive, whose batch the worker replays after the outage; its
        # first read after the replay may fail again, the server being still down)
        restarts = []

        def restart_mid_run() -> None:
            pipeline.check_alive()
            if not restarts and pipeline.holders(stage):
                server.restart(crash=True, down_s=down_s)
                restarts.append(time.monotonic())

        outcome = pipeline.wait_for_summaries(setup.drive_ids, on_poll=restart_mid_run)

        # Then no worker hung or died: every verdict came, once
        assert restarts, f"the run ended before {stage} held anything"
        assert_complete(outcome, reference, setup.drive_ids)


#: What each failover round kills: the primary of a stream ``stage`` holds entries of.
#: Detect's input (frames), fuse's input (detections), and fuse's output (verdicts).
FAILOVER_ROUNDS = {
    "frames-primary": (names.DETECT, names.FRAMES),
    "detections-primary": (names.FUSE, names.DETECTIONS),
    "verdicts-primary": (names.FUSE, names.VERDICTS),
}
#: Seconds the killed primary stays down before it is started again (as a replica).
FAILOVER_DOWN_S = 4.0


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[RedisClusterServers]:
    """A cluster of this test's own (3 primaries, 3 replicas): the test kills a primary."""
    if REDIS_CLI is None:
        pytest.skip("needs redis-cli on the PATH")
    with RedisClusterServers(tmp_path / "cluster") as cluster:
        yield cluster.start()


class PrimaryKiller:
    """SIGKILLs the cluster primary that serves a stream while ``stage`` holds entries of
    it, then starts that node again ``FAILOVER_DOWN_S`` later (it rejoins as a replica)."""

    def __init__(self, pipeline: Pipeline, cluster: RedisClusterServers, stage: str, hop: str) -> None:
        self.pipeline, self.cluster, self.stage, self.hop = pipeline, cluster, stage, hop
        self.killed: list[tuple[int, str, float]] = []  # (port, stream, when)
        self.restarted = False

    def target(self) -> str | None:
        """The stream whose primary to kill, once ``stage`` holds entries."""
        if not self.pipeline.holders(self.stage):
            return None
        if self.hop == names.VERDICTS:
            return names.stream_name(names.VERDICTS, ns=NAMESPACE)
        for stream in stage_streams(self.stage):
            if f":{self.hop}:" in stream and self.pipeline.client.xpending(stream, self.stage)["pending"]:
                return stream
        return None

    def __call__(self) -> None:
        self.pipeline.check_alive()
        if not self.killed:
            stream = self.target()
            if stream is not None:
                victim = self.cluster.primary_of(stream)
                victim.kill()
                self.killed.append((victim.port, stream, time.monotonic()))
        elif not self.restarted and time.monotonic() > self.killed[0][2] + FAILOVER_DOWN_S:
            port = self.killed[0][0]
            next(n for n in self.cluster.nodes if n.port == port).start()
            self.restarted = True


@pytest.mark.parametrize(("stage", "hop"), list(FAILOVER_ROUNDS.values()), ids=list(FAILOVER_ROUNDS))
def test_a_cluster_primary_killed_mid_run_fails_over_and_loses_and_doubles_no_verdict(
    setup, reference, private_cluster, pipeline_factory, stage, hop
):
    # Given a worker of each stage on a three-primary cluster with a replica each, the
    # workers waiting for a replica to hold their outputs before they ack (as deployed)
    pipeline = pipeline_factory(private_cluster.url())
    pipeline.extra_env = {"ROADSTREAM_BROKER__REPLICA_ACKS": "1"}
    pipeline.run(setup.drives)

    # When the primary of a stream the stage holds entries of is SIGKILLed mid-run
    killer = PrimaryKiller(pipeline, private_cluster, stage, hop)
    outcome = pipeline.wait_for_summaries(setup.drive_ids, on_poll=killer, until=lambda: killer.restarted)

    # Then its replica took over, the workers went on by themselves, and every verdict came once
    assert killer.killed, f"the run ended before {stage} held entries of {hop}"
    private_cluster.wait_ok(timeout_s=30, replicas=0)
    assert killer.killed[0][0] not in [n.port for n in private_cluster.primaries()], "no replica took over"
    lost = reference.keys(setup.drive_ids) - outcome.keys(setup.drive_ids)
    print(f"failover {hop}: killed {killer.killed[0][:2]}; lost {len(lost)}, doubled {len(outcome.doubled())}")
    assert_complete(outcome, reference, setup.drive_ids)


#: How long a paused worker stays stopped at least: past the claim timeout and the lease.
PAUSE_S = 2.0 + 2.0 + 0.5


class Pauser:
    """SIGSTOPs one worker of each stage while it holds entries; SIGCONTs it once the
    other worker of its stage has taken those entries over (or after 15 s)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.paused: dict[str, tuple[int, float]] = {}  # stage -> (pid, when)
        self.resumed: dict[str, int] = {}  # stage -> entries the paused worker still held
        self.last_resume = 0.0

    def __call__(self) -> None:
        self.pipeline.check_alive()
        for stage in (names.INGEST, names.DETECT, names.FUSE):
            if stage not in self.paused:
                holders = self.pipeline.holders(stage)
                if holders:
                    victim = max(holders, key=holders.get)
                    self.pipeline.send(victim, signal.SIGSTOP)
                    self.paused[stage] = (victim, time.monotonic())
            elif stage not in self.resumed:
                self._maybe_resume(stage)

    def _maybe_resume(self, stage: str) -> None:
        pid, since = self.paused[stage]
        waited = time.monotonic() - since
        held = self.pipeline.holders(stage).get(pid, 0)
        if waited > PAUSE_S and (held == 0 or waited > 15):
            self.pipeline.send(pid, signal.SIGCONT)
            self.resumed[stage] = held
            self.last_resume = time.monotonic()

    def done(self) -> bool:
        """Every paused worker resumed, a second ago at least (its late acks are in)."""
        return len(self.resumed) == len(self.paused) and time.monotonic() - self.last_resume > 1.0


def test_workers_paused_past_the_claim_timeout_then_resumed_double_nothing(
    setup, reference, redis_url, pipeline_factory
):
    # Given two workers of each stage on the two drives
    pipeline = pipeline_factory(redis_url)
    pipeline.run(setup.drives, per_stage=2)

    # When one worker of each stage is SIGSTOPped while it holds entries, until the other
    # took them over, and then SIGCONTed (its late publishes and acks go through)
    pauser = Pauser(pipeline)
    outcome = pipeline.wait_for_summaries(setup.drive_ids, on_poll=pauser, until=pauser.done)

    # Then every stage had a worker paused and its entries taken over, and no verdict
    # was lost or doubled
    assert pauser.resumed == dict.fromkeys((names.INGEST, names.DETECT, names.FUSE), 0), pauser.resumed
    assert_complete(outcome, reference, setup.drive_ids)


def poison_entries(client: redis.Redis, setup: Setup, outside: Path) -> dict[str, list[str]]:
    """Put bad entries on the jobs stream and on the frames and detections partitions of a
    good drive.

    Returns:
        Per group, a fragment that each of its dead letters' reasons must contain.
    """
    drive = setup.drives[0]
    jobs = names.stream_name(names.JOBS, ns=NAMESPACE)
    frames = names.stream_name(
        names.FRAMES, names.frame_partition(drive.drive_id, "front", FRAME_PARTITIONS), NAMESPACE
    )
    good_job = drive.to_job().model_dump()
    escaping = {
        **good_job,
        "drive_id": "descape",
        "clips": [{"start": "2024-05-01_10-00-00", "files": {"front": str(outside)}}],
    }
    detections = names.stream_name(
        names.DETECTIONS, names.drive_partition(drive.drive_id, FUSE_PARTITIONS), NAMESPACE
    )
    for stream in (jobs, frames):
        client.xadd(stream, {"d": b"\xc1 not msgpack at all"})
    for stream in (jobs, frames, detections):  # no payload field: written by another program
        client.xadd(stream, {"x": "y"})
    client.xadd(jobs, {"d": msgpack.packb({"k": Job.KIND, "v": 99, "p": good_job})})
    client.xadd(jobs, {"d": codec.encode(Job.model_validate(escaping))})
    ref = FrameRef(drive_id="dpoison", camera="front", clip="2024-05-01_10-00-00", seq=0, tick=0, t=0.0, pts=0.0,
                   blob_key="poison-missing", width=160, height=120)  # fmt: skip
    client.xadd(frames, {"d": msgpack.packb({"k": FrameRef.KIND, "v": 99, "p": ref.model_dump()})})
    client.xadd(frames, {"d": codec.encode(ref)})  # its blob was never stored
    client.set(names.blob_name("poison-garbage", NAMESPACE), b"not a jpeg")
    client.xadd(frames, {"d": codec.encode(ref.copy_with(seq=1, tick=1, t=0.2, blob_key="poison-garbage"))})
    return {
        names.INGEST: [
            "not a msgpack entry",
            "schema version 99",
            "outside the allowed footage roots",
            "has no payload field",
        ],
        names.FUSE: ["has no payload field"],
        names.DETECT: [
            "has no payload field",
            "not a msgpack entry",
            "schema version 99",
            "blob is missing",
            "does not decode as JPEG",
        ],
    }


def test_poison_entries_and_bad_footage_are_dead_lettered_or_reported_and_the_rest_unaffected(
    setup, reference, redis_url, pipeline_factory, tmp_path
):
    # Given bad entries ahead of the good ones on the jobs stream and on a frames partition,
    # and a third drive whose second left_repeater clip is not a video
    from stages.discover import discover

    client = redis.Redis.from_url(redis_url)
    expected = poison_entries(client, setup, outside=tmp_path / "elsewhere.mp4")
    bad = two_clip_drive(setup.footage / "c", "2024-05-03_09-00-00")
    not_a_video(bad.clip(1, "left_repeater"))
    (bad_drive,) = discover(setup.footage / "c").drives
    pipeline = pipeline_factory(redis_url)

    # When the three drives are submitted
    pipeline.run([*setup.drives, bad_drive])
    outcome = pipeline.wait_for_summaries(setup.drive_ids | {bad_drive.drive_id})

    # Then each bad entry is dead-lettered once, by the group it reached, with its reason
    letters = dead_letters(client)
    for group, reasons in expected.items():
        errors = sorted(letter.error for letter in letters if letter.group == group)
        assert len(errors) == len(reasons), errors
        for reason in reasons:
            assert sum(reason in error for error in errors) == 1, (reason, errors)
    # and the good drives' verdicts are the reference's, once each
    assert_complete(outcome, reference, setup.drive_ids)
    # and the drive with the bad clip is summarised once, naming the clip, every window once
    (summary,) = outcome.summaries[bad_drive.drive_id]
    assert any(bad.clip(1, "left_repeater").name in problem for problem in summary.problems), summary.problems
    windows = sorted(w for d, w in outcome.windows if d == bad_drive.drive_id)
    assert windows == sorted({w for d, w, *_ in reference.verdicts if d == setup.drives[0].drive_id})


async def test_entries_read_while_their_partition_is_rebuilt_go_behind_its_replay() -> None:
    # Given a grouping stage (groups of 5, order-sensitive) holding frames 0-2 of a camera,
    # whose partition is rebuilt (as on a reclaim or a takeover) while a read is in flight
    from brokers.memory import MemoryBlobStore, MemoryBroker
    from fixtures.relay import GroupingHandler, frame
    from stream.settings import load_settings
    from workers.runtime import Worker

    broker = MemoryBroker(namespace="race")
    settings = load_settings(environ={}, worker={"batch_size": 8, "max_wait_ms": 20, "heartbeat_s": 60})
    settings = settings.model_copy(update={"namespace": "race"})
    worker = Worker(GroupingHandler(size=5), broker, MemoryBlobStore(), settings, consumer="w")
    partition = names.frame_partition("d1", "front", settings.broker.frame_partitions)
    stream = names.stream_name(names.FRAMES, partition, "race")
    read = broker.read

    async def read_during_a_rebuild(*args: object, **kwargs: object) -> list:
        entries = await read(*args, **kwargs)
        if any(codec.decode(e.data).seq == 3 for e in entries):
            async with worker.own.lock:  # what the heartbeat does, landing mid-read
                await worker.own.rebuild(partition)
        return entries

    broker.read = read_during_a_rebuild
    for seq in range(3):
        await broker.publish(stream, codec.encode(frame("d1", seq)))
    task = asyncio.create_task(worker.run())
    while len(worker.own.held) < 3:
        await asyncio.sleep(0.01)

    # When frames 3-9 arrive through that read
    for seq in range(3, 10):
        await broker.publish(stream, codec.encode(frame("d1", seq)))
    out = names.stream_name("bench-out", ns="race")
    deadline = time.monotonic() + 10
    while len(await broker.range(out)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    worker.stop()
    await task

    # Then the groups hold frames 0-4 and 5-9: the replayed frames came first
    groups = [codec.decode(e.data, FrameRef) for e in await broker.range(out)]
    assert [(g.seq, g.tick) for g in groups] == [(0, 0 + 1 + 2 + 3 + 4), (1, 5 + 6 + 7 + 8 + 9)]


async def test_entries_of_a_read_whose_reply_was_lost_are_replayed_in_order() -> None:
    # Given a grouping stage (groups of 5, order-sensitive) and ten frames of a camera,
    # and a connection that drops after Redis ran the first read but before its reply came
    from brokers.memory import MemoryBlobStore, MemoryBroker
    from fixtures.relay import GroupingHandler, frame
    from stream.errors import BrokerConnectionError
    from stream.settings import load_settings
    from workers.runtime import Worker

    broker = MemoryBroker(namespace="lost")
    settings = load_settings(environ={}, worker={"batch_size": 8, "max_wait_ms": 20, "heartbeat_s": 0.05})
    settings = settings.model_copy(update={"namespace": "lost"})
    worker = Worker(GroupingHandler(size=5), broker, MemoryBlobStore(), settings, consumer="w")
    stream = names.stream_name(names.FRAMES, names.frame_partition("d1", "front", 16), "lost")
    for seq in range(10):
        await broker.publish(stream, codec.encode(frame("d1", seq)))
    read, lost = broker.read, []

    async def read_losing_the_first_reply(*args: object, **kwargs: object) -> list:
        entries = await read(*args, **kwargs)
        if entries and not lost:
            lost.extend(entries)  # delivered to this consumer, never seen by it
            raise BrokerConnectionError("reply lost")
        return entries

    broker.read = read_losing_the_first_reply

    # When the worker runs
    task = asyncio.create_task(worker.run())
    out = names.stream_name("bench-out", ns="lost")
    deadline = time.monotonic() + 10
    while len(await broker.range(out)) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    worker.stop()
    await task

    # Then the lost entries were not skipped: groups hold frames 0-4 and 5-9
    groups = [codec.decode(e.data, FrameRef) for e in await broker.range(out)]
    assert lost and [(g.seq, g.tick) for g in groups] == [(0, 0 + 1 + 2 + 3 + 4), (1, 5 + 6 + 7 + 8 + 9)]
