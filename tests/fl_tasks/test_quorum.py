"""fl_tasks/quorum.py: when a round may close."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fl_tasks.quorum import FAILED, MET, WAITING, QuorumDecision, decide

DEADLINE = datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc)
BEFORE = DEADLINE - timedelta(seconds=1)
AFTER = DEADLINE + timedelta(minutes=5)
EXPECTED = ["bank-a", "bank-b", "bank-c", "bank-d"]


def test_all_committed_before_deadline_is_met():
    d = decide(["bank-d", "bank-b", "bank-a", "bank-c"], EXPECTED, 3, DEADLINE, BEFORE)
    assert d == QuorumDecision(MET, ("bank-a", "bank-b", "bank-c", "bank-d"), "all 4 clients committed")


def test_all_committed_after_deadline_is_met():
    assert decide(EXPECTED, EXPECTED, 4, DEADLINE, AFTER).state == MET


def test_partial_before_deadline_waits_even_above_min():
    d = decide(["bank-a", "bank-c", "bank-b"], EXPECTED, 2, DEADLINE, BEFORE)
    assert d.state == WAITING
    assert d.committed == ("bank-a", "bank-b", "bank-c")
    assert d.reason == "3 of 4 committed, waiting for ['bank-d']"


def test_none_committed_before_deadline_waits():
    d = decide([], EXPECTED, 1, DEADLINE, BEFORE)
    assert d.state == WAITING and d.committed == ()


@pytest.mark.parametrize("now", [DEADLINE, AFTER])
def test_partial_at_or_after_deadline_with_min_is_met(now):
    d = decide(["bank-b", "bank-a"], EXPECTED, 2, DEADLINE, now)
    assert d.state == MET
    assert d.committed == ("bank-a", "bank-b")
    assert "2 of 4" in d.reason and "min_clients=2" in d.reason and "['bank-c', 'bank-d']" in d.reason


@pytest.mark.parametrize("now", [DEADLINE, AFTER])
def test_below_min_at_deadline_fails_with_counts_and_missing(now):
    d = decide(["bank-c"], EXPECTED, 3, DEADLINE, now)
    assert d.state == FAILED
    assert d.committed == ("bank-c",)
    assert d.reason == ("quorum not met: 1 of 4 clients committed by the deadline 2024-01-01T12:00:00+00:00, "
                        "min_clients=3; missing ['bank-a', 'bank-b', 'bank-d']")


def test_nobody_at_deadline_fails():
    d = decide([], EXPECTED, 1, DEADLINE, AFTER)
    assert d.state == FAILED
    assert "0 of 4" in d.reason and "['bank-a', 'bank-b', 'bank-c', 'bank-d']" in d.reason


def test_unexpected_clients_are_ignored():
    # 'intruder' and 'old-bank' do not count toward the quorum or appear in the decision.
    d = decide(["intruder", "bank-a", "old-bank"], EXPECTED, 2, DEADLINE, AFTER)
    assert d.state == FAILED
    assert d.committed == ("bank-a",)
    assert "intruder" not in d.reason and "1 of 4" in d.reason
    d = decide(["intruder", *EXPECTED], EXPECTED, 4, DEADLINE, BEFORE)
    assert d.state == MET and d.committed == tuple(EXPECTED)
    assert d.reason == "all 4 clients committed"


def test_duplicates_count_once():
    d = decide(["bank-a", "bank-a", "bank-a"], EXPECTED, 2, DEADLINE, AFTER)
    assert d.state == FAILED and d.committed == ("bank-a",)


def test_accepts_sets_and_tuples():
    d = decide({"bank-a", "bank-b"}, ("bank-a", "bank-b"), 2, DEADLINE, BEFORE)
    assert d.state == MET
