"""The pure fuse stage: windows, watermarks, cross-view counting, escalation, summaries."""

from __future__ import annotations

from stages.fuse import FEATURES, Fuser, confidence, dedupe_key, fused_counts, parse_overlaps
from stream.schemas import (
    AnomalyScore,
    Detection,
    DriveMarker,
    DriveSummary,
    Escalation,
    FrameDetections,
    Telemetry,
    Verdict,
    VlmAnswer,
    VlmAnswerBody,
)
from stream.settings import FuseSettings

CAMS = ("front", "back")


def cone(x: float = 0.5, kind: str = "cone") -> Detection:
    return Detection(type=kind, label=kind, score=0.9, box=(x - 0.05, 0.5, x + 0.05, 0.6))


def frame(cam: str, tick: int, dets=(), prob=None, lat=None, drive="d1") -> FrameDetections:
    tel = Telemetry(lat=lat, lon=lat) if lat is not None else None
    return FrameDetections(
        drive_id=drive, camera=cam, seq=tick, tick=tick, t=tick * 0.5, blob_key=f"{drive}:{cam}:{tick}",
        detections=list(dets), roadwork_prob=prob, telemetry=tel, model="yolo-test",
    )  # fmt: skip


def started(cams=CAMS, drive="d1") -> list[DriveMarker]:
    return [DriveMarker(drive_id=drive, event="started", camera=c, cameras=list(cams)) for c in cams]


def ended(cam: str | None, cams=CAMS, drive="d1", **kw) -> DriveMarker:
    return DriveMarker(drive_id=drive, event="ended", camera=cam, cameras=list(cams), **kw)


def feed(fuser: Fuser, messages, now: float = 0.0):
    outputs, released = [], []
    for i, msg in enumerate(messages):
        step = fuser.add(msg, token=(msg.KIND, i), now=now)
        outputs += step.outputs
        released += step.release
    return outputs, released


def verdicts(outputs) -> list[Verdict]:
    return [o for o in outputs if isinstance(o, Verdict)]


def test_window_waits_for_every_camera_watermark():
    # Given a 2 s window and frames at 0.5 s ticks from two cameras
    fuser = Fuser(FuseSettings(window_s=2.0))
    # When only the front camera has passed the window's end
    out, _ = feed(fuser, started() + [frame("front", t) for t in range(5)] + [frame("back", t) for t in range(4)])
    # Then nothing closes; once the back camera passes it, window 0 closes alone
    assert verdicts(out) == []
    out, released = feed(fuser, [frame("back", 4)])
    assert [v.window for v in verdicts(out)] == [0]
    assert len(released) == 8  # the 4 + 4 frames of window 0


def test_drive_end_closes_every_window_and_summarises_once():
    # Given a drive of two cameras, roadwork seen in the second window
    fuser = Fuser()
    msgs = [frame(c, t, dets=[cone(), cone(0.4)] if t >= 4 else [], lat=1.0) for t in range(8) for c in CAMS]
    # When both cameras' end markers arrive
    out, released = feed(fuser, msgs + [ended("front"), ended("back")])
    # Then each window has one verdict and the summary lists one roadwork span
    vs = verdicts(out)
    assert [v.window for v in vs] == [0, 1]
    assert [v.roadwork for v in vs] == [False, True]
    (summary,) = [o for o in out if isinstance(o, DriveSummary)]
    assert summary.windows == 2 and summary.roadwork_windows == 1
    assert [(s.t_start, s.t_end) for s in summary.spans] == [(2.0, 4.0)]
    assert summary.spans[0].track and not summary.spans[0].estimated
    assert len(released) == len(msgs) + 2


def test_same_cone_in_overlapping_edges_counts_once():
    # Given front's left edge overlapping left_pillar's right edge
    overlaps = parse_overlaps([["front", "left", "left_pillar", "right"]])
    # When one cone lies in both edges, and another in the middle of each camera
    shared = fused_counts({"front": [cone(0.1)], "left_pillar": [cone(0.9)]}, overlaps, 0.3)
    apart = fused_counts({"front": [cone(0.5)], "left_pillar": [cone(0.5)]}, overlaps, 0.3)
    # Then the shared cone counts once, the separate ones twice
    assert shared == {"cone": 1}
    assert apart == {"cone": 2}


def test_overlap_edge_listed_twice_is_refused():
    # Given a layout that names front's left edge twice / Then it is refused, naming it
    try:
        parse_overlaps([["front", "left", "back", "right"], ["front", "left", "left_pillar", "right"]])
    except ValueError as exc:
        assert "front" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_stalled_camera_window_closes_after_watermark_timeout():
    # Given a back camera that stops after its first frame
    fuser = Fuser(FuseSettings(watermark_timeout_s=30.0))
    feed(fuser, [frame("back", 0)] + [frame("front", t) for t in range(6)], now=100.0)
    # When the timeout has not passed, then passed
    early = fuser.tick(now=120.0)
    late = fuser.tick(now=131.0)
    # Then the window closes only after it
    assert early.outputs == []
    assert [v.window for v in verdicts(late.outputs)] == [0, 1]


def test_frame_after_its_window_closed_is_released_and_reported():
    # Given window 0 closed by timeout
    fuser = Fuser(FuseSettings(watermark_timeout_s=1.0))
    feed(fuser, [frame("front", 0), frame("back", 0)], now=0.0)
    fuser.tick(now=5.0)
    # When a frame of window 0 arrives late, then the drive ends
    step = fuser.add(frame("back", 1), token="late", now=6.0)
    out, _ = feed(fuser, [ended("front"), ended("back")], now=6.0)
    # Then it is released at once and the summary says so
    assert step.release == ["late"] and step.outputs == []
    (summary,) = [o for o in out if isinstance(o, DriveSummary)]
    assert any("after their window closed" in p for p in summary.problems)


def test_uncertain_window_escalates_then_uses_the_answer():
    # Given coefficients that put a one-cone window in the uncertain band
    settings = FuseSettings(coefficients={"bias": -1.0, "objects": 1.4, "vlm": 6.0})
    fuser = Fuser(settings, escalate=True)
    msgs = [frame(c, t, dets=[cone()] if c == "front" else []) for t in range(5) for c in CAMS]
    # When the window's evidence is complete
    out, released = feed(fuser, msgs)
    # Then an escalation goes out with key frames and no verdict yet
    (esc,) = out
    assert isinstance(esc, Escalation) and 0.4 <= esc.confidence <= 0.6
    assert {f.camera for f in esc.frames} == set(CAMS)
    assert not any(r[0] == "detections" and r[1] < 8 for r in released)
    # When the VLM answers yes
    answer = VlmAnswer(drive_id="d1", window=0, answer=VlmAnswerBody(roadwork=True, confidence=0.9), model="vlm-x")
    step = fuser.add(answer, token="answer", now=1.0)
    # Then the verdict carries the answer and a higher confidence
    (verdict,) = verdicts(step.outputs)
    assert verdict.escalated and verdict.vlm and verdict.roadwork and verdict.confidence > esc.confidence
    assert verdict.models["vlm"] == "vlm-x" and "answer" in step.release


def test_unanswered_escalation_closes_after_vlm_timeout():
    # Given an escalated window and no answer
    settings = FuseSettings(coefficients={"bias": -1.0, "objects": 1.4}, vlm_timeout_s=60.0, watermark_timeout_s=999)
    fuser = Fuser(settings, escalate=True)
    feed(fuser, [frame(c, t, dets=[cone()] if c == "front" else []) for t in range(5) for c in CAMS], now=0.0)
    # When the VLM timeout passes
    before, after = fuser.tick(now=59.0), fuser.tick(now=61.0)
    # Then the verdict goes out without an answer, marked escalated
    assert before.outputs == []
    (verdict,) = verdicts(after.outputs)
    assert verdict.escalated and verdict.vlm is None


def test_confidence_grows_with_each_kind_of_evidence():
    # Given the default coefficients
    coefficients = FuseSettings().coefficients
    base = dict.fromkeys(FEATURES, 0.0)
    # When any one feature rises / Then the confidence rises
    for name in FEATURES:
        assert confidence({**base, name: 0.4}, coefficients) > confidence(base, coefficients), name


def test_windows_wait_for_anomaly_scores_and_use_smoothed_ones():
    # Given vera on, and a smoother that halves every score
    fuser = Fuser(expect_anomaly=True, smoother=lambda scores, _desc: [s / 2 for s in scores])
    msgs = [frame(c, t) for t in range(5) for c in CAMS]
    out, _ = feed(fuser, msgs)
    assert out == []
    # When segment 1 arrives before segment 0 (out of order), then segment 0
    seg = lambda cam, i: AnomalyScore(drive_id="d1", camera=cam, index=i, t_start=i * 5.0, t_end=i * 5.0 + 10, score=0.8)  # noqa: E731
    out1, _ = feed(fuser, [seg("front", 1), seg("back", 1)])
    out2, _ = feed(fuser, [seg("front", 0), seg("back", 0)])
    # Then the window waits for the unbroken run, and carries the smoothed score
    assert out1 == []
    (verdict,) = verdicts(out2)
    assert verdict.anomaly_score == 0.4


def test_replayed_entries_after_restore_give_the_same_summary():
    # Given one fuser that publishes window 0, checkpoints, and then dies
    msgs = [frame(c, t, dets=[cone()] * 3, lat=2.0) for t in range(12) for c in CAMS]
    first = Fuser()
    out, released = feed(first, msgs[:10])
    snap = first.snapshot("d1")
    pending = [m for i, m in enumerate(msgs[:10]) if (m.KIND, i) not in released] + msgs[10:]
    # When a new fuser restores the checkpoint and sees the pending entries and the rest
    second = Fuser()
    second.restore("d1", snap)
    out2, _ = feed(second, pending + [ended("front"), ended("back")])
    # Then it publishes only the other windows, and the summary spans the whole drive
    reference, _ = feed(Fuser(), msgs + [ended("front"), ended("back")])
    assert [v.window for v in verdicts(out)] == [0]
    assert [v.window for v in verdicts(out2)] == [1, 2]
    summary = next(o for o in out2 if isinstance(o, DriveSummary))
    assert summary == next(o for o in reference if isinstance(o, DriveSummary))
    assert summary.spans[0].t_start == 0.0 and summary.spans[0].t_end == 6.0


def test_gps_falls_back_to_the_event_estimate():
    # Given a drive without telemetry whose marker carries the event's position
    fuser = Fuser()
    out, _ = feed(fuser, [frame(c, 0) for c in CAMS] + [ended(c, est_lat=30.2, est_lon=-97.6) for c in CAMS])
    # Then the verdict's position is the estimate, marked as one
    (verdict,) = verdicts(out)
    assert verdict.gps and verdict.gps.estimated and verdict.gps.lat == 30.2


def test_dedupe_keys_are_one_per_window_and_drive():
    # Given two verdicts of one window made by two fusers
    msgs = [frame(c, t) for t in range(5) for c in CAMS]
    a = verdicts(feed(Fuser(), msgs, now=1.0)[0])[0]
    b = verdicts(feed(Fuser(), msgs, now=2.0)[0])[0]
    # Then their keys match; another window's differs
    assert dedupe_key(a) == dedupe_key(b)
    assert dedupe_key(a) != dedupe_key(a.copy_with(window=1))


def _published(fuser: Fuser, schedule) -> tuple[list[tuple], DriveSummary]:
    # Feed (now, message) pairs, ticking the clock between them as the worker does.
    outputs = []
    for i, (now, msg) in enumerate(schedule):
        outputs += fuser.add(msg, token=i, now=now).outputs
        outputs += fuser.tick(now).outputs
    rows = [(v.window, v.cameras, v.objects, round(v.confidence, 9)) for v in verdicts(outputs)]
    (summary,) = [o for o in outputs if isinstance(o, DriveSummary)]
    return sorted(rows), summary


def test_the_same_drive_gives_the_same_verdicts_on_a_quiet_and_a_loaded_machine():
    # Given three cameras of 8 ticks, cones on every camera from tick 4 on, ingested at t=0
    cams = ("front", "back", "left_repeater")

    def msg(cam: str, tick: int) -> FrameDetections:
        f = frame(cam, tick, dets=[cone(0.5)] if tick >= 4 else [])
        return f.copy_with(ingested_utc=0.0)

    per_camera = {c: [msg(c, t) for t in range(8)] + [ended(c, cams)] for c in cams}
    # When on a quiet machine the cameras arrive interleaved within a second...
    quiet = [(0.0, m) for m in started(cams)]
    quiet += [(0.01 * i, m) for i, m in enumerate(m for t in range(9) for c in cams for m in per_camera[c][t : t + 1])]
    # ...and on a loaded one camera by camera (as ingest publishes a minute), each entry
    # 10 s after the one before: the last camera starts 170 s after window 0 opened
    loaded = [(0.0, m) for m in started(cams)]
    loaded += [(10.0 * (i + 1), m) for i, m in enumerate(m for c in cams for m in per_camera[c])]
    # Then the verdicts are the same, every window has every camera, and nothing was given up
    quiet_rows, quiet_summary = _published(Fuser(FuseSettings(watermark_timeout_s=30.0)), quiet)
    loaded_rows, loaded_summary = _published(Fuser(FuseSettings(watermark_timeout_s=30.0)), loaded)
    assert loaded_rows == quiet_rows
    assert [r[1] for r in loaded_rows] == [[], sorted(cams)]
    assert loaded_summary.problems == quiet_summary.problems == []


def test_a_camera_that_is_really_gone_is_given_up_only_after_the_drive_stalls():
    # Given front and back, ingested at t=0; back stops after tick 1, front runs to its end
    fuser = Fuser(FuseSettings(watermark_timeout_s=30.0, stall_lag_factor=3.0))
    msgs = started() + [frame("back", t).copy_with(ingested_utc=0.0) for t in range(2)]
    msgs += [frame("front", t).copy_with(ingested_utc=0.0) for t in range(8)] + [ended("front")]
    out, _ = feed(fuser, msgs, now=20.0)  # 20 s of pipeline lag
    # When the drive has made no progress for 59 s (less than 3 × its 20 s lag), then for 61 s
    early = fuser.tick(now=79.0)
    late = fuser.tick(now=81.0)
    # Then nothing closes early; after it, both windows close without back and the drive
    # is summarised, naming back as given up
    assert verdicts(out) == [] and early.outputs == []
    assert [(v.window, v.missing_cameras) for v in verdicts(late.outputs)] == [(0, []), (1, ["back"])]
    (summary,) = [o for o in late.outputs if isinstance(o, DriveSummary)]
    assert any(p.startswith("back: gave up waiting") and "2 window(s)" in p for p in summary.problems)
    # and if back's end marker still comes, it is only counted as late
    assert fuser.add(ended("back"), token="end", now=82.0).release == ["end"]


def test_a_gps_jump_faster_than_a_car_is_no_position():
    # Given a window whose frames have fixes near 30.2 N, -97.6 E but one 0.5 degree away
    fuser = Fuser()
    msgs = [frame(c, t, dets=[cone(), cone(0.4)]) for t in range(4) for c in CAMS]
    fixes = {0: 30.2000, 1: 30.2001, 2: 30.7000, 3: 30.2002}
    msgs = [m.copy_with(telemetry=Telemetry(lat=fixes[m.tick], lon=-97.6)) for m in msgs]
    # When the window closes
    out, _ = feed(fuser, started() + msgs + [ended("front"), ended("back")])
    # Then its position ignores the jump
    (verdict,) = verdicts(out)
    assert abs(verdict.gps.lat - 30.2001) < 1e-4 and not verdict.gps.estimated


def test_a_window_closed_without_vera_scores_after_a_stall_says_so():
    # Given vera on, every camera's frames and end markers, and no anomaly score
    fuser = Fuser(FuseSettings(watermark_timeout_s=30.0), expect_anomaly=True)
    out, _ = feed(fuser, started() + [frame(c, t) for t in range(4) for c in CAMS] + [ended("front"), ended("back")])
    # When the drive makes no progress for 30 s
    assert verdicts(out) == [] and fuser.tick(now=29.0).outputs == []
    step = fuser.tick(now=31.0)
    # Then the window closes, and the summary says vera's scores never came
    assert [v.window for v in verdicts(step.outputs)] == [0]
    (summary,) = [o for o in step.outputs if isinstance(o, DriveSummary)]
    assert any(p.startswith("anomaly scores (vera) never arrived for 1 window(s)") for p in summary.problems)


def test_an_end_marker_that_overtakes_its_cameras_last_frames_waits_for_them():
    # Given front and back of 8 frames each (two windows); back's end marker arrives after
    # its first 4 frames, ahead of the last 4 (a partition moved between detect workers and
    # a paused owner's read was replayed late)
    fuser = Fuser(FuseSettings(watermark_timeout_s=30.0))
    counts = {"front": 8, "back": 8}
    msgs = started() + [frame("front", t) for t in range(8)] + [ended("front", frame_counts=counts)]
    msgs += [frame("back", t) for t in range(4)] + [ended("back", frame_counts=counts)]
    out, _ = feed(fuser, msgs, now=0.0)
    # When the marker is in, back still owes 4 counted frames: no window closes on it
    assert verdicts(out) == []
    # When back's last frames come in
    rest, _ = feed(fuser, [frame("back", t) for t in range(4, 8)], now=1.0)
    # Then both windows close with both cameras, and no frame of back was late
    assert [(v.window, v.missing_cameras) for v in verdicts(rest)] == [(0, []), (1, [])]
    (summary,) = [o for o in rest if isinstance(o, DriveSummary)]
    assert not any("never reached fuse" in p for p in summary.problems), summary.problems


SIX = ("front", "back", "left_repeater", "right_repeater", "left_pillar", "right_pillar")


def _one_window(boxes: dict[str, int], prob: float | None) -> Verdict:
    """The first 2 s window of a six-camera drive: ``boxes[camera]`` cones at tick 1 (of 4)."""
    fuser = Fuser(FuseSettings(window_s=2.0))
    frames = [frame(c, t, [cone(0.2 + 0.1 * k) for k in range(boxes.get(c, 0) if t == 1 else 0)], prob=prob)
              for c in SIX for t in range(5)]  # fmt: skip
    out, _ = feed(fuser, started(SIX) + frames)
    return verdicts(out)[0]


def test_one_box_on_one_camera_is_not_a_verdict_by_itself_under_the_shipped_coefficients():
    # Given the shipped coefficients and one cone on one camera of six, in one frame
    # When the scorer is absent, or below 0.5 on every frame
    alone, doubted = _one_window({"left_pillar": 1}, None), _one_window({"left_pillar": 1}, 0.3)
    # Then the window is not roadwork (0.43 and lower: bench/fuse_fit.py's held-out windows
    # kept these coefficients)
    assert not alone.roadwork and alone.confidence < 0.5
    assert not doubted.roadwork and doubted.confidence < alone.confidence
    # while the scorer's agreement, or boxes on several cameras, make it roadwork
    assert _one_window({"left_pillar": 1}, 0.8).roadwork
    assert _one_window({"front": 2, "left_repeater": 2, "right_repeater": 1}, None).roadwork


def test_the_last_window_ends_where_the_footage_ends_not_past_it():
    # Given a 3 s drive (frames every 0.5 s up to 2.5 s) cut in 2 s windows, roadwork throughout
    fuser = Fuser(FuseSettings(window_s=2.0))
    msgs = [frame(c, t, dets=[cone()] * 3, lat=1.0) for t in range(6) for c in CAMS]
    # When every camera ended
    out, _ = feed(fuser, started() + msgs + [ended("front", start_utc=100.0), ended("back", start_utc=100.0)])
    # Then the last window is 2-3 s, not 2-4 s, and so is the span: nothing claims time past the footage
    assert [(v.window, v.t_start, v.t_end) for v in verdicts(out)] == [(0, 0.0, 2.0), (1, 2.0, 3.0)]
    (summary,) = [o for o in out if isinstance(o, DriveSummary)]
    assert [(s.t_start, s.t_end) for s in summary.spans] == [(0.0, 3.0)]


def test_a_window_closed_before_the_drive_ended_keeps_its_length():
    # Given the same drive whose back camera stalls and is given up (so its end is unknown)
    fuser = Fuser(FuseSettings(window_s=2.0, watermark_timeout_s=1.0))
    msgs = [frame("front", t, dets=[cone()] * 3) for t in range(6)] + [frame("back", t) for t in range(5)]
    feed(fuser, started() + msgs + [ended("front")], now=0.0)
    # When the stall gives the back camera up
    step = fuser.tick(10_000.0)
    # Then the last window keeps its full length
    assert [(v.window, v.t_end) for v in verdicts(step.outputs)][-1] == (1, 4.0)
