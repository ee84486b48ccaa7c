"""``roadstream run FOOTAGE``: the whole pipeline in one command (see ``workers.run``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import click
from rich.console import Console
from rich.markup import escape

from stream.urls import masked

#: Exit code when there is nothing to run on (as ``roadstream submit``).
NO_FOOTAGE_EXIT = 2
#: Exit code of an interrupted run (128 + SIGINT, as shells report it).
INTERRUPTED_EXIT = 130


def _sigterm_as_sigint(signum: int, frame: object) -> None:
    # SIGTERM takes the Ctrl-C path: asyncio.run cancels the run, which stops its workers
    # and its private Redis and removes its temporary folders on the way out.
    signal.raise_signal(signal.SIGINT)


def _exit_interrupted() -> None:
    """Exit 130 at once. The workers, the private Redis and the temporary folders are gone
    by now; a CPU forward pass still running in a thread would hold a normal exit for
    seconds, and half-built objects would print warnings as they are collected."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(INTERRUPTED_EXIT)


def _print_interrupted(console: Console, exc) -> None:
    """What an interrupted run had finished."""
    console.print(f"[yellow]{escape(str(exc))}[/yellow]; nothing written")
    for drive_id, state in sorted(exc.drives.items(), key=lambda kv: (kv[1].drive.name, kv[0])):
        if state.summary is not None:
            console.print(f"  finished: {escape(state.summary.label())} ({drive_id}), "
                          f"{state.summary.roadwork_windows}/{state.summary.windows} roadwork windows")  # fmt: skip


def _print_result(console: Console, result) -> None:
    from stages.report import drive_order
    from workers.cli.verdicts import verdict_table

    summaries = [s.summary for s in result.drives.values() if s.summary is not None]
    order = drive_order(result.verdicts, summaries)
    rows = [item for d in order for item in [*(v for v in result.verdicts if v.drive_id == d),
                                             *(s for s in summaries if s.drive_id == d)]]  # fmt: skip
    console.print(verdict_table(rows, title=f"{len(result.verdicts)} verdicts", width=console.width))
    for drive_id, state in sorted(result.drives.items(), key=lambda kv: (kv[1].drive.name, kv[0])):
        if state.failure and state.summary is None:
            console.print(f"[yellow]drive {state.drive.name}[/yellow] ({drive_id}): {escape(state.failure)}")
        for problem in state.summary.problems if state.summary else []:
            console.print(f"[yellow]drive {state.drive.name}[/yellow] ({drive_id}): {escape(problem)}")
    console.print(f"done in {result.seconds:.1f} s on {masked(result.broker)}; wrote "
                  + ", ".join(str(p) for p in result.paths.values()))  # fmt: skip


def register(cli: click.Group) -> None:
    """Add ``run`` to the root command."""
    from workers.cli import check_reachable, redis_option, settings_from

    @cli.command()
    @click.argument("footage", type=click.Path())
    @redis_option
    @click.option("--out", "out_dir", default="roadstream-out", show_default=True, type=click.Path(file_okay=False),
                  help="Output folder (verdicts.jsonl, verdicts.csv, drives.jsonl, drives.geojson, report.html).")  # fmt: skip
    @click.option("--save-frames", is_flag=True, help="Also write the key frames with their boxes into OUT/frames/.")
    @click.option("--save-video", is_flag=True, help="Also write an annotated video of each roadwork span into OUT/videos/.")
    @click.option("--timeout", "timeout_s", type=float, default=None, help="Give up after this many seconds.")
    @click.option("--workers", "workers", default=None, metavar="1|STAGE=N,…",
                  help="Worker processes: 1 runs every stage in this process; ingest=12,detect=2 "
                       "overrides the plan made from the cores and GPUs.")  # fmt: skip
    @click.pass_context
    def run(ctx: click.Context, footage: str, redis: str | None, out_dir: str, save_frames: bool,
            save_video: bool, timeout_s: float | None, workers: str | None) -> None:  # fmt: skip
        """Run every stage over FOOTAGE and write the verdicts and a report.

        Without --redis (or ROADSTREAM_REDIS_URL) a private redis-server is started on a
        Unix socket when one is installed, else the embedded in-process broker is used
        (which runs every stage in this process). Worker processes per stage follow the
        cores and GPUs found, shown in one line; --workers overrides them.
        """
        from stream.errors import FootageError, RoadstreamError
        from workers.progress import RunProgress
        from workers.run import (
            NoFootage,
            RunInterrupted,
            private_broker,
            run_footage,
            shipped_models,
        )

        signal.signal(signal.SIGTERM, _sigterm_as_sigint)

        console = Console(stderr=True)
        url = redis or os.environ.get("ROADSTREAM_REDIS_URL")
        # The shipped detector and scorer unless the config names others.
        settings = shipped_models(settings_from(ctx, url, uses_redis=False))
        if url:  # a named broker that does not answer: one line, before any work
            asyncio.run(check_reachable(settings))

        def on_plan(plan) -> None:  # after discovery found drives, before anything starts
            console.print(escape(f"detector: {settings.detect.model}; frame scorer: {settings.detect.scorer or 'off'}"))
            if not settings.vlm.backend:
                console.print("no vision-language model configured (vlm.backend): vera and vlm are off; "
                              "verdicts come from the detector and the frame scorer")  # fmt: skip
            console.print(escape(plan.describe()))

        def on_broker(used: str) -> None:
            line = f"broker: {masked(used)}"
            # run's own server only (a --redis unix:// URL is the user's): the bounds it was
            # started with, not recomputed (the machine's free memory moves meanwhile).
            if (private := private_broker(used)) is not None:
                gib = private.maxmemory / 2**30
                line += f" (private redis-server, memory bound {gib:.1f} GiB, no persistence)"
            console.print(escape(line))

        try:
            with RunProgress(console, settings.ingest.sample_fps) as progress:
                result = run_footage(footage, settings, out_dir, url=url, workers=workers, progress=progress.update,
                                     timeout_s=timeout_s, on_broker=on_broker,
                                     on_plan=on_plan, save_frames=save_frames, save_video=save_video)  # fmt: skip
        except RunInterrupted as exc:
            _print_interrupted(console, exc)
            _exit_interrupted()
        except KeyboardInterrupt:  # outside the run's event loop (discovery, starting Redis)
            console.print("[yellow]interrupted before any drive finished[/yellow]; nothing written")
            _exit_interrupted()
        except (FootageError, NoFootage) as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(NO_FOOTAGE_EXIT)
        except RoadstreamError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        for problem in result.found.problems:
            console.print(f"skipped: {problem}")
        for note in [*result.found.notes, *result.video_notes]:
            console.print(f"note: {escape(note)}")
        _print_result(Console(), result)

