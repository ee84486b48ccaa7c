"""``run``'s progress when piped: a line per finished drive, and one every 30 s with frames
done of known, frames per second, footage time and the ETA (the clock is the test's)."""

from __future__ import annotations

import io

from rich.console import Console

from stages.discover import FoundDrive
from stream.schemas import ClipRef, DriveSummary
from workers.progress import LOG_EVERY_S, RunProgress
from workers.run import DriveState


def state(drive_id: str, stamp: str, cameras: tuple[str, ...]) -> DriveState:
    clip = ClipRef(start=stamp, files={c: f"/f/{stamp}-{c}.mp4" for c in cameras})
    return DriveState(FoundDrive(drive_id=drive_id, root="/f", minutes=[clip]))


def test_piped_progress_logs_each_finished_drive_and_every_30_seconds():
    # Given two drives (60 s with 2 cameras, 30 s with 1) at 5 frames/s, output not a terminal
    out = io.StringIO()
    now = [0.0]
    drives = {"a": state("a", "2024-05-01_10-00-00", ("front", "back")), "b": state("b", "2024-05-02_09-00-00", ("front",))}
    progress = RunProgress(Console(file=out, width=200), 5.0, footage_s={"a": 60.0, "b": 30.0}, now=lambda: now[0])
    with progress:
        # When 20 s of drive a are decided after 10 s / Then nothing yet (under 30 s)
        now[0] = 10.0
        drives["a"].closed_s = 20.0
        progress.update([], drives)
        assert out.getvalue() == ""
        # When 30 s have passed / Then one line: 200 of 750 frames, 6.7/s, footage 0:20 of 1:30, ETA
        now[0] = LOG_EVERY_S
        progress.update([], drives)
        assert out.getvalue().splitlines() == ["progress: 200/750 frames, 6.7 frames/s, footage 0:20/1:30, ETA 1:22"]
        # When drive b finishes / Then one line names it, once
        drives["b"].summary = DriveSummary(drive_id="b", drive_name="2024-05-02_09-00-00", windows=15,
                                           roadwork_windows=2, cameras=["front"], start_utc=0.0, end_utc=30.0)  # fmt: skip
        progress.update([], drives)
        progress.update([], drives)
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["drive 1/2 finished: 2024-05-02_09-00-00 · 1 camera · 30 s (b), 2/15 roadwork windows"]


def test_a_log_line_while_the_bar_shows_prints_above_it_not_on_its_line():
    import logging
    import re

    # Given the progress bar on a terminal, and the root logger writing to that terminal
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    drives = {"a": state("a", "2024-05-01_10-00-00", ("front",))}
    try:
        with RunProgress(console, 5.0, footage_s={"a": 60.0}) as progress:
            progress.update([], drives)
            progress._bar.refresh()  # the bar is on the line now
            # When a worker logs its start-up line
            logging.getLogger("roadstream.startup").warning("detect: model m on cpu")
            progress._bar.refresh()
        after = handler.stream
    finally:
        root.removeHandler(handler)
    # Then the line stands on a line of its own (the bar's line erased first), not after the bar's text
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", out.getvalue()).replace("\r", "\n")
    assert "WARNING roadstream.startup: detect: model m on cpu" in text.splitlines()
    # And once the bar is gone the handler writes to its stream again
    assert after is out
