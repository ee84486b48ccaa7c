"""``roadstream submit FOOTAGE``: find the drives, then put one ingest job per drive on the jobs hop.

Discovery runs first, so a folder with no footage is refused at once (exit code 2) and
nothing is queued. Jobs carry a dedupe key per drive id: submitting the same footage twice
queues each drive once. Encrypted clips and unusable names are listed, not queued.
"""

from __future__ import annotations

import asyncio
import sys
import time

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

#: Exit code for "nothing to ingest" (usage-like error, as click uses for bad arguments).
NO_FOOTAGE_EXIT = 2

console = Console(stderr=True)


async def submit_jobs(url: str, namespace: str, drives: list, broker_settings, progress=None,
                      split: str = "drive", span_s: float | None = None) -> list[str]:  # fmt: skip
    """Publish each drive's jobs (``split``: one per drive, per camera, or per camera and
    span of ``span_s`` footage seconds, ``stages.jobs``); returns the entry id of each (the
    old one for a repeat)."""
    from brokers.connect import connect
    from stages.jobs import SPAN_S, split_job
    from stream import codec, names
    from workers.run import submit_key

    broker, blobs = connect(url, namespace=namespace, settings=broker_settings)
    stream = names.stream_name(names.JOBS, ns=namespace)
    entry_ids = []
    try:
        await broker.ensure_group(stream, names.INGEST)
        for drive in drives:
            for job in split_job(drive.to_job(submitted_utc=time.time()), split, span_s or SPAN_S):
                entry_ids.append(await broker.publish(stream, codec.encode(job), dedupe_key=submit_key(job)))
            if progress is not None:
                progress()
    finally:
        await broker.close()
        await blobs.close()
    return entry_ids


def _drive_table(drives: list) -> Table:
    table = Table(title="drives")
    for column in ("drive", "first minute", "minutes", "cameras", "event"):
        table.add_column(column)
    for drive in drives:
        event = (drive.event or {}).get("reason", "")
        table.add_row(drive.drive_id, drive.minutes[0].start, str(len(drive.minutes)), ",".join(drive.cameras), event)
    return table


def register(cli: click.Group) -> None:
    """Add ``submit`` to the roadstream command group."""

    @cli.command()
    @click.argument("footage", type=click.Path(exists=False))
    @click.option("--redis", "redis", metavar="URL", default=None,
                  help="Broker URL: redis://, rediss://, unix://, redis+cluster://, memory://name [env: ROADSTREAM_REDIS_URL]")
    @click.option("--dry-run", is_flag=True, help="Only list the drives found.")
    @click.pass_context
    def submit(ctx: click.Context, footage: str, redis: str | None, dry_run: bool) -> None:
        """Find the drives in FOOTAGE and queue their ingest jobs (per drive, camera or span: ``ingest.split``)."""
        from stages.discover import discover
        from stream.errors import FootageError
        from workers.cli import check_reachable, settings_from

        settings = settings_from(ctx, redis, uses_redis=not dry_run)
        if not dry_run:
            asyncio.run(check_reachable(settings))  # before the drive table: one line if not
        try:
            found = discover(footage)
        except FootageError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(NO_FOOTAGE_EXIT)
        for problem in found.problems:
            click.echo(f"skipped: {problem}", err=True)
        for note in found.notes:
            click.echo(f"note: {note}", err=True)
        if not found.drives:
            click.echo(f"error: {found.root}: no TeslaCam footage found "
                       "(expected YYYY-MM-DD_HH-MM-SS-<camera>.mp4 clips)", err=True)
            sys.exit(NO_FOOTAGE_EXIT)
        console.print(_drive_table(found.drives))
        if dry_run:
            return
        entry_ids = _submit_with_progress(settings, found.drives)
        click.echo(f"queued {len(found.drives)} drive(s) as {len(entry_ids)} job(s) on {settings.namespace}:jobs "
                   f"({found.duplicates} repeated minute(s) skipped)")


def _submit_with_progress(settings, drives: list) -> list[str]:
    run = lambda step: asyncio.run(  # noqa: E731 - one place for both branches
        submit_jobs(settings.redis_url, settings.namespace, drives, settings.broker, step, settings.ingest.split,
                    settings.ingest.span_s)
    )
    if not console.is_terminal:
        return run(None)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("submitting", total=len(drives))
        return run(lambda: progress.advance(task))
