"""VERA's scene-context and temporal smoothing of segment scores."""

from __future__ import annotations

import numpy as np
import pytest

from stages.smoothing import gaussian_kernel, scene_smooth, smooth_drive, temporal_smooth


def test_scene_smoothing_averages_over_similar_segments_only():
    # Given two scenes of ten segments each, one noisy score in the first scene
    scores = [0.1] * 10 + [0.9] * 10
    scores[3] = 0.8
    descriptors = [[1.0, 0.0]] * 10 + [[0.0, 1.0]] * 10
    # When smoothed over the top 15% (3 segments) by cosine similarity
    out = scene_smooth(scores, descriptors)
    # Then the outlier is pulled towards its own scene and the other scene is untouched
    assert out[3] < 0.8
    assert np.allclose(out[10:], 0.9)


def test_scene_smoothing_weights_closer_segments_more():
    # Given one segment whose nearest neighbours differ in similarity
    descriptors = [[1.0, 0.0], [1.0, 0.05], [1.0, 1.0], [0.0, 1.0]]
    scores = [0.0, 1.0, 1.0, 0.0]
    # When every segment averages over the top half
    out = scene_smooth(scores, descriptors, top_fraction=0.5, temperature=10.0)
    # Then segment 0 averages itself with segment 1 (its nearest) with near-equal weights
    assert 0.4 < out[0] < 0.5


def test_scene_smoothing_keeps_scores_without_descriptors():
    # Given segments with no descriptor
    # When smoothed
    out = scene_smooth([0.2, 0.7], [[], []])
    # Then each keeps its own score
    assert list(out) == [0.2, 0.7]


def test_scene_smoothing_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="descriptors"):
        scene_smooth([0.1, 0.2], [[1.0]])


def test_gaussian_kernel_has_the_asked_size_and_sums_to_one():
    kernel = gaussian_kernel(15, 10.0)
    assert kernel.shape == (15,)
    assert kernel.sum() == pytest.approx(1.0)
    assert kernel.argmax() == 7


def test_temporal_smoothing_spreads_a_spike_and_keeps_a_constant():
    # Given a spike in a flat sequence and a constant sequence
    spike = temporal_smooth([0.0] * 10 + [1.0] + [0.0] * 10)
    flat = temporal_smooth([0.4] * 12)
    # Then the spike is lowered and spread, and the constant (edges included) stays constant
    assert spike[10] < 1.0 and spike[5] > 0.0
    assert np.allclose(flat, 0.4)


def test_smooth_drive_stays_in_unit_interval():
    rng = np.random.default_rng(0)
    out = smooth_drive(rng.random(40), rng.normal(size=(40, 8)).tolist())
    assert out.shape == (40,) and (out >= 0).all() and (out <= 1).all()
