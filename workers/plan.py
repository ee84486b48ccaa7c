"""How many worker processes ``roadstream run`` starts per stage, from the cores and GPUs.

``plan_workers`` is pure (counts in, plan out) so it can be tested for any machine;
``machine_plan`` asks this machine and the settings. The rules:

* detect: one process per GPU, each on a device of its own; one on the CPU without GPUs.
* fuse: one, two from 16 cores (it is light: one window per camera and 2 s of drive).
* vera, vlm: one each when a VLM backend is configured (the engine batches inside).
* ingest: every core left after one each for the detect processes (their host side:
  fetch, JPEG decode, windows) and vera/vlm, and one that fuse and the Redis server
  share; half the cores when detect runs on the CPU (it needs the rest). At least one.
* with ``ingest.decoder = auto`` on a GPU box with NVDEC, ``ingest.nvdec_processes`` of
  the ingest processes per GPU decode with NVDEC (default 1; ``ingest.nvdec_sessions``
  jobs at once each) and, with ``ingest.pyav_beside_nvdec`` (the default), the other
  cores' ingest processes with PyAV; without it, ingest is the NVDEC processes alone.
* fewer than ``PROCESSES_FROM_CORES`` cores and no GPU: one process (``--workers 1``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from stages.devices import AUTO, cuda_device_count
from stages.nvdec import nvdec_unavailable
from stream import names
from stream.errors import ConfigError
from stream.settings import Settings

#: From this many cores, two fuse processes.
FUSE_SECOND_AT = 16
#: Below this many cores and without a GPU, one process does best: worker processes would
#: only share the same cores and each load its models (the sample drive on 2 cores: 63 s
#: with processes, about 30 s in one).
PROCESSES_FROM_CORES = 4


@dataclass(frozen=True)
class Plan:
    """Worker processes per stage, and what each detect and ingest process uses.

    Attributes:
        workers: stage -> process count, in start order.
        detect_devices: the torch device of each detect process (``len == workers["detect"]``).
        nvdec_ingest: how many of the ingest processes decode with NVDEC.
        cores: CPU cores the plan was made for.
        gpus: GPUs the plan was made for.
        single: run every stage in this process, one worker each (``--workers 1``).
    """

    workers: dict[str, int]
    detect_devices: list[str] = field(default_factory=list)
    nvdec_ingest: int = 0
    cores: int = 1
    gpus: int = 0
    single: bool = False

    def describe(self) -> str:
        """The plan in one line, e.g. ``plan (16 cores, 1 GPU): ingest=14 (1 nvdec) detect=1 [cuda:0] fuse=2``."""
        gpus = f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}"
        if self.single:
            return f"plan ({self.cores} cores, {gpus}): one process, one worker per stage"
        parts = []
        for stage, n in self.workers.items():
            text = f"{stage}={n}"
            if stage == names.INGEST and self.nvdec_ingest:
                text += f" ({self.nvdec_ingest} nvdec)"
            if stage == names.DETECT:
                text += f" [{','.join(self.detect_devices)}]"
            parts.append(text)
        return f"plan ({self.cores} cores, {gpus}): {' '.join(parts)}"


def plan_workers(cores: int, gpus: int, stages: Sequence[str], *, nvdec: bool = False,
                 nvdec_per_gpu: int = 1, pyav_beside_nvdec: bool = True) -> Plan:  # fmt: skip
    """Worker processes per stage for a machine.

    Parameters:
        cores: CPU cores this run may use (at least 1).
        gpus: CUDA devices the detector may use (0: detect on the CPU).
        stages: the stages of the run (``workers.run.stages_for``).
        nvdec: ingest may decode with NVDEC (``ingest.decoder`` is ``auto`` or ``nvdec``).
        nvdec_per_gpu: NVDEC ingest processes per GPU (``ingest.nvdec_processes``).
        pyav_beside_nvdec: also PyAV ingest processes on the cores beside the NVDEC ones
            (``ingest.pyav_beside_nvdec``); without, ingest is the NVDEC processes alone.

    Returns:
        The plan; its ``workers`` follow the order of ``stages``.
    """
    cores = max(1, cores)
    if cores < PROCESSES_FROM_CORES and not gpus:
        return single_plan(cores, gpus, stages)
    detect = max(1, gpus)
    fuse = 2 if cores >= FUSE_SECOND_AT else 1
    extras = {s: 1 for s in stages if s in (names.VERA, names.VLM)}
    if gpus:
        # Fuse and redis-server share one core: on an H200 box with 16 cores two fuse
        # processes used 0.2 of a core and the server 0.07 (bench/run_bench.py).
        ingest = cores - detect - sum(extras.values()) - 1
    else:
        ingest = cores // 2
    nvdec_total = gpus * max(0, nvdec_per_gpu) if nvdec else 0
    if nvdec_total and not pyav_beside_nvdec:
        # NVDEC alone: before spans, the PyAV processes beside it took the long drive's
        # camera jobs and became the tail (ingest alone 13.5x against 10.1x on the H200).
        ingest = nvdec_total
    counts = {names.INGEST: max(1, ingest), names.DETECT: detect, names.FUSE: fuse, **extras}
    workers = {s: counts[s] for s in stages if s in counts}
    devices = [f"cuda:{i}" for i in range(gpus)] if gpus else ["cpu"]
    nvdec_ingest = min(nvdec_total, workers.get(names.INGEST, 0))
    return Plan(workers, devices, nvdec_ingest, cores, gpus)


def single_plan(cores: int = 1, gpus: int = 0, stages: Sequence[str] = ()) -> Plan:
    """Every stage in one process, one worker each (``--workers 1``)."""
    return Plan(dict.fromkeys(stages, 1), cores=cores, gpus=gpus, single=True)


def parse_workers(text: str, plan: Plan) -> Plan:
    """Apply ``--workers``: ``1`` (one process) or ``ingest=N,detect=M,…`` over ``plan``.

    A detect count other than the plan's spreads its processes over the plan's devices in
    turn (all on the CPU without GPUs).

    Raises:
        ConfigError: not ``1`` nor ``STAGE=N`` pairs of the run's stages with N ≥ 1.
    """
    text = text.strip()
    if text == "1":
        return replace(plan, single=True, workers=dict.fromkeys(plan.workers, 1), nvdec_ingest=0)
    workers = dict(plan.workers)
    for spec in filter(None, (s.strip() for s in text.split(","))):
        stage, _, count = spec.partition("=")
        if stage not in workers or not count.isdigit() or int(count) < 1:
            message = (f"--workers: expected 1 or STAGE=N,… with STAGE one of {', '.join(workers)} "
                       f"and N ≥ 1, got {spec!r}")  # fmt: skip
            raise ConfigError(message)
        workers[stage] = int(count)
    base = plan.detect_devices or ["cpu"]
    devices = [base[i % len(base)] for i in range(workers.get(names.DETECT, 0))]
    nvdec_ingest = min(plan.nvdec_ingest, workers.get(names.INGEST, 0))
    return replace(plan, workers=workers, detect_devices=devices, nvdec_ingest=nvdec_ingest, single=False)


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_plan(settings: Settings, stages: Sequence[str], *, cores: int | None = None,
                 gpus: int | None = None, nvdec: bool | None = None) -> Plan:  # fmt: skip
    """The plan for this machine and these settings.

    GPUs count only when ``detect.device`` is ``auto``; an explicit device (``cpu``,
    ``cuda:1``) gets one detect process on it.

    Parameters:
        settings: all settings (``detect.device``, ``ingest.decoder``).
        stages: the run's stages.
        cores: override the cores found (tests, benchmarks).
        gpus: override the GPUs found.
        nvdec: override whether NVDEC is usable here (the library and a CUDA device).
            With ``ingest.sample = keyframes`` no ingest process is an NVDEC one.
    """
    cores = usable_cores() if cores is None else cores
    found = cuda_device_count() if gpus is None else gpus
    device = settings.detect.device.strip().lower()
    usable = nvdec if nvdec is not None else nvdec_unavailable() is None
    # Keyframe sampling decodes with PyAV everywhere (FFmpeg skips the non-key frames;
    # NVDEC would decode them all): an NVDEC process would only take 8 jobs at once.
    keyframes = settings.ingest.sample == "keyframes"
    nvdec = settings.ingest.decoder in ("auto", "nvdec") and found > 0 and usable and not keyframes
    ing = settings.ingest
    nvdec_options = {"nvdec_per_gpu": ing.nvdec_processes, "pyav_beside_nvdec": ing.pyav_beside_nvdec}
    if device == AUTO:
        return plan_workers(cores, found, stages, nvdec=nvdec, **nvdec_options)
    plan = plan_workers(cores, 1 if device.startswith("cuda") else 0, stages, nvdec=nvdec, **nvdec_options)
    return replace(plan, detect_devices=[settings.detect.device], gpus=found)
