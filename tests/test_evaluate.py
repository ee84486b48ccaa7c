"""Evaluation against labels, and calibration of fuse's confidence."""

from __future__ import annotations

import math
import random

import pytest

from stages.calibration import fit_coefficients, load_coefficients, save_coefficients
from stages.evaluate import drive_pairs, evaluate, load_labels, metrics, window_truth
from stages.fuse import confidence
from stream.errors import ConfigError, InputError
from stream.schemas import Verdict


def verdict(drive: str, window: int, roadwork: bool, w: float = 2.0) -> Verdict:
    return Verdict(
        drive_id=drive, window=window, t_start=window * w, t_end=(window + 1) * w,
        roadwork=roadwork, confidence=0.9 if roadwork else 0.1,
    )  # fmt: skip


def test_metrics_match_the_confusion_matrix_by_hand():
    # Given 3 TP, 1 FP, 4 TN, 2 FN
    pairs = [(True, True)] * 3 + [(True, False)] + [(False, False)] * 4 + [(False, True)] * 2
    # When the metrics are computed
    m = metrics(pairs)
    # Then they follow the textbook formulas
    assert (m.tp, m.fp, m.tn, m.fn) == (3, 1, 4, 2)
    assert m.accuracy == pytest.approx(0.7)
    assert m.precision == pytest.approx(0.75) and m.recall == pytest.approx(0.6)
    assert m.mcc == pytest.approx((3 * 4 - 1 * 2) / math.sqrt(4 * 5 * 5 * 6))


def test_mcc_is_zero_when_one_class_is_missing():
    # Given only positive truths / Then MCC cannot be computed and reads 0
    assert metrics([(True, True), (False, True)]).mcc == 0.0


def test_interval_labels_cover_windows_by_overlap(tmp_path):
    # Given a CSV labelling 3 s to 6 s of drive a as roadwork, and drive b as a whole
    path = tmp_path / "labels.csv"
    path.write_text("drive_id,t_start,t_end,label\na,3,6,1\nb,,,yes\n")
    labels = load_labels(path)
    # Then window [2,4) (half covered) and [4,6) are roadwork, [0,2) is not; b's windows are
    assert [window_truth(verdict("a", i, False), labels) for i in range(3)] == [False, True, True]
    assert window_truth(verdict("b", 7, False), labels) is True
    assert window_truth(verdict("c", 0, False), labels) is None


def test_window_and_drive_levels(tmp_path):
    # Given JSON labels and verdicts of two drives
    path = tmp_path / "labels.json"
    path.write_text('[{"drive_id": "a", "label": 1, "t_start": 0, "t_end": 2}, {"drive_id": "b", "label": 0}]')
    labels = load_labels(path)
    vs = [verdict("a", 0, True), verdict("a", 1, True), verdict("b", 0, False), verdict("b", 1, True)]
    # When evaluated at each level
    window = evaluate(vs, labels, "window")
    drive = evaluate(vs, labels, "drive")
    # Then windows: TP, FP, TN, FP; drives: a TP, b FP
    assert (window.tp, window.fp, window.tn, window.fn) == (1, 2, 1, 0)
    assert (drive.tp, drive.fp, drive.tn, drive.fn) == (1, 1, 0, 0)
    assert drive_pairs(vs, labels) == [("a", True, True), ("b", True, False)]


def test_bad_labels_are_reported_with_their_row(tmp_path):
    # Given a CSV with a label that means nothing
    path = tmp_path / "labels.csv"
    path.write_text("drive_id,label\na,maybe\n")
    # Then the error names the file and row
    with pytest.raises(InputError, match=r"labels.csv row 2.*maybe"):
        load_labels(path)


def test_fitted_coefficients_separate_the_classes_better_than_defaults(tmp_path):
    # Given windows whose roadwork ones have higher scorer probabilities, with noise
    rng = random.Random(3)
    rows, labels = [], []
    for _ in range(300):
        truth = rng.random() < 0.4
        prob = min(max(rng.gauss(0.75 if truth else 0.3, 0.15), 0), 1)
        rows.append({"prob_max": prob - 0.5, "objects": 0.0})
        labels.append(truth)
    # When the coefficients are fitted, saved and read back
    fitted = fit_coefficients(rows, labels, ["prob_max", "objects"])
    save_coefficients(tmp_path / "c.json", fitted)
    loaded = load_coefficients(tmp_path / "c.json")
    # Then the fitted model's log loss beats a flat model and the file round-trips
    def log_loss(coef):
        ps = [min(max(confidence(r, coef), 1e-9), 1 - 1e-9) for r in rows]
        return -sum(math.log(p if y else 1 - p) for p, y in zip(ps, labels, strict=True)) / len(rows)

    assert fitted["prob_max"] > 0
    assert log_loss(fitted) < log_loss({"bias": math.log(0.4 / 0.6)}) - 0.1
    assert loaded == pytest.approx(fitted)


def test_calibration_needs_both_classes_and_a_valid_file(tmp_path):
    # Given one class only / Then fitting is refused; a broken file is a ConfigError
    with pytest.raises(ValueError, match="both classes"):
        fit_coefficients([{"objects": 1.0}], [True], ["objects"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="bad.json"):
        load_coefficients(tmp_path / "bad.json")



def test_eval_command_prints_metrics_and_fits(tmp_path):
    # Given a verdicts file with features and labels for each window
    import json

    from click.testing import CliRunner

    from stages.report import write_verdicts
    from workers.cli import cli
    from workers.cli.verdicts import register

    if "eval" not in cli.commands:
        register(cli)
    vs = [verdict("a", i, i % 3 == 0).copy_with(features={"prob_max": 0.4 if i % 3 == 0 else -0.3}) for i in range(12)]
    write_verdicts(tmp_path / "v.jsonl", vs)
    (tmp_path / "l.csv").write_text("drive_id,t_start,t_end,label\n" + "".join(f"a,{i * 2},{i * 2 + 2},{int(i % 4 == 0)}\n" for i in range(12)))
    runner = CliRunner()
    # When evaluated as JSON, as tables with --fit
    as_json = runner.invoke(cli, ["eval", "--labels", str(tmp_path / "l.csv"), "--verdicts", str(tmp_path / "v.jsonl"), "--json"])
    tables = runner.invoke(cli, ["eval", "--labels", str(tmp_path / "l.csv"), "--verdicts", str(tmp_path / "v.jsonl"),
                                 "--fit", str(tmp_path / "c.json")])  # fmt: skip
    # Then the window figures match the metrics of the same pairs, and coefficients are written
    figures = json.loads(as_json.output)
    want = metrics((i % 3 == 0, i % 4 == 0) for i in range(12))
    assert figures["window"]["mcc"] == pytest.approx(want.mcc) and figures["window"]["tp"] == want.tp
    assert tables.exit_code == 0 and "MCC" in tables.output and "confusion matrix" in tables.output
    assert "prob_max" in load_coefficients(tmp_path / "c.json")


def test_eval_command_names_a_missing_labels_file(tmp_path):
    # Given no labels file / Then a clear message and a non-zero exit, no traceback
    from click.testing import CliRunner

    from workers.cli import cli
    from workers.cli.verdicts import register

    if "eval" not in cli.commands:
        register(cli)
    result = CliRunner().invoke(cli, ["eval", "--labels", str(tmp_path / "nope.csv"), "--verdicts", str(tmp_path / "v.jsonl")])
    assert result.exit_code == 1 and "nope.csv" in result.output and "Traceback" not in result.output


def test_the_labels_example_in_the_operating_notes_reads_as_documented(tmp_path):
    from pathlib import Path

    # Given the labels example of docs/operating.md, copied into a file
    doc = (Path(__file__).parent.parent / "docs" / "operating.md").read_text()
    section = doc.split("## Scoring verdicts against labels", 1)[1]
    example = section.split("```\n", 2)[1]
    (tmp_path / "labels.csv").write_text(example)
    # Then it reads: a drive-wide label and two intervals, keyed by event folder
    labels = load_labels(tmp_path / "labels.csv")
    assert [(lab.drive_id, lab.label, lab.t_start, lab.t_end) for lab in labels] == [
        ("2024-05-01_10-00-00", True, None, None),
        ("2024-05-02_08-30-00", True, 12.0, 30.5),
        ("2024-05-02_08-30-00", False, 30.5, 60.0),
    ]
