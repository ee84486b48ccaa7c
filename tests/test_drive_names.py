"""Drives people can recognise: the footage name (event folder, else first clip's local
time), camera count and minutes beside the id, in verdicts, summaries, the run table and
the report; drives by time; labels keyed by footage."""

from __future__ import annotations

import json
import re

from click.testing import CliRunner
from rich.console import Console

from fixtures.teslacam import ClipSpec, make_drive
from stages.discover import discover
from stages.evaluate import Label, match_labels
from stages.fuse import Fuser
from stages.report import write_report
from stream.schemas import DriveMarker, DriveSummary, FrameDetections, Verdict
from workers.cli import _register_commands, cli
from workers.cli.verdicts import verdict_table

SPEC = ClipSpec(duration_s=1.0, fps=10.0, size=(64, 48))


def test_a_drive_is_named_by_its_event_folder_else_its_first_clip(tmp_path):
    # Given an event folder and a flat RecentClips folder
    make_drive(tmp_path / "TeslaCam" / "SavedClips" / "2024-06-02_08-15-30", start="2024-06-02_08-14-00",
               cameras=("front", "back"), minutes=1, spec=SPEC, layout="flat")  # fmt: skip
    make_drive(tmp_path, start="2024-06-03_17-00-00", cameras=("front",), minutes=1, spec=SPEC, layout="recent")
    # When discovered / Then the event folder's name, and the first clip's local time
    names = sorted(d.name for d in discover(tmp_path).drives)
    assert names == ["2024-06-02_08-15-30", "2024-06-03_17-00-00"]


def _frame(camera: str, tick: int) -> FrameDetections:
    return FrameDetections(drive_id="d1", camera=camera, seq=tick, tick=tick, t=tick * 0.5, blob_key=f"k{camera}{tick}")


def test_fuse_puts_the_drive_s_name_and_times_on_verdicts_and_summary():
    # Given ingest's markers naming the drive and giving its UTC span
    cams = ["front", "back"]
    started = [DriveMarker(drive_id="d1", event="started", camera=c, cameras=cams, name="2024-06-02_08-15-30",
                           start_utc=1_000.0) for c in cams]  # fmt: skip
    ended = [DriveMarker(drive_id="d1", event="ended", camera=c, cameras=cams, name="2024-06-02_08-15-30",
                         start_utc=1_000.0, end_utc=1_090.0, frame_counts={c: 8}) for c in cams]  # fmt: skip
    fuser = Fuser()
    outputs = []
    for i, msg in enumerate([*started, *(_frame(c, t) for t in range(8) for c in cams), *ended]):
        outputs += fuser.add(msg, token=(msg.KIND, i), now=0.0).outputs
    # Then every verdict and the summary carry the name; the summary says 2 cameras, 1.5 min
    verdicts = [o for o in outputs if isinstance(o, Verdict)]
    (summary,) = [o for o in outputs if isinstance(o, DriveSummary)]
    assert verdicts and {v.drive_name for v in verdicts} == {"2024-06-02_08-15-30"}
    assert summary.label() == "2024-06-02_08-15-30 · 2 cameras · 1.5 min"


def _verdict(drive: str, name: str, utc: float, window: int = 0) -> Verdict:
    return Verdict(drive_id=drive, drive_name=name, window=window, t_start=window * 2.0, t_end=window * 2.0 + 2,
                   start_utc=utc + window * 2.0, roadwork=True, confidence=0.9, objects={"cone": 2})  # fmt: skip


def _summary(drive: str, name: str, utc: float) -> DriveSummary:
    return DriveSummary(drive_id=drive, drive_name=name, windows=1, roadwork_windows=1,
                        cameras=["front", "back", "left_pillar"], start_utc=utc, end_utc=utc + 120)  # fmt: skip


def test_report_and_files_order_drives_by_time_and_show_their_names(tmp_path):
    # Given two drives whose ids sort against their times
    verdicts = [_verdict("aaa", "2024-06-03_17-00-00", 2_000.0), _verdict("zzz", "2024-06-02_08-15-30", 1_000.0)]
    summaries = [_summary("aaa", "2024-06-03_17-00-00", 2_000.0), _summary("zzz", "2024-06-02_08-15-30", 1_000.0)]
    # When the outputs are written
    paths = write_report(tmp_path, verdicts, summaries, {})
    # Then the earlier drive comes first everywhere, by its name beside its id
    page = paths["html"].read_text()
    titles = re.findall(r"<h2>(.*?)</h2>", page)
    assert titles[0].startswith("2024-06-02_08-15-30 · 3 cameras · 2.0 min") and "zzz" in titles[0]
    assert titles[1].startswith("2024-06-03_17-00-00")
    lines = [json.loads(line) for line in paths["verdicts"].read_text().splitlines()]
    assert [(v["drive_id"], v["drive_name"]) for v in lines] == [("zzz", "2024-06-02_08-15-30"), ("aaa", "2024-06-03_17-00-00")]
    assert [json.loads(line)["drive_name"] for line in paths["drives"].read_text().splitlines()][0] == "2024-06-02_08-15-30"


def test_the_verdict_table_at_80_columns_keeps_drive_names_whole():
    # Given verdicts and a summary of a named drive, with long camera lists
    items = [_verdict("d609982467024", "2024-05-01_10-00-00", 0.0, w) for w in range(3)]
    items = [v.copy_with(cameras=["front", "left_pillar", "right_pillar", "right_repeater"]) for v in items]
    items.append(_summary("d609982467024", "2024-05-01_10-00-00", 0.0))
    # When printed on an 80-column terminal
    console = Console(width=80, record=True)
    console.print(verdict_table(items, title="3 verdicts", width=80))
    text = console.export_text()
    # Then no line is wider, nothing is cut with an ellipsis, and the name and short id show
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text
    assert text.count("2024-05-01_10-00-00") == 4 and "d6099824" in text
    assert "ROADWORK" in text and "0.90" in text and "cone×2" in text


def test_the_verdict_table_on_a_narrower_terminal_keeps_every_column_and_the_name_whole():
    # Given the same verdicts and summary, on a 60-column terminal (too narrow for the drive column)
    items = [_verdict("d609982467024", "2024-05-01_10-00-00", 0.0, w) for w in range(3)]
    items.append(_summary("d609982467024", "2024-05-01_10-00-00", 0.0))
    console = Console(width=60, record=True)
    console.print(verdict_table(items, title="3 verdicts", width=60))
    text = console.export_text()
    # Then no column is cropped off: the drive's name heads its own table, whole, and the
    # objects column is still there
    assert max(len(line) for line in text.splitlines()) <= 60
    assert "…" not in text and "2024-05-01_10-00-00" in text and "d6099824" in text
    assert "objects" in text and "cone×2" in text and text.count("ROADWORK") == 3


def test_labels_keyed_by_event_folder_or_first_clip_match_drives_and_misses_are_named():
    # Given verdicts of two named drives and labels keyed by drive id, event folder and clip
    verdicts = [_verdict("aaa", "2024-06-03_17-00-00", 0.0), _verdict("zzz", "2024-06-02_08-15-30", 0.0)]
    labels = [Label("2024-06-02_08-15-30", True), Label("2024-06-03_17-00-00-front.mp4", False),
              Label("aaa", False), Label("2023-01-01_00-00-00", True)]  # fmt: skip
    # When matched / Then each names its drive by id, and the one that matched nothing is listed
    matched, unmatched = match_labels(labels, verdicts)
    assert [(lab.drive_id, lab.label) for lab in matched] == [("zzz", True), ("aaa", False), ("aaa", False)]
    assert unmatched == ["2023-01-01_00-00-00"]


def test_eval_reads_an_event_label_csv_and_says_which_labels_matched_no_drive(tmp_path):
    # Given verdicts.jsonl of two named drives and an event,label CSV
    write_report(tmp_path, [_verdict("aaa", "2024-06-03_17-00-00", 0.0), _verdict("zzz", "2024-06-02_08-15-30", 0.0)], [], {})
    (tmp_path / "labels.csv").write_text("event,label\n2024-06-02_08-15-30,1\n2024-06-03_17-00-00,0\nnowhere,1\n")
    _register_commands()
    # When evaluated
    result = CliRunner().invoke(cli, ["eval", "--labels", str(tmp_path / "labels.csv"),
                                      "--verdicts", str(tmp_path / "verdicts.jsonl"), "--level", "drive"])  # fmt: skip
    # Then two drives were compared, and the stray label is named
    assert result.exit_code == 0, result.output
    assert "drive level: 2 compared" in result.output
    assert "labels that matched no drive (1; keys are drive ids, event folders or first clips): nowhere" in result.output


def test_a_summary_row_gives_its_spans_in_seconds_or_says_none():
    from stream.schemas import RoadworkSpan
    from workers.cli.verdicts import _row

    # Given a drive summary without roadwork spans, and one with two
    bare = _summary("d609982467024", "2024-05-01_10-00-00", 0.0)
    spans = [RoadworkSpan(t_start=0.0, t_end=6.0, confidence=0.9), RoadworkSpan(t_start=10.0, t_end=12.0, confidence=0.8)]
    # Then the first says "none" with no unit after it, the second its spans in seconds
    assert "spans: none" in _row(bare) and not any("none s" in cell for cell in _row(bare))
    assert "spans: 0–6, 10–12 s" in _row(bare.copy_with(spans=spans))


def test_eval_with_no_label_matching_any_verdict_says_so_and_fails(tmp_path):
    # Given verdicts of one drive and labels that name only other drives
    write_report(tmp_path, [_verdict("aaa", "2024-06-03_17-00-00", 0.0)], [], {})
    (tmp_path / "labels.csv").write_text("event,label\nnowhere,1\nelsewhere,0\n")
    _register_commands()
    # When evaluated
    result = CliRunner().invoke(cli, ["eval", "--labels", str(tmp_path / "labels.csv"),
                                      "--verdicts", str(tmp_path / "verdicts.jsonl")])  # fmt: skip
    # Then it names its source, says nothing was compared, and exits non-zero without figures
    assert result.exit_code == 1, result.output
    assert f"reading verdicts from verdicts file {tmp_path / 'verdicts.jsonl'}" in result.output.replace("\n", "")
    assert "no label matched any verdict: nothing to compare (2 labels, 1 verdicts of 1 drive" in result.output
    assert "MCC" not in result.output


def test_eval_without_verdicts_file_says_it_reads_the_default_redis_stream(tmp_path, monkeypatch):
    # Given no --verdicts and no Redis named (the stream read itself is stubbed out)
    import workers.cli.verdicts as cli_verdicts

    monkeypatch.delenv("ROADSTREAM_REDIS_URL", raising=False)
    monkeypatch.setattr(cli_verdicts, "_load_verdicts", lambda *a: [_verdict("aaa", "2024-06-03_17-00-00", 0.0)])
    (tmp_path / "labels.csv").write_text("event,label\n2024-06-03_17-00-00,1\n")
    _register_commands()
    result = CliRunner().invoke(cli, ["eval", "--labels", str(tmp_path / "labels.csv"), "--level", "drive"])
    # Then it says which stream it reads, that the URL is the default, and how to name another
    text = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "using Redis at redis://127.0.0.1:6379/0 (the default;" in text
    assert "eval: reading verdicts from the verdicts stream at redis://127.0.0.1:6379/0 (--verdicts FILE" in text
