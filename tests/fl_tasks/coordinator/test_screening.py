"""Screening maths: structure checks, norm bounds, leave-one-out cosine."""

from __future__ import annotations

import numpy as np
import pytest

from fl_tasks.coordinator.screening import (ScreeningError, check_structure, delta_vector, leave_one_out_cosine,
                                norm_outliers)

BASE = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32), "n": np.array(3, np.int64)}


def model(w, b, n=5):
    return {"w": np.asarray(w, np.float32).reshape(2, 2), "b": np.asarray(b, np.float32), "n": np.array(n, np.int64)}


def test_structure_accepts_a_matching_update_and_names_each_defect():
    check_structure(model([1, 2, 3, 4], [0, 1]), BASE)
    with pytest.raises(ScreeningError, match="tensor names differ"):
        check_structure({"w": BASE["w"], "b": BASE["b"]}, BASE)
    with pytest.raises(ScreeningError, match="tensor 'b' is \\(3,\\) float32, expected \\(2,\\) float32"):
        check_structure({**BASE, "b": np.zeros(3, np.float32)}, BASE)
    with pytest.raises(ScreeningError, match="float64"):
        check_structure({**BASE, "b": np.zeros(2, np.float64)}, BASE)
    with pytest.raises(ScreeningError, match="NaN or Inf"):
        check_structure(model([1, np.nan, 3, 4], [0, 1]), BASE)
    with pytest.raises(ScreeningError, match="NaN or Inf"):
        check_structure(model([1, 2, 3, 4], [np.inf, 1]), BASE)


def test_delta_vector_covers_floating_tensors_only_in_a_fixed_order():
    delta = delta_vector(model([1, 2, 3, 4], [5, 6], n=99), BASE)
    assert delta.tolist() == [5, 6, 1, 2, 3, 4]  # 'b' sorts before 'w'; the counter is left out


def test_norm_bounds_absolute_and_relative_to_the_median():
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 6.0}
    assert norm_outliers(norms, max_norm=None, max_ratio=None) == {}
    assert list(norm_outliers(norms, max_norm=5.0, max_ratio=None)) == ["d"]
    relative = norm_outliers(norms, max_norm=None, max_ratio=4.0)
    assert list(relative) == ["d"] and "4 x the round's median norm 1.1" in relative["d"]
    assert norm_outliers(norms, max_norm=None, max_ratio=6.0) == {}


def test_leave_one_out_cosine_matches_the_formula():
    deltas = [np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([-1.0, -1.0])]
    total = sum(deltas)
    for d in deltas:
        others = total - d
        expected = d @ others / (np.linalg.norm(d) * np.linalg.norm(others))
        assert leave_one_out_cosine(d, total, 3) == pytest.approx(expected)
    assert leave_one_out_cosine(np.array([2.0, 2.0]), np.array([2.0, 2.0]), 1) == 1.0
