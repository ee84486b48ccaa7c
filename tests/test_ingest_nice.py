"""A CPU-decoding ingest worker process lowers its priority (``ingest.nice``); an NVDEC one does not.

``os.nice`` cannot be undone, so nothing here calls it in the pytest process: the worker
command runs in a child process, and the failure path patches ``os.nice``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stream.errors import ConfigError
from stream.settings import IngestSettings, Settings, load_settings
from workers.children import child_envs
from workers.logs import STARTUP_LOGGER
from workers.plan import plan_workers
from workers.priority import ingest_niceness, lower_ingest_priority

ROOT = Path(__file__).parent.parent
NO_NVDEC = "no CUDA device"  # what nvdec_unavailable() says on a box without a GPU
NVDEC = None  # ... and on a GPU box with PyNvVideoCodec


def settings(decoder: str, nice: int | None = None, **ingest: str) -> Settings:
    if nice is not None:
        ingest["nice"] = nice
    return Settings(ingest=IngestSettings(decoder=decoder, **ingest))


@pytest.mark.parametrize(
    ("decoder", "nice", "unavailable", "expected"),
    [
        ("pyav", None, NO_NVDEC, 10),  # the default
        ("pyav", None, NVDEC, 10),  # a PyAV process on a GPU box decodes on the CPU all the same
        ("decord", None, NVDEC, 10),
        ("pyav", 7, NO_NVDEC, 7),
        ("pyav", 0, NO_NVDEC, 0),  # 0 leaves the priority alone
        ("decord", 0, NO_NVDEC, 0),
        ("nvdec", None, NVDEC, 0),  # NVDEC: its CPU work feeds the GPU decoder
        ("auto", None, NVDEC, 0),  # auto on a GPU box with the library decodes with NVDEC
        ("auto", None, NO_NVDEC, 10),  # auto without NVDEC decodes with PyAV
        ("auto", 0, NO_NVDEC, 0),
        ("nvdec", None, NO_NVDEC, 10),  # nvdec asked, unavailable: the worker decodes with PyAV
    ],
)
def test_the_niceness_follows_the_decoder_the_worker_will_use(decoder, nice, unavailable, expected) -> None:
    assert ingest_niceness(settings(decoder, nice), unavailable) == expected


@pytest.mark.parametrize("decoder", ["auto", "nvdec"])
@pytest.mark.parametrize("pyav_anyway", [{"sample": "keyframes"}, {"encoding": "raw"}])
def test_an_nvdec_process_that_decodes_with_pyav_all_the_same_is_niced(decoder, pyav_anyway) -> None:
    # Keyframe sampling and raw frames go through PyAV even in an NVDEC ingest process
    assert ingest_niceness(settings(decoder, **pyav_anyway), NVDEC) == 10
    assert ingest_niceness(settings(decoder), NVDEC) == 0


@pytest.mark.parametrize("nice", [-1, 20])
def test_a_niceness_outside_0_to_19_is_refused(nice: int) -> None:
    with pytest.raises(ConfigError, match="ingest.nice"):
        load_settings(environ={"ROADSTREAM_INGEST__NICE": str(nice)})


def test_runs_nvdec_children_keep_their_priority_and_its_pyav_children_lower_theirs() -> None:
    # Given run's plan on a GPU box with NVDEC: one NVDEC ingest child beside PyAV ones
    plan = plan_workers(16, 1, ["ingest", "detect", "fuse"], nvdec=True, pyav_beside_nvdec=True)
    envs = [env for stage, env in child_envs(plan, Settings()) if stage == "ingest"]
    # When each child's settings are read as the child reads them (NVDEC available there)
    nice = [ingest_niceness(load_settings(environ=env), NVDEC) for env in envs]
    # Then the NVDEC child keeps its priority and every PyAV one is niced by the default
    assert plan.nvdec_ingest == 1
    assert nice == [0] + [10] * (len(envs) - 1)


def test_a_failing_os_nice_is_logged_and_the_worker_goes_on(monkeypatch, caplog) -> None:
    # Given an os.nice that is refused (patched: the real one cannot be undone)
    def refused(increment: int) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "nice", refused)
    caplog.set_level(logging.INFO, logger=STARTUP_LOGGER)
    # When a PyAV worker applies its niceness / Then nothing is raised, none was applied, and it says why
    assert lower_ingest_priority(settings("pyav")) == 0
    (record,) = [r for r in caplog.records if r.name == STARTUP_LOGGER]
    assert record.levelno == logging.WARNING and "Operation not permitted" in record.getMessage()


#: Runs ``roadstream worker ingest --burst`` on an embedded broker in this child process,
#: NVDEC's availability fixed by argv[1], and prints the niceness before and after.
WORKER = textwrap.dedent(
    """
    import os, sys
    import stages.nvdec
    unavailable = None if sys.argv[1] == "nvdec" else "no CUDA device"
    stages.nvdec.nvdec_unavailable = lambda: unavailable
    from workers.cli import cli
    before = os.nice(0)
    cli.main(["worker", "ingest", "--redis", "memory://nice-test", "--burst"], standalone_mode=False)
    print("niceness", before, os.nice(0))
    """
)


@pytest.mark.parametrize(
    ("decoder", "box", "rise"),
    [
        ("pyav", "no-nvdec", 7),
        ("pyav", "nvdec", 7),
        ("auto", "no-nvdec", 7),
        ("nvdec", "nvdec", 0),
        ("auto", "nvdec", 0),
    ],
)
def test_the_worker_command_nices_a_cpu_decoding_ingest_process(tmp_path: Path, decoder: str, box: str,
                                                                 rise: int) -> None:  # fmt: skip
    parent = os.nice(0)  # reads the niceness, changes nothing
    if parent + 7 > 19:
        pytest.skip(f"the test process already runs at niceness {parent}")
    # Given a worker ingest process with ingest.nice=7 and a decoder
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROADSTREAM_")}
    env.update(PYTHONPATH=str(ROOT), ROADSTREAM_INGEST__NICE="7", ROADSTREAM_INGEST__DECODER=decoder)
    # When it starts and drains its (empty) input
    done = subprocess.run([sys.executable, "-c", WORKER, box], check=False, capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("niceness ")]
    before, after = map(int, line.split()[1:])
    # Then its niceness rose by 7 from the parent's when it decodes on the CPU, not at all with NVDEC
    assert before == parent
    assert after == parent + rise
    # and it said so in one start-up line, or said nothing
    said = [line for line in done.stderr.splitlines() if "roadstream.startup: ingest: niceness" in line]
    assert len(said) == (1 if rise else 0), done.stderr
