"""``roadstream verdicts`` (read the verdict stream) and ``roadstream eval`` (score it)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence

import click
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table

from stream.errors import BrokerConnectionError, InputError, RoadstreamError
from stream.schemas import DriveSummary, Verdict



def _out() -> Console:
    # Made per call so that COLUMNS and redirection at call time apply.
    return Console()


#: Below this many columns the verdict table leaves out cameras, anomaly, vlm and GPS.
WIDE_COLUMNS = 120
#: A drive's name is never folded narrower than a TeslaCam stamp (``2024-05-01_10-00-00``).
DRIVE_MIN_WIDTH = 19


def verdict_table(items: Sequence[Verdict | DriveSummary], title: str | None = None,
                  width: int | None = None) -> RenderableType:  # fmt: skip
    """A rich table of verdicts (drive summaries become one summary row each).

    A drive shows as its footage name over its short id. Below ``WIDE_COLUMNS``
    (``width``, the terminal's by default) only drive, window, time, roadwork, confidence
    and objects are shown; columns with nothing in them are left out; text folds, so a
    drive's name is never cut. Where even that table is wider than ``width`` (a narrow
    terminal), each drive gets a table of its own under its name, without the drive column.
    """
    width = width if width is not None else _out().width
    table = _table(items, title, width, with_drive=True)
    # Rich crops whole columns off a table wider than the terminal; drop the widest column
    # (the drive, kept whole) into per-drive titles instead.
    if _fits(_table(items, None, width, with_drive=True), width):
        return table
    by_drive: dict[str, list[Verdict | DriveSummary]] = {}
    for item in items:
        by_drive.setdefault(item.drive_id, []).append(item)
    parts: list[RenderableType] = [title] if title else []
    for drive_id, mine in by_drive.items():
        named = next((i for i in mine if isinstance(i, DriveSummary) and i.drive_name), None)
        name = named.label() if named else next((i.drive_name for i in mine if i.drive_name), "")
        heading = f"{escape(name)} [dim]{drive_id[:8]}[/dim]" if name else drive_id
        parts.append(_table(mine, heading, width, with_drive=False))
    return Group(*parts)


def _fits(table: Table, width: int) -> bool:
    # Rich measures a table as at most the width it is given, then crops the columns that
    # do not fit; its top-right corner is drawn only when the whole table fits.
    console = Console(width=width)
    top = console.render_lines(table, console.options, pad=False)[0]
    return "".join(segment.text for segment in top).rstrip().endswith(("┓", "┐"))


def _table(items: Sequence[Verdict | DriveSummary], title: str | None, width: int, *, with_drive: bool) -> Table:
    rows = [(_row(item), isinstance(item, DriveSummary)) for item in items]
    names = ["drive", "win", "time (s)", "roadwork", "conf", "objects", "cameras", "anomaly", "vlm", "gps"]
    keep = [i for i, name in enumerate(names) if i < 6 or (width >= WIDE_COLUMNS and any(r[i] for r, _ in rows))]
    keep = keep if with_drive else keep[1:]
    table = Table(title=title)
    for i in keep:
        name = names[i]
        table.add_column(name, justify="right" if name in ("win", "conf", "anomaly") else "left", overflow="fold",
                         min_width=DRIVE_MIN_WIDTH if name == "drive" else None)  # fmt: skip
    for row, summary in rows:
        table.add_row(*(row[i] for i in keep), style="bold" if summary else None)
    return table


def _drive_cell(drive_id: str, name: str, label: str | None = None) -> str:
    return f"{escape(label or name)}\n[dim]{drive_id[:8]}[/dim]" if name or label else drive_id


def _row(item: Verdict | DriveSummary) -> list[str]:
    if isinstance(item, DriveSummary):
        # The unit goes with the figures only: "spans: none", never "none s".
        spans = ", ".join(f"{s.t_start:.0f}–{s.t_end:.0f}" for s in item.spans)
        spans = f"{spans} s" if spans else "none"
        label = item.label() if item.drive_name else None
        return [_drive_cell(item.drive_id, item.drive_name, label), "", "summary",
                f"{item.roadwork_windows}/{item.windows} windows", "", f"spans: {spans}",
                ", ".join(item.cameras), "", "", ""]  # fmt: skip
    objects = ", ".join(f"{k}×{n}" for k, n in item.objects.items())
    gps = f"{item.gps.lat:.5f},{item.gps.lon:.5f}{'~' if item.gps.estimated else ''}" if item.gps else ""
    vlm = ("yes" if item.vlm.roadwork else "no") if item.vlm else ("asked" if item.escalated else "")
    anomaly = f"{item.anomaly_score:.2f}" if item.anomaly_score is not None else ""
    roadwork = "[red]ROADWORK[/red]" if item.roadwork else "-"
    return [_drive_cell(item.drive_id, item.drive_name), str(item.window), f"{item.t_start:.1f}–{item.t_end:.1f}",
            roadwork, f"{item.confidence:.2f}", objects, ", ".join(item.cameras), anomaly, vlm, gps]  # fmt: skip


def _json_line(entry_id: str, item: Verdict | DriveSummary) -> str:
    return json.dumps({"id": entry_id, "kind": item.KIND, **item.model_dump(mode="json")})


async def _print_verdicts(url: str, namespace: str, follow: bool, as_json: bool, from_id: str) -> None:
    from workers.client import VerdictClient

    async with VerdictClient.from_url(url, namespace=namespace) as client:
        batch: list = []
        async for item in client.read(from_id=from_id, follow=follow):
            if as_json:
                print(_json_line(item.id, item.message), flush=True)
                continue
            batch.append(item.message)
            if follow:  # a row as it arrives; the last id shown lets the reader resume
                _out().print(verdict_table(batch, title=f"up to {item.id}"))
                batch = []
        if batch or (not as_json and not follow):
            _out().print(verdict_table(batch, title=f"{len(batch)} entries"))


def _load_verdicts(verdicts_file: str | None, url: str, namespace: str) -> list[Verdict]:
    if verdicts_file:
        from stages.report import read_verdicts

        try:
            return read_verdicts(verdicts_file)
        except (OSError, ValueError) as exc:
            message = f"verdicts file {verdicts_file}: {exc}"
            raise click.ClickException(message) from exc

    async def fetch() -> list[Verdict]:
        from workers.client import VerdictClient

        async with VerdictClient.from_url(url, namespace=namespace) as client:
            return [i.message async for i in client.read() if isinstance(i.message, Verdict)]

    return asyncio.run(fetch())


def _metrics_table(level: str, m) -> Table:
    table = Table(title=f"{level} level: {m.n} compared")
    for name in ("MCC", "accuracy", "precision", "recall"):
        table.add_column(name, justify="right")
    table.add_row(f"{m.mcc:.3f}", f"{m.accuracy:.3f}", f"{m.precision:.3f}", f"{m.recall:.3f}")
    confusion = Table(title="confusion matrix")
    confusion.add_column("")
    confusion.add_column("predicted roadwork", justify="right")
    confusion.add_column("predicted none", justify="right")
    confusion.add_row("true roadwork", str(m.tp), str(m.fn))
    confusion.add_row("true none", str(m.fp), str(m.tn))
    grid = Table.grid(padding=(0, 4))
    grid.add_row(table, confusion)
    return grid


def _fit(verdicts: list[Verdict], labels, path: str, min_overlap: float) -> None:
    from stages.calibration import fit_coefficients, save_coefficients
    from stages.evaluate import window_pairs
    from stages.fuse import FEATURES

    pairs = [(v, t) for v, t in window_pairs(verdicts, labels, min_overlap) if v.features]
    try:
        coefficients = fit_coefficients([v.features for v, _ in pairs], [t for _, t in pairs], FEATURES)
    except ValueError as exc:
        message = f"cannot fit: {exc}"
        raise click.ClickException(message) from exc
    save_coefficients(path, coefficients)
    _out().print(f"fitted on {len(pairs)} windows, written to {path}; use it with --set fuse.calibration={path}")


def register(cli: click.Group) -> None:
    """Add ``verdicts`` and ``eval`` to the root command."""
    from workers.cli import redis_option, settings_from

    @cli.command()
    @redis_option
    @click.option("--follow", "-f", is_flag=True, help="Wait for new verdicts.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object a line (with its entry id).")
    @click.option("--from", "from_id", default="0", metavar="ID", help="Start after this entry id.")
    @click.pass_context
    def verdicts(ctx: click.Context, redis: str | None, follow: bool, as_json: bool, from_id: str) -> None:
        """Print the verdicts stream as a table (or JSON lines)."""
        settings = settings_from(ctx, redis)
        try:
            asyncio.run(_print_verdicts(settings.redis_url, settings.namespace, follow, as_json, from_id))
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokerConnectionError:
            raise  # the root group names the URL
        except RoadstreamError as exc:
            raise click.ClickException(str(exc)) from exc

    @cli.command("eval")
    @click.option("--labels", "labels_file", required=True, type=click.Path(dir_okay=False), help="CSV or JSON labels.")
    @click.option("--verdicts", "verdicts_file", type=click.Path(dir_okay=False), help="A verdicts.jsonl file.")
    @redis_option
    @click.option("--level", type=click.Choice(["window", "drive", "both"]), default="both")
    @click.option("--min-overlap", type=float, default=0.5, help="Share of a window labels must cover.")
    @click.option("--fit", "fit_path", metavar="FILE", help="Fit fuse's coefficients and write them here.")
    @click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
    @click.pass_context
    def evaluate_cmd(ctx: click.Context, labels_file: str, verdicts_file: str | None, redis: str | None,
                     level: str, min_overlap: float, fit_path: str | None, as_json: bool) -> None:  # fmt: skip
        """Compare verdicts with labels: MCC, accuracy, precision, recall, confusion matrix."""
        from stages.evaluate import evaluate, load_labels, match_labels

        from workers.cli import console, masked

        settings = settings_from(ctx, redis, uses_redis=verdicts_file is None)
        # Say where the verdicts come from (stderr; in --json, a "source" key): without
        # --verdicts they are a Redis stream's, maybe of another run than the user thinks.
        source = (f"verdicts file {verdicts_file}" if verdicts_file else
                  f"the verdicts stream at {masked(settings.redis_url)}")  # fmt: skip
        if not as_json:
            hint = "" if verdicts_file else " (--verdicts FILE reads a verdicts.jsonl instead)"
            console.print(f"eval: reading verdicts from {escape(source)}{hint}", highlight=False)
        try:
            labels = load_labels(labels_file)
            verdicts_ = _load_verdicts(verdicts_file, settings.redis_url, settings.namespace)
        except BrokerConnectionError:
            raise  # the root group names the URL
        except (InputError, RoadstreamError) as exc:
            raise click.ClickException(str(exc)) from exc
        n_labels = len(labels)
        labels, unmatched = match_labels(labels, verdicts_)
        if unmatched:
            click.echo(f"labels that matched no drive ({len(unmatched)}; keys are drive ids, event folders or "
                       f"first clips): {', '.join(unmatched)}", err=True)  # fmt: skip
        levels = ["window", "drive"] if level == "both" else [level]
        results = {lv: evaluate(verdicts_, labels, lv, min_overlap) for lv in levels}
        if not any(m.n for m in results.values()):
            # All-zero figures would read as a result; nothing was compared, which is an error.
            drives = len({v.drive_id for v in verdicts_})
            message = (f"no label matched any verdict: nothing to compare ({n_labels} labels, "
                       f"{len(verdicts_)} verdicts of {drives} drive{'s' * (drives != 1)} from {source})")  # fmt: skip
            raise click.ClickException(message)
        if as_json:
            print(json.dumps({**{lv: m.as_dict() for lv, m in results.items()}, "unmatched_labels": unmatched, "source": source}))
        else:
            for lv, m in results.items():
                _out().print(_metrics_table(lv, m))
        if fit_path:
            _fit(verdicts_, labels, fit_path, min_overlap)
