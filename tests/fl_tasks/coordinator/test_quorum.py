"""fl_tasks/quorum.py: when a round may close."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from fl_tasks.coordinator.quorum import FAILED, MET, WAITING, QuorumDecision, decide, required_clients

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
    assert "2 of 4" in d.reason and "quorum 2" in d.reason and "['bank-c', 'bank-d']" in d.reason


@pytest.mark.parametrize("now", [DEADLINE, AFTER])
def test_below_min_at_deadline_fails_with_counts_and_missing(now):
    d = decide(["bank-c"], EXPECTED, 3, DEADLINE, now)
    assert d.state == FAILED
    assert d.committed == ("bank-c",)
    assert d.reason == ("quorum not met: 1 of 4 clients committed by the deadline 2024-01-01T12:00:00+00:00, "
                        "quorum 3; missing ['bank-a', 'bank-b', 'bank-d']")


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


@pytest.mark.parametrize("min_clients, fraction, expected", [
    (1, None, 1), (3, None, 3), (1, 0.5, 2), (1, 0.75, 3), (3, 0.5, 3), (1, 1.0, 4), (1, 0.26, 2), (2, 0.0, 2),
])
def test_required_is_the_larger_of_count_and_fraction(min_clients, fraction, expected):
    assert required_clients(len(EXPECTED), min_clients, fraction) == expected


def at(minutes: float) -> datetime:
    return DEADLINE - timedelta(minutes=30) + timedelta(minutes=minutes)


GRACE = timedelta(minutes=5)


def test_grace_waits_for_stragglers_after_quorum():
    commits = {"bank-a": at(1), "bank-b": at(2), "bank-c": at(9)}
    d = decide(commits, EXPECTED, 2, DEADLINE, at(6), GRACE)
    # quorum of 2 was reached at minute 2: the round stays open until minute 7
    assert d.state == WAITING and "stragglers ['bank-d']" in d.reason and at(7).isoformat() in d.reason


def test_grace_over_closes_before_the_deadline_with_everyone_in_by_then():
    commits = {"bank-a": at(1), "bank-b": at(2), "bank-c": at(6.5)}
    d = decide(commits, EXPECTED, 2, DEADLINE, at(7), GRACE)
    assert d.state == MET and d.committed == ("bank-a", "bank-b", "bank-c")
    assert "grace period ended with 3 of 4" in d.reason and "['bank-d']" in d.reason


def test_grace_counts_from_the_required_commit_not_the_first():
    commits = {"bank-a": at(1), "bank-b": at(2), "bank-c": at(20)}
    assert decide(commits, EXPECTED, 3, DEADLINE, at(24), GRACE).state == WAITING
    assert decide(commits, EXPECTED, 3, DEADLINE, at(25), GRACE).state == MET


def test_grace_never_extends_past_the_deadline():
    commits = {"bank-a": at(28), "bank-b": at(29)}
    assert decide(commits, EXPECTED, 2, DEADLINE, DEADLINE - timedelta(seconds=1), GRACE).state == WAITING
    assert decide(commits, EXPECTED, 2, DEADLINE, DEADLINE, GRACE).state == MET


def test_grace_below_quorum_keeps_waiting_then_fails_at_deadline():
    commits = {"bank-a": at(1)}
    assert decide(commits, EXPECTED, 2, DEADLINE, at(20), GRACE).state == WAITING
    assert decide(commits, EXPECTED, 2, DEADLINE, AFTER, GRACE).state == FAILED


def test_grace_needs_commit_times():
    with pytest.raises(ValueError, match="commit time"):
        decide(["bank-a", "bank-b"], EXPECTED, 2, DEADLINE, BEFORE, GRACE)


# --- declines: a silo may answer "not this round" (protocol.DeclineManifest) ---------------
REASON = "data contract: column 'Amount' missing"


def test_declines_that_leave_too_few_clients_fail_at_once():
    # 2 of 4 declined and the quorum is 3: waiting for bank-d cannot help, so no need to wait for the deadline.
    declined = {"bank-a": REASON, "bank-b": "task version 1 is not installed"}
    d = decide({"bank-c": at(1)}, EXPECTED, 3, DEADLINE, BEFORE, declined=declined)
    assert d.state == FAILED and d.committed == ("bank-c",)
    assert d.reason == ("quorum of 3 cannot be reached: 2 of 4 clients declined "
                        f"(bank-a declined: {REASON}; bank-b declined: task version 1 is not installed); "
                        "1 committed, 1 still pending")


def test_every_client_declining_fails_at_once():
    d = decide([], EXPECTED, 1, DEADLINE, at(0), declined=dict.fromkeys(EXPECTED, REASON))
    assert d.state == FAILED and d.committed == ()
    assert "4 of 4 clients declined" in d.reason and "0 committed, 0 still pending" in d.reason


def test_declines_that_still_leave_the_quorum_reachable_keep_waiting():
    # 1 declined, 1 committed, 2 pending: 3 is still reachable, so the round waits for the others.
    d = decide(["bank-a"], EXPECTED, 3, DEADLINE, BEFORE, declined={"bank-b": REASON})
    assert d.state == WAITING and d.committed == ("bank-a",)
    assert d.reason == "1 of 4 committed, waiting for ['bank-c', 'bank-d']"  # a decliner is not waited for


def test_every_client_answered_closes_before_the_deadline():
    d = decide(["bank-a", "bank-b", "bank-d"], EXPECTED, 3, DEADLINE, BEFORE, declined={"bank-c": REASON})
    assert d == QuorumDecision(MET, ("bank-a", "bank-b", "bank-d"), "every client answered: 3 committed, 1 declined")


def test_a_decline_never_counts_towards_the_quorum():
    # Everyone answered, but two declines leave one commit for a quorum of 2.
    d = decide(["bank-a"], EXPECTED, 2, DEADLINE, BEFORE, declined={"bank-b": REASON, "bank-c": REASON,
                                                                    "bank-d": REASON})
    assert d.state == FAILED and d.committed == ("bank-a",)
    assert "quorum of 2 cannot be reached: 3 of 4 clients declined" in d.reason


def test_an_update_wins_over_a_decline_and_strangers_declines_are_ignored():
    d = decide(EXPECTED, EXPECTED, 4, DEADLINE, BEFORE, declined={"bank-a": REASON, "intruder": REASON})
    assert d == QuorumDecision(MET, tuple(EXPECTED), "all 4 clients committed")
    d = decide(["bank-a"], EXPECTED, 2, DEADLINE, AFTER, declined={"intruder": REASON})
    assert d.state == FAILED and "intruder" not in d.reason


def test_at_the_deadline_declined_clients_are_not_listed_as_missing():
    d = decide(["bank-a", "bank-b"], EXPECTED, 2, DEADLINE, AFTER, declined={"bank-c": REASON})
    assert d.state == MET and d.committed == ("bank-a", "bank-b")
    assert d.reason.endswith("missing ['bank-d']")


def test_grace_waits_only_for_clients_that_have_not_answered():
    commits = {"bank-a": at(1), "bank-b": at(2)}
    d = decide(commits, EXPECTED, 2, DEADLINE, at(6), GRACE, declined={"bank-c": REASON})
    assert d.state == WAITING and "stragglers ['bank-d']" in d.reason
    # Once the last straggler declines, everyone has answered: the round closes without waiting out the grace.
    d = decide(commits, EXPECTED, 2, DEADLINE, at(3), GRACE, declined={"bank-c": REASON, "bank-d": REASON})
    assert d.state == MET and d.reason == "every client answered: 2 committed, 2 declined"
