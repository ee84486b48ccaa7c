"""The worker processes of a planned ``roadstream run``: start, watch, stop.

Each child is ``python -m workers.cli worker STAGE``, given the broker URL in its
environment (``ROADSTREAM_REDIS_URL``: argv is visible to every user) and reading the run's
settings from one file (``ROADSTREAM_CONFIG``) so that ``--set`` and config values reach
it exactly as the parent resolved them. The parent's ``ROADSTREAM_*`` variables are not
passed on: they would win over that file. What differs per child (the detect device, the
ingest decoder) goes in its own environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from stream import names
from stream.errors import RoadstreamError
from stream.settings import CONFIG_ENV, ENV_PREFIX, Settings
from stream.urls import REDIS_URL_ENV
from workers.plan import Plan

#: Seconds a child may take to drain after SIGTERM beyond its grace period.
STOP_SLACK_S = 5.0
#: Lines of a dead child's log quoted in the error.
LOG_TAIL = 15
#: Clips of one job an NVDEC ingest process of ``run`` decodes at once (sessions per job).
NVDEC_PARALLEL_CLIPS = 4
#: Kept from the parent's environment although it has the settings prefix (not a setting).
KEEP_ENV = ("ROADSTREAM_LOG_FORMAT",)


class ChildFailed(RoadstreamError):
    """A worker process exited while the run still needed it."""


@dataclass
class Child:
    """One worker process."""

    stage: str
    index: int
    process: subprocess.Popen
    log: Path


def child_envs(plan: Plan, settings: Settings) -> list[tuple[str, dict[str, str]]]:
    """(stage, environment overrides) of every child process of the plan, in start order.

    Detect child *i* gets ``detect.device`` = ``plan.detect_devices[i]``. With
    ``ingest.decoder = auto``, the first ``plan.nvdec_ingest`` ingest children decode with
    NVDEC and the rest with PyAV.
    """
    out = []
    for stage, count in plan.workers.items():
        for i in range(count):
            env: dict[str, str] = {}
            if stage == names.DETECT and plan.detect_devices:
                env[f"{ENV_PREFIX}DETECT__DEVICE"] = plan.detect_devices[i % len(plan.detect_devices)]
            if stage == names.INGEST:
                # One job at a time, none read ahead: a job waits in the stream for the
                # first free process instead of queueing behind one busy process (on the
                # H200, read-ahead let one process of twelve hold every camera's job: 8.6x).
                env[f"{ENV_PREFIX}WORKER__BATCH_SIZE"] = "1"
                env[f"{ENV_PREFIX}WORKER__PREFETCH"] = "0"
                # A PyAV process's share of the cores: FFmpeg's own choice is a thread per
                # core in every process, and oversubscribed frame threads only queue more
                # frames. With a process per core (run's plan on a GPU box) that is one
                # decoder thread and one clip at a time: on an H200 box with 16 cores such
                # processes used 14.3 cores in ingest alone, each of 2 threads and 2 clips
                # under one, and run went 13.1x -> 14.7x (README, "where the cores went").
                share = max(1, plan.cores // max(1, count))
                if settings.ingest.decoder_threads == 0:
                    env[f"{ENV_PREFIX}INGEST__DECODER_THREADS"] = str(share)
                if settings.ingest.parallel_clips == 0:
                    # With two cores or more a process decodes two clips of a job at once: a
                    # long camera job would otherwise hold one decoder's worth of cores (1.44x
                    # on one 6-clip camera job, 2 cores: bench/ingest_bench.py). NVDEC: four,
                    # a session each (one session decodes 740 frames/s on an H200, four
                    # 2,330: bench/nvdec_bench.py).
                    clips = NVDEC_PARALLEL_CLIPS if i < plan.nvdec_ingest else min(2, share)
                    env[f"{ENV_PREFIX}INGEST__PARALLEL_CLIPS"] = str(clips)
            if stage == names.INGEST and settings.ingest.decoder == "auto":
                env[f"{ENV_PREFIX}INGEST__DECODER"] = "nvdec" if i < plan.nvdec_ingest else "pyav"
            if stage == names.INGEST and i < plan.nvdec_ingest:
                # Several NVDEC sessions per process: one job (camera) per session.
                env[f"{ENV_PREFIX}INGEST__NVDEC_DEVICE"] = f"cuda:{i % max(1, plan.gpus)}"
                env[f"{ENV_PREFIX}WORKER__CONCURRENCY"] = str(settings.ingest.nvdec_sessions)
            out.append((stage, env))
    return out


class Children:
    """The run's worker processes.

    Parameters:
        plan: how many of each stage (``plan.single`` must be false).
        settings: all settings, written to ``folder/settings.json`` for the children.
        url: the broker URL (a Redis server every child can reach).
        folder: where the settings file and each child's log go.
    """

    def __init__(self, plan: Plan, settings: Settings, url: str, folder: Path) -> None:
        self.plan = plan
        self.settings = settings
        self.url = url
        self.folder = Path(folder)
        self.children: list[Child] = []

    def start(self) -> None:
        """Start every child (returns at once; they load models in parallel)."""
        config = self.folder / "settings.json"
        # The URL may hold a password: it goes to the children in their environment, never
        # in argv (seen by every user in ps) nor in the settings file.
        config.write_text(json.dumps(self.settings.model_dump(mode="json", exclude={"redis_url"})))
        base = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) or k in KEEP_ENV}
        base[CONFIG_ENV] = str(config)
        base[REDIS_URL_ENV] = self.url
        for stage, env in child_envs(self.plan, self.settings):
            index = sum(c.stage == stage for c in self.children)
            log = self.folder / f"{stage}-{index}.log"
            command = [sys.executable, "-m", "workers.cli", "worker", stage]
            with log.open("wb") as sink:
                # Their own session: a Ctrl-C at the terminal reaches ``run`` alone, which
                # stops them (``stop``) instead of each draining on its own schedule.
                process = subprocess.Popen(command, env={**base, **env}, stdout=subprocess.DEVNULL, stderr=sink,
                                           start_new_session=True)  # fmt: skip
            self.children.append(Child(stage, index, process, log))

    def check(self) -> None:
        """Raise if a child has exited.

        Raises:
            ChildFailed: naming the stage, its exit code and the end of its log.
        """
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                tail = child.log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
                message = f"the {child.stage} worker process {child.index} exited with {code}: " + "\n".join(tail)
                raise ChildFailed(message)

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM every child (each drains in flight work), then wait; kill stragglers.

        Parameters:
            grace_s: how long to wait before killing; the workers' grace and a slack by default.
        """
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        wait_s = self.settings.worker.grace_s + STOP_SLACK_S if grace_s is None else grace_s
        for child in self.children:
            try:
                child.process.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
