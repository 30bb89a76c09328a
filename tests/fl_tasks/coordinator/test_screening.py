"""Screening maths: structure and value checks, norm bounds, free riders, implausible example
counts, leave-one-out cosine."""

from __future__ import annotations

import numpy as np
import pytest

from fl_tasks.coordinator.screening import (ScreeningError, check_structure, check_values, delta_vector,
                                            free_riders, implausible_counts, leave_one_out_cosine, norm_outliers)

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
    assert leave_one_out_cosine(np.array([2.0, 2.0]), np.array([2.0, 2.0]), 2) == 0.0  # the other delta is zero


def test_a_zero_delta_has_cosine_zero_never_a_pass():
    # It used to get 1.0 (a pass at any min_cosine): a silo sending the base back slipped
    # through the cosine test. A zero delta has no direction, so its cosine is now 0.
    deltas = [np.array([1.0, 0.0]), np.array([1.0, 0.1]), np.zeros(2)]
    total = sum(deltas)
    assert leave_one_out_cosine(np.zeros(2), total, 3) == 0.0
    assert leave_one_out_cosine(deltas[0], total, 3) == pytest.approx(1.0 / np.linalg.norm([1.0, 0.1]))


# --- check_values: what a trained model's values can be, whatever the settings -------------
RANGES = {"*running_var": (0.0, np.inf)}


def bn_base():
    return {"fc.weight": np.zeros((2, 2), np.float32), "bn.running_var": np.ones(2, np.float32),
            "bn.num_batches_tracked": np.array(10, np.int64)}


def values(weight=0.5, var=(1.0, 2.0), tracked=12):
    return {"fc.weight": np.full((2, 2), weight, np.float32), "bn.running_var": np.asarray(var, np.float32),
            "bn.num_batches_tracked": np.array(tracked, np.int64)}


def test_check_values_accepts_a_plausible_update():
    check_values(values(), bn_base(), max_abs=1e6, max_increment=5, ranges=RANGES)
    # Every bound is inclusive: magnitude at the bound, the full increment, a variance of 0.
    check_values(values(weight=-1e6, var=(0.0, 1.0), tracked=15), bn_base(), max_abs=1e6, max_increment=5,
                 ranges=RANGES)
    check_values(values(tracked=10), bn_base(), max_abs=1e6, max_increment=5, ranges=RANGES)  # no batch: no step


@pytest.mark.parametrize("weight", [1.0000001e6, -3e38, 3.4e38])
def test_check_values_rejects_finite_values_beyond_the_magnitude_bound(weight):
    # 3e38 is finite, so check_structure lets it through, and it would still wreck an average.
    check_structure(values(weight=weight), bn_base())
    with pytest.raises(ScreeningError, match=r"tensor 'fc.weight' has a value of magnitude .*, over the bound 1e\+06"):
        check_values(values(weight=weight), bn_base(), max_abs=1e6, max_increment=5, ranges=RANGES)


@pytest.mark.parametrize("tracked, moved", [(9, "-1..-1"), (16, "6..6"), (-(2 ** 62), None)])
def test_check_values_holds_integer_buffers_to_the_rounds_increment(tracked, moved):
    with pytest.raises(ScreeningError, match="integer tensor 'bn.num_batches_tracked' moved by") as caught:
        check_values(values(tracked=tracked), bn_base(), max_abs=1e6, max_increment=5, ranges=RANGES)
    assert "a round allows 0..5" in str(caught.value)
    if moved:
        assert f"moved by {moved} from the base" in str(caught.value)


def test_check_values_applies_the_tasks_tensor_ranges_by_pattern():
    with pytest.raises(ScreeningError, match=r"tensor 'bn.running_var' has values in -0.5..2, outside the task's "
                                             r"range 0..inf"):
        check_values(values(var=(-0.5, 2.0)), bn_base(), max_abs=1e6, max_increment=5, ranges=RANGES)
    # A pattern only covers the tensors it names; no ranges, no range check.
    check_values(values(var=(-0.5, 2.0)), bn_base(), max_abs=1e6, max_increment=5, ranges={"*.weight": (-1, 1)})
    check_values(values(var=(-0.5, 2.0)), bn_base(), max_abs=1e6, max_increment=5, ranges={})
    with pytest.raises(ScreeningError, match=r"tensor 'fc.weight' has values in 0.5..0.5, outside the task's range "
                                             r"-0.1..0.1"):
        check_values(values(), bn_base(), max_abs=1e6, max_increment=5, ranges={"*.weight": (-0.1, 0.1)})


# --- free riders: an update that barely moved the model -----------------------------------
def test_free_riders_are_below_a_share_of_the_median_norm():
    norms = {"a": 1.0, "b": 1.2, "c": 0.8, "d": 0.005}
    riders = free_riders(norms, min_ratio=0.01)  # median 0.9: the bar is 0.009
    assert list(riders) == ["d"]
    assert riders["d"] == ("update norm 0.005 is below 0.01 x the round's median norm 0.9 "
                           "(free rider: the update barely changes the model)")
    assert free_riders({"a": 1.0, "b": 1.0, "c": 0.01}, min_ratio=0.01) == {}  # exactly at the bar passes
    assert free_riders(norms, min_ratio=None) == {}  # off


def test_a_zero_update_is_always_a_free_rider_while_the_check_is_on():
    # Even when the median is zero (most silos sent the base back) or there is one update.
    riders = free_riders({"a": 0.0, "b": 0.0, "c": 2.0}, min_ratio=0.01)
    assert sorted(riders) == ["a", "b"]
    assert free_riders({"a": 0.0}, min_ratio=0.01) == {"a": "update is identical to the base model (free rider)"}
    assert free_riders({"a": 1e-9}, min_ratio=0.01) == {}  # one update has no median to compare with
    assert free_riders({"a": 0.0, "b": 1.0}, min_ratio=None) == {}


# --- implausible example counts: a silo's count is its FedAvg weight ----------------------
def test_counts_over_the_declared_size_are_implausible():
    reasons = implausible_counts({"a": 4001, "b": 4000, "c": 10 ** 9}, {"a": 4000, "b": 4000, "c": None}, {},
                                 max_growth=10.0)
    assert reasons == {"a": "num_examples 4001 is over the 4000 declared for this client in the federation file"}


def test_counts_over_a_multiple_of_the_clients_recent_median_are_implausible():
    history = {"a": [100, 120, 110], "b": [100, 120, 110], "c": []}
    counts = {"a": 1101, "b": 1100, "c": 50_000}  # c has no history yet: nothing to hold it against
    reasons = implausible_counts(counts, {}, history, max_growth=10.0)
    assert reasons == {"a": "num_examples 1101 is over 10 x this client's recent median 110"}
    assert implausible_counts(counts, {}, history, max_growth=None) == {}  # growth check off
    # The declared size is checked even with the growth check off, and is named first.
    both = implausible_counts({"a": 1101}, {"a": 1000}, history, max_growth=None)
    assert both == {"a": "num_examples 1101 is over the 1000 declared for this client in the federation file"}
