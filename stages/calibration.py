"""Calibrating fuse's confidence: a logistic regression over window features.

``fit_coefficients`` fits ``bias`` and one coefficient per feature (``stages.fuse.FEATURES``)
on labelled windows by Newton's method (iteratively reweighted least squares) with a
small L2 penalty, so a separable set still gives finite coefficients. This is Platt
scaling when the features are one score. ``roadstream eval --fit`` calls it on the
``features`` of published verdicts and their labels and writes the coefficients to a JSON
file that ``FuseSettings.calibration`` names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from stream.errors import ConfigError

#: L2 penalty on the coefficients (not the bias): keeps separable data finite.
DEFAULT_L2 = 1e-2


def fit_coefficients(
    rows: Sequence[Mapping[str, float]],
    labels: Sequence[bool | int],
    features: Sequence[str],
    *,
    l2: float = DEFAULT_L2,
    iterations: int = 50,
    balanced: bool = False,
) -> dict[str, float]:
    """Fit a logistic model ``P(roadwork) = sigmoid(bias + Σ c_f · x_f)``.

    Parameters:
        rows: each window's features (a missing feature counts 0).
        labels: each window's truth.
        features: the feature names to fit, in order.
        l2: ridge penalty on the non-bias coefficients.
        iterations: Newton steps at most (it stops earlier once converged).
        balanced: weigh each class to half the total (scikit-learn's
            ``class_weight="balanced"``), so the fitted intercept assumes equal priors
            rather than the training set's; the rule then transfers to data with another
            share of roadwork.

    Returns:
        ``{"bias": …, feature: …}``.

    Raises:
        ValueError: rows and labels differ in length, or one class is missing.
    """
    y = np.asarray([1.0 if label else 0.0 for label in labels])
    if len(rows) != len(y):
        message = f"{len(rows)} feature rows but {len(y)} labels"
        raise ValueError(message)
    if y.size == 0 or y.min() == y.max():
        message = "calibration needs windows of both classes"
        raise ValueError(message)
    x = np.asarray([[1.0] + [float(row.get(f, 0.0)) for f in features] for row in rows])
    sample = np.ones_like(y)
    if balanced:
        sample = np.where(y == 1, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
    penalty = np.full(x.shape[1], l2 * len(y))
    penalty[0] = 0.0
    w = np.zeros(x.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (sample * (p - y)) + penalty * w
        hessian = (x * (sample * p * (1 - p))[:, None]).T @ x + np.diag(penalty) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return {"bias": float(w[0]), **{f: float(c) for f, c in zip(features, w[1:], strict=True)}}


def save_coefficients(path: str | Path, coefficients: Mapping[str, float]) -> None:
    """Write coefficients as JSON (the file ``FuseSettings.calibration`` names)."""
    Path(path).write_text(json.dumps(dict(coefficients), indent=2, sort_keys=True) + "\n")


def load_coefficients(path: str | Path) -> dict[str, float]:
    """Read a coefficients file.

    Raises:
        ConfigError: the file is missing, is not JSON, or is not a map of numbers.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        message = f"fuse calibration file {path}: {exc}"
        raise ConfigError(message) from exc
    if not isinstance(data, dict) or not all(isinstance(v, int | float) for v in data.values()):
        message = f"fuse calibration file {path}: expected a JSON object of numbers"
        raise ConfigError(message)
    return {str(k): float(v) for k, v in data.items()}
