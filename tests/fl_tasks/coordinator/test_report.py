"""fl_tasks/coordinator/report.py (formerly fl_tasks/round_log.py): report.json, and the text a
person reads about a round: aligned tables, short lines, the run note."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from fl_tasks.coordinator import report as round_log


def report(**overrides):
    base = {"round_id": "000003", "decision": "rejected", "version": "3", "base_version": "2",
            "clients_expected": 5, "clients_committed": 5, "clients_accepted": ["a", "b", "c", "d"],
            "clients_rejected": [{"client_id": "e", "reason": "update norm 9.1 is over 3 x the round's median"}],
            "clients_declined": {}, "late": [], "candidate": {"roc_auc": 0.81234567891234, "pr_auc": 0.3}, "champion": {"roc_auc": 0.9,
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


def test_summary_table_and_run_note_name_the_declines():
    declined = {"f": "data contract: column 'Amount' missing", "g": "task version 1 is not installed"}
    text = round_log.summary_table(report(clients_expected=7, clients_declined=declined))
    head = text.splitlines()
    assert head[0].split() == ["round", "decision", "version", "base", "committed", "declined", "accepted", "rejected",
                               "late"]
    assert head[2].split() == ["000003", "rejected", "3", "2", "5/7", "2", "4", "1", "0"]
    assert "declined f: data contract: column 'Amount' missing" in text
    assert "declined g: task version 1 is not installed" in text
    note = round_log.run_note(report(clients_declined=declined))
    assert note.endswith("Declined: f declined: data contract: column 'Amount' missing; "
                         "g declined: task version 1 is not installed")
    assert "Declined" not in round_log.run_note(report())


def test_summary_table_reads_reports_written_before_declines_existed():
    old = report()
    del old["clients_declined"]
    assert round_log.summary_table(old).splitlines()[2].split()[5] == "0"
    assert "Declined" not in round_log.run_note(old)


def plan(**overrides):
    fields = {"federation": "f", "round_id": "000003", "run_id": "run-3", "run_type": "manual", "base_version": "2",
              "base_origin": "champion", "data_window": {"start": None, "end": None}, "settings": {"min_clients": 2},
              "task": {"entrypoint": "fl_tasks.tasks.fraud:FraudTask"}, "clients": ["a", "b", "c"], "triggered_by": "admin"}
    return SimpleNamespace(**{**fields, **overrides})


def test_build_report_collects_what_the_steps_stored():
    closed = {"committed": ["a", "b"], "declined": {"c": "no rows in the window"},
              "unreadable": {"d": "update manifest unreadable: storage error AccessDenied: denied"}}
    summary = {"accepted": [{"client_id": "a"}], "rejected": [{"client_id": "b", "reason": "free rider"}]}
    result = {"candidate": {"pr_auc": 0.4}, "champion": {"pr_auc": 0.5}, "primary_metric": "pr_auc",
              "gates": [{"name": "max_regression", "passed": False, "detail": "pr_auc drop", "source": "federated"}],
              "sources": ["federated", "coordinator"], "decided_by": ["federated"], "coordinator_evaluation": None,
              "federated_evaluation": {"statistic": "median", "not_counted": {"c": "declined: no rows"}, "required": 2,
                            "figures": {}, "per_silo": {"a": {"num_examples": 10, "rows_held": 50, "scores": {
                                "candidate": {"pr_auc": 0.4}, "champion": {"pr_auc": 0.5}}}}}}
    decision = {"decision": "rejected", "version": "3", "reasons": ["pr_auc drop", "min_roc_auc"]}
    built = round_log.build_report(plan(), closed, summary, result, decision, None, late=[], audit_log="s3://x/")
    assert built["clients_expected"] == 3 and built["clients_committed"] == 2
    assert built["clients_declined"] == {"c": "no rows in the window"}
    assert built["clients_accepted"] == ["a"]
    # Screening's rejections, then the answers the close could not read.
    assert built["clients_rejected"] == [{"client_id": "b", "reason": "free rider"},
                                         {"client_id": "d", "reason": closed["unreadable"]["d"]}]
    assert built["primary_metric"] == "pr_auc" and built["gates"] == result["gates"]
    assert built["decision"] == "rejected" and built["version"] == "3"
    assert built["reason"] == "pr_auc drop; min_roc_auc"
    assert built["evaluation_sources"] == ["federated", "coordinator"] and built["decided_by"] == ["federated"]
    text = round_log.summary_table(built)
    assert "federated median:" in text and "per silo (pr_auc" in text and "not counted c: declined: no rows" in text
    note = round_log.run_note(built)
    assert "Gates on federated evaluation and the coordinator's own rows; failed on federated evaluation" in note


def test_build_report_of_a_round_that_built_nothing():
    closed = {"committed": ["a"], "declined": {}}
    failure = {"step": "aggregate", "reason": "quorum not met: 1 of 3"}
    built = round_log.build_report(plan(), closed, None, None, None, failure, late=[], audit_log="s3://x/")
    assert built["decision"] == "no_model" and built["version"] is None and built["reason"] == failure["reason"]
    assert built["clients_accepted"] == [] and built["clients_rejected"] == [] and built["gates"] == []
    assert built["candidate"] is None and built["primary_metric"] is None
    never_closed = round_log.build_report(plan(), None, None, None, None, None, late=[], audit_log="s3://x/")
    assert never_closed["clients_committed"] == 0 and never_closed["clients_declined"] == {}
    assert never_closed["reason"] == ""


def test_log_lines_keeps_one_record_per_line(caplog):
    with caplog.at_level(logging.INFO, logger="fl_tasks.coordinator"):
        round_log.log_lines("round 000003 summary", round_log.table(["a", "b"], [["x", 1.0]]))
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "round 000003 summary:"
    assert messages[1:] == ["  a       b", "  -  ------", "  x  1.0000"]
