"""The ``roadstream`` command.

Commands that bind stages to a broker live here (the design put the CLI in ``stream/``,
but a command that runs a worker must import ``workers``, which ``stream`` may not).
Each stage's own commands live in this package's modules (``workers/cli/<name>.py``),
registered below; they import torch, PyAV or transformers only inside their functions.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from stream import names
from stream.errors import (
    BrokerAuthError,
    BrokerConnectionError,
    BrokerError,
    BrokerPermissionError,
    ConfigError,
    RoadstreamError,
)
from stream.urls import masked
from stream.settings import Settings, load_settings
from stream.urls import REDIS_URL_ENV
from workers.logs import configure as configure_logs

#: Modules whose ``register(cli)`` adds their commands.
COMMAND_MODULES: tuple[str, ...] = (
    "workers.cli.ingest",
    "workers.cli.detect",
    "workers.cli.models",
    "workers.cli.verdicts",
    "workers.cli.run",
    "workers.cli.vlm",
)

console = Console(stderr=True)

#: Where ``settings_from`` leaves the broker URL a command uses, for error messages.
URL_META = "roadstream.redis_url"


def unreachable(url: str | None, exc: BrokerError) -> str:
    """One line: which broker could not be reached or refused us, and why (the client's own words)."""
    reason = str(exc.__cause__ or exc).strip() or type(exc.__cause__ or exc).__name__
    where = masked(url) if url else "the configured URL"
    if isinstance(exc, BrokerAuthError):
        return f"Redis at {where} refused the credentials: {reason}"
    if isinstance(exc, BrokerPermissionError):
        return f"Redis at {where} denies this user a command or key (ACL): {reason}"
    return f"cannot reach Redis at {where}: {reason}"


class RoadstreamGroup(click.Group):
    """The root group: an unreachable or refusing broker ends any command with one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        """Run the command; turn broker connection, credential and ACL errors into one line."""
        try:
            return super().invoke(ctx)
        except (BrokerConnectionError, BrokerAuthError, BrokerPermissionError) as exc:
            raise click.ClickException(unreachable(ctx.meta.get(URL_META), exc)) from exc


def parse_overrides(pairs: tuple[str, ...]) -> dict[str, Any]:
    """Turn ``--set detect.batch=8`` pairs into nested override dicts.

    Raises:
        click.BadParameter: a pair has no ``=``.
    """
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            message = f"expected SECTION.KEY=VALUE, got {pair!r}"
            raise click.BadParameter(message, param_hint="--set")
        node = tree
        *path, leaf = key.strip().split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def settings_from(ctx: click.Context, redis: str | None = None, *, uses_redis: bool = True,
                  **overrides: Any) -> Settings:  # fmt: skip
    """Settings from the file and environment, the root options and a command's own.

    A command that uses Redis (``uses_redis``) says on stderr which server it uses when
    nothing named one (the default URL).
    """
    root = ctx.find_root().params
    merged = parse_overrides(root.get("set_") or ())
    for section, values in overrides.items():
        if isinstance(values, dict):
            merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        settings = load_settings(config_file=root.get("config"), redis_url=redis, **merged)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
    ctx.meta[URL_META] = settings.redis_url  # meta is shared by the whole context chain
    if uses_redis and "redis_url" not in settings.model_fields_set:
        console.print(f"using Redis at {escape(masked(settings.redis_url))} (the default; --redis or "
                      "ROADSTREAM_REDIS_URL names another)", highlight=False)  # fmt: skip
    return settings


def redis_option(func: Any) -> Any:
    """``--redis URL`` with the env fallback ROADSTREAM_REDIS_URL (via the settings)."""
    return click.option(
        "--redis",
        "redis",
        metavar="URL",
        default=None,
        help="Broker URL: redis://, rediss://user:pass@host, unix:///path, redis+cluster://host:port, memory://name "
        "[env: ROADSTREAM_REDIS_URL]",
    )(func)


@click.group(cls=RoadstreamGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), help="TOML or YAML settings [env: ROADSTREAM_CONFIG]")
@click.option("--set", "set_", multiple=True, metavar="SECTION.KEY=VALUE", help="Override one setting.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="ROADSTREAM_LOG_FORMAT",
    show_envvar=True,
    help="json: one object a line, with stage, drive and window fields.",
)
def cli(config: str | None, set_: tuple[str, ...], verbose: int, log_format: str) -> None:
    """roadstream: TeslaCam footage in, roadwork verdicts out, over Redis Streams."""
    configure_logs(logging.WARNING - 10 * min(verbose, 2), log_format)


@cli.command()
@click.argument("stage", type=click.Choice(names.STAGES))
@redis_option
@click.option("--concurrency", type=int, default=None, help="Batches in flight (stateless stages).")
@click.option("--batch-size", type=int, default=None, help="Entries per batch at most.")
@click.option("--max-wait-ms", type=int, default=None, help="Longest wait to fill a batch.")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics, /live, /ready here.")
@click.option("--metrics-host", default=None, help="Interface for them (default 127.0.0.1; 0.0.0.0: all).")
@click.option("--burst", is_flag=True, help="Exit once the input is drained.")
@click.pass_context
def worker(ctx: click.Context, stage: str, redis: str | None, burst: bool, **options: Any) -> None:
    """Run one worker of STAGE until SIGTERM/SIGINT."""
    settings = settings_from(ctx, redis, worker=options)
    if stage == names.INGEST:  # before the stage's imports: a CPU decoder yields the cores from its start
        from workers.priority import lower_ingest_priority

        lower_ingest_priority(settings)
    from workers.supervisor import run_workers

    try:
        workers = asyncio.run(run_workers({stage: 1}, settings, url=settings.redis_url, burst=burst))
    except BrokerConnectionError:
        raise  # the root group names the URL
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc
    for done in workers:
        console.print(f"{done.consumer}: {done.counts}")


@cli.command()
@click.argument("specs", nargs=-1, required=True, metavar="STAGE=N…")
@redis_option
@click.option("--processes", is_flag=True, help="One process per worker instead of asyncio tasks.")
@click.pass_context
def supervise(ctx: click.Context, specs: tuple[str, ...], redis: str | None, processes: bool) -> None:
    """Run N workers of each stage, e.g. ``supervise ingest=2 detect=1 fuse=1``."""
    stages = {}
    for spec in specs:
        stage, _, count = spec.partition("=")
        if stage not in names.STAGES or not count.isdigit():
            message = f"expected STAGE=N with STAGE one of {', '.join(names.STAGES)}, got {spec!r}"
            raise click.BadParameter(message)
        stages[stage] = int(count)
    settings = settings_from(ctx, redis)
    # Children would each fail and be restarted forever: a broker that is not there stops
    # the supervisor at once (one line from the root group).
    asyncio.run(check_reachable(settings))
    if processes:
        from workers.supervisor import run_processes

        root = ctx.find_root().params
        prefix = [arg for s in root.get("set_") or () for arg in ("--set", s)]
        if root.get("config"):
            prefix += ["--config", root["config"]]
        # The URL may hold a password: children get it in their environment, not argv.
        env = {**os.environ, REDIS_URL_ENV: settings.redis_url}
        sys.exit(run_processes(stages, prefix=prefix, env=env))
    from workers.supervisor import run_workers

    try:
        asyncio.run(run_workers(stages, settings, url=settings.redis_url))
    except RoadstreamError as exc:
        raise click.ClickException(str(exc)) from exc


async def check_reachable(settings: Settings) -> None:
    """Raise ``BrokerConnectionError`` when the settings' broker does not answer."""
    from brokers.connect import connect

    broker, blobs = connect(settings.redis_url, namespace=settings.namespace, settings=settings.broker)
    try:
        await broker.get_value(f"{settings.namespace}:reachable")
    finally:
        await blobs.close()
        await broker.close()


# -- status -----------------------------------------------------------------------------


async def collect_status(url: str, settings: Settings) -> dict[str, Any]:
    """Per stream and group: length, lag, pending, consumers; dead letters; owners; workers."""
    from brokers.connect import connect

    broker, blobs = connect(url, namespace=settings.namespace, settings=settings.broker)
    try:
        ns = settings.namespace
        streams = []
        for name in sorted(await broker.streams(f"{ns}:*")):
            stats = await broker.stats(name)
            streams.append(
                {
                    "stream": name,
                    "length": stats.length,
                    "groups": [
                        {"group": g.name, "lag": g.lag, "pending": g.pending, "consumers": g.consumers}
                        for g in stats.groups
                    ],
                }
            )
        owners: dict[str, dict[int, str | None]] = {}
        for group, count in ((names.DETECT, settings.broker.frame_partitions), (names.FUSE, settings.broker.fuse_partitions)):
            owners[group] = {p: await broker.lease_owner(names.lease_name(group, p, ns)) for p in range(count)}
        workers = []
        for key in sorted(await broker.keys(f"{ns}:health:*")):
            raw = await broker.get_value(key)
            if raw:
                workers.append(json.loads(raw))
        dead = next((s["length"] for s in streams if s["stream"] == broker.dead_letter_stream), 0)
        return {"streams": streams, "dead_letters": dead, "owners": owners, "workers": workers, "at": time.time()}
    finally:
        await blobs.close()
        await broker.close()


def _empty(stream: dict[str, Any]) -> bool:
    """No entries, and no group with anything to do."""
    return stream["length"] == 0 and not any(g["lag"] or g["pending"] for g in stream["groups"])


def status_tables(status: dict[str, Any], previous: dict[str, Any] | None, show_all: bool = False) -> Table:
    """Render a status snapshot (empty streams only with ``show_all``); with a previous
    one, per-stage throughput too."""
    shown = [s for s in status["streams"] if show_all or not _empty(s)]
    hidden = len(status["streams"]) - len(shown)
    caption = f"{hidden} empty stream(s) hidden (--all shows them)" if hidden else None
    table = Table(title=f"roadstream — dead letters: {status['dead_letters']}", caption=caption, expand=False)
    for column in ("stream", "length", "group", "lag", "pending", "consumers"):
        table.add_column(column, justify="left" if column in ("stream", "group") else "right")
    for stream in shown:
        groups = stream["groups"] or [{"group": "-", "lag": "-", "pending": "-", "consumers": "-"}]
        for g in groups:
            table.add_row(stream["stream"], str(stream["length"]), g["group"], str(g["lag"]), str(g["pending"]), str(g["consumers"]))
    workers = Table(title="workers")
    for column in ("group", "consumer", "in", "out", "failed", "dead", "rate/s", "partitions"):
        workers.add_column(column)
    before = {w["consumer"]: w for w in (previous or {}).get("workers", [])}
    for w in status["workers"]:
        rate = "-"
        old = before.get(w["consumer"])
        # A record from another version of the worker may lack a count: shown as 0, not a crash.
        counts = w.get("counts") or {}
        if old and w["at"] > old["at"]:
            rate = f"{(counts.get('in', 0) - (old.get('counts') or {}).get('in', 0)) / (w['at'] - old['at']):.1f}"
        parts = ",".join(map(str, w["partitions"])) if w.get("partitions") is not None else "-"
        cells = (str(counts.get(k, 0)) for k in ("in", "out", "failed", "dead"))
        workers.add_row(w["group"], w["consumer"], *cells, rate, parts)
    outer = Table.grid()
    outer.add_row(table)
    outer.add_row(workers)
    owned = Table(title="partition owners")
    owned.add_column("group")
    owned.add_column("owners")
    for group, owners in status["owners"].items():
        owned.add_row(group, " ".join(f"{p}:{(o or '-').split('-')[-1]}" for p, o in owners.items()))
    outer.add_row(owned)
    return outer


@cli.command()
@redis_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object for machines.")
@click.option("--watch", is_flag=True, help="Refresh until interrupted.")
@click.option("--interval", type=float, default=2.0, show_default=True)
@click.option("--all", "show_all", is_flag=True, help="Show empty streams too (--json always has them).")
@click.pass_context
def status(ctx: click.Context, redis: str | None, as_json: bool, watch: bool, interval: float,
           show_all: bool) -> None:  # fmt: skip
    """Streams, groups, lag, pending, dead letters, partition owners and workers."""
    settings = settings_from(ctx, redis)
    out = Console()
    snapshot = asyncio.run(collect_status(settings.redis_url, settings))
    if as_json:
        click.echo(json.dumps(snapshot))
        return
    if not watch:
        out.print(status_tables(snapshot, None, show_all))
        return
    with Live(status_tables(snapshot, None, show_all), console=out, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                current = asyncio.run(collect_status(settings.redis_url, settings))
                live.update(status_tables(current, snapshot, show_all))
                snapshot = current
        except KeyboardInterrupt:
            pass


# -- dead letters -------------------------------------------------------------------------


@cli.group()
def deadletters() -> None:
    """List, show and requeue dead-lettered entries."""


async def _dead_letters(url: str, settings: Settings, ids: tuple[str, ...] = (), count: int = 100) -> list[tuple[str, Any]]:
    from brokers.connect import connect
    from stream import codec
    from stream.schemas import DeadLetter

    broker, blobs = connect(url, namespace=settings.namespace, settings=settings.broker)
    try:
        if ids:
            entries = [e for i in ids for e in await broker.range(broker.dead_letter_stream, start=i, end=i, count=1)]
        else:
            entries = await broker.range(broker.dead_letter_stream, count=count)
        return [(e.id, codec.decode(e.data, DeadLetter)) for e in entries]
    finally:
        await blobs.close()
        await broker.close()


@deadletters.command("list")
@redis_option
@click.option("--count", type=int, default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def deadletters_list(ctx: click.Context, redis: str | None, count: int, as_json: bool) -> None:
    """The oldest dead letters, with their reasons."""
    settings = settings_from(ctx, redis)
    letters = asyncio.run(_dead_letters(settings.redis_url, settings, count=count))
    if as_json:
        for letter_id, letter in letters:
            click.echo(json.dumps({"id": letter_id, **letter.model_dump(mode="json", exclude={"raw"})}))
        return
    table = Table(title=f"{len(letters)} dead letters")
    for column in ("id", "stream", "group", "deliveries", "error"):
        table.add_column(column, overflow="fold")
    for letter_id, letter in letters:
        table.add_row(letter_id, letter.stream, letter.group, str(letter.deliveries), letter.error)
    Console().print(table)


@deadletters.command("show")
@click.argument("ids", nargs=-1, required=True)
@redis_option
@click.pass_context
def deadletters_show(ctx: click.Context, ids: tuple[str, ...], redis: str | None) -> None:
    """Everything about some dead letters, with the original entry decoded where it can be."""
    from stream import codec
    from stream.errors import DecodeError

    settings = settings_from(ctx, redis)
    letters = asyncio.run(_dead_letters(settings.redis_url, settings, ids))
    for letter_id, letter in letters:
        record = {"id": letter_id, **letter.model_dump(mode="json", exclude={"raw"})}
        try:
            record["entry"] = codec.decode(letter.raw).model_dump(mode="json")
        except DecodeError as exc:
            record["entry"] = {"undecodable": exc.reason, "bytes": letter.raw[:200].hex()}
        click.echo(json.dumps(record, indent=2))
    missing = [i for i in ids if i not in {letter_id for letter_id, _ in letters}]
    if missing:
        message = f"no dead letter {', '.join(missing)} (`roadstream deadletters list` shows their ids)"
        raise click.ClickException(message)


async def _requeue(url: str, settings: Settings, ids: tuple[str, ...]) -> int:
    from brokers.connect import connect

    letters = await _dead_letters(url, settings, ids, count=10_000)
    broker, blobs = connect(url, namespace=settings.namespace, settings=settings.broker)
    try:
        for letter_id, letter in letters:
            await broker.publish(letter.stream, letter.raw)
            await broker.delete_entries(broker.dead_letter_stream, [letter_id])
        return len(letters)
    finally:
        await blobs.close()
        await broker.close()


@deadletters.command("requeue")
@click.argument("ids", nargs=-1)
@click.option("--all", "requeue_all", is_flag=True, help="Requeue every dead letter.")
@redis_option
@click.pass_context
def deadletters_requeue(ctx: click.Context, ids: tuple[str, ...], requeue_all: bool, redis: str | None) -> None:
    """Put dead letters back on the streams they came from (after a fix)."""
    if not ids and not requeue_all:
        raise click.UsageError("name dead-letter ids, or pass --all")
    settings = settings_from(ctx, redis)
    moved = asyncio.run(_requeue(settings.redis_url, settings, () if requeue_all else ids))
    console.print(f"requeued {moved} entries")


def _register_commands() -> None:
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(cli)


def main() -> None:
    """Console entry point."""
    _register_commands()
    cli(prog_name="roadstream")
