"""The text a person reads about a round: aligned tables, short lines, the run note."""

from __future__ import annotations

from fl_tasks.coordinator import round_log


def report(**overrides):
    base = {"round_id": "000003", "decision": "rejected", "version": "3", "base_version": "2",
            "clients_expected": 5, "clients_committed": 5, "clients_accepted": ["a", "b", "c", "d"],
            "clients_rejected": [{"client_id": "e", "reason": "update norm 9.1 is over 3 x the round's median"}],
            "late": [], "candidate": {"roc_auc": 0.81234567891234, "pr_auc": 0.3}, "champion": {"roc_auc": 0.9,
                                                                                              "pr_auc": 0.4},
            "gates": [{"name": "max_regression", "passed": False, "detail": "roc_auc drop vs champion +0.0877 > 0.02"}],
            "reason": "roc_auc drop vs champion +0.0877 > 0.02", "audit_log": "s3://coord/f/audit/000003/"}
    base.update(overrides)
    return base


def test_table_aligns_columns_and_rounds_floats():
    text = round_log.table(["client", "norm"], [["bank-north", 0.123456789], ["b", 12.5], ["c", None]])
    lines = text.splitlines()
    assert lines[0] == "client         norm"  # numbers and their header right-aligned
    assert lines[2] == "bank-north   0.1235"
    assert lines[3] == "b           12.5000"
    assert lines[4] == "c                 -"
    assert len({len(line) for line in lines}) == 1


def test_summary_table_is_short_and_has_no_long_floats():
    text = round_log.summary_table(report())
    assert "0.8123" in text and "0.81234567" not in text
    assert max(len(line) for line in text.splitlines()) < 120
    assert "rolled back" not in text and "rejected" in text  # the stored decision word
    assert "rejected e: update norm 9.1" in text and "reason: roc_auc drop" in text


def test_run_note_says_round_decision_version_and_reason():
    note = round_log.run_note(report())
    assert note.startswith("**Round 000003: rolled back** · version 3 · 4 of 5 updates accepted")
    assert "Reason: roc_auc drop vs champion +0.0877 > 0.02" in note
    promoted = round_log.run_note(report(decision="promoted", reason=""))
    assert "promoted" in promoted and "Reason" not in promoted
    assert round_log.run_note(report(decision="no_model", version=None, reason="quorum not met")).startswith(
        "**Round 000003: no model** · 4 of 5")
