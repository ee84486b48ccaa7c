"""``roadstream run``'s progress: a rich progress bar in a terminal, log lines when piped.

Frames known are the footage's length (each minute's longest clip, from the headers) times
the sampling rate times the drive's cameras; frames done are those of the windows fuse has
decided (a drive that finished counts whole). Frames per second, footage time and the ETA
follow from them. When the output is not a terminal, one line says each drive that
finished, and one line every ``LOG_EVERY_S`` says where the run stands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

#: Seconds between progress lines when the output is not a terminal.
LOG_EVERY_S = 30.0


def clock(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss``) of a number of seconds."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgress:
    """Follows a run's drives (``workers.run.DriveState``) and shows how far it is.

    Parameters:
        console: where to show it (stderr); a bar when it is a terminal, lines otherwise.
        sample_fps: frames sampled per second per camera.
        footage_s: drive id -> seconds of footage; ``stages.discover.footage_seconds`` of
            each drive at the first update by default.
        now: the clock (tests pass their own).
    """

    def __init__(self, console: Console, sample_fps: float, footage_s: Mapping[str, float] | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.console = console
        self.sample_fps = sample_fps
        self.footage_s: dict[str, float] | None = dict(footage_s) if footage_s is not None else None
        self.cameras: dict[str, int] = {}
        self.now = now
        self.started = now()
        self.known = 0.0
        self._reported: set[str] = set()
        self._logged_at = self.started
        self._bar: Progress | None = None
        self._task: Any = None
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    def __enter__(self) -> RunProgress:
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.fields[frames]} frames"), TextColumn("{task.fields[fps]}"),
                TextColumn("footage {task.fields[footage]}"), TimeRemainingColumn(),
                console=self.console, transient=True,
            )  # fmt: skip
            self._bar.__enter__()
            self._task = self._bar.add_task("run", total=None, frames="0/?", fps="", footage="")
            # Log handlers that write where the bar draws would land on the bar's line (the
            # detect worker's start-up line did): while it shows, they print through the
            # console, which draws them above the bar.
            self._rerouted = [(h, h.setStream(_ConsoleStream(self.console)))
                              for h in logging.getLogger().handlers
                              if isinstance(h, logging.StreamHandler) and h.stream is self.console.file]  # fmt: skip
        return self

    def __exit__(self, *exc: object) -> None:
        for handler, stream in self._rerouted:
            handler.setStream(stream)
        self._rerouted = []
        if self._bar is not None:
            self._bar.__exit__(None, None, None)

    def _measure(self, drives: Mapping[str, Any]) -> None:
        from stages.discover import footage_seconds

        if self.footage_s is None:
            self.footage_s = {d: footage_seconds(s.drive) for d, s in drives.items()}
        self.cameras = {d: max(1, len(s.drive.cameras)) for d, s in drives.items()}
        self.known = sum(t * self.sample_fps * self.cameras[d] for d, t in self.footage_s.items())
        if self._bar is not None:
            self._bar.update(self._task, total=max(self.known, 1))

    def figures(self, drives: Mapping[str, Any]) -> dict[str, float]:
        """Frames done and known, frames per second, footage seconds done and known, ETA."""
        footage_s = self.footage_s or {}
        done_s = {d: footage_s.get(d, 0.0) if s.done else min(s.closed_s, footage_s.get(d, s.closed_s))
                  for d, s in drives.items()}  # fmt: skip
        done = sum(t * self.sample_fps * self.cameras.get(d, 1) for d, t in done_s.items())
        elapsed = max(self.now() - self.started, 1e-9)
        rate = done / elapsed
        eta = (self.known - done) / rate if rate > 0 else float("nan")
        return {"done": done, "known": self.known, "fps": rate, "footage_done": sum(done_s.values()),
                "footage_known": sum(footage_s.values()), "eta": eta}  # fmt: skip

    def line(self, figures: Mapping[str, float]) -> str:
        """One line of where the run stands."""
        eta = "?" if figures["eta"] != figures["eta"] else clock(figures["eta"])
        return (f"progress: {figures['done']:.0f}/{figures['known']:.0f} frames, {figures['fps']:.1f} frames/s, "
                f"footage {clock(figures['footage_done'])}/{clock(figures['footage_known'])}, ETA {eta}")  # fmt: skip

    def update(self, workers: object, drives: Mapping[str, Any]) -> None:
        """``run_footage``'s progress callback: called every poll."""
        if not self.cameras:
            self._measure(drives)
        figures = self.figures(drives)
        if self._bar is not None:
            self._bar.update(self._task, completed=figures["done"], frames=f"{figures['done']:.0f}/{figures['known']:.0f}",
                             fps=f"{figures['fps']:.1f}/s",
                             footage=f"{clock(figures['footage_done'])}/{clock(figures['footage_known'])}")  # fmt: skip
        finished = [d for d, s in drives.items() if s.done and d not in self._reported]
        for drive_id in finished:
            self._reported.add(drive_id)
            self.console.print(escape(_finished_line(drive_id, drives[drive_id], len(self._reported), len(drives))),
                               highlight=False)  # fmt: skip
        if self._bar is None and self.now() - self._logged_at >= LOG_EVERY_S:
            self._logged_at = self.now()
            self.console.print(self.line(figures), highlight=False)


class _ConsoleStream:
    """A text stream for a log handler that prints each line through a rich console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass


def _finished_line(drive_id: str, state: Any, count: int, total: int) -> str:
    if state.summary is not None:
        what = f"{state.summary.roadwork_windows}/{state.summary.windows} roadwork windows"
        name = state.summary.label() if state.summary.drive_name else state.drive.name
    else:
        what, name = f"failed: {state.failure}", state.drive.name
    return f"drive {count}/{total} finished: {name} ({drive_id}), {what}"
