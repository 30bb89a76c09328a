"""The coordinator's drift table and gate."""

from __future__ import annotations

import pytest

from fl_tasks.coordinator.drift import DriftTable, build_drift_table, drift_gate
from fl_tasks.protocol.drift import DriftReport


def block(drifted: dict[str, bool], share_needed: float = 0.5) -> dict:
    columns = {name: {"score": 0.3 if flag else 0.01, "drifted": flag, "method": "Wasserstein distance (normed)"}
               for name, flag in drifted.items()}
    share = sum(drifted.values()) / len(drifted)
    return {"reference": "first window (round 000001)", "reference_rows": 900, "current_rows": 880,
            "drifted_share": share, "dataset_drifted": share >= share_needed, "columns": columns}


def test_the_table_holds_each_silos_scores_and_says_why_others_have_none():
    table = build_drift_table("000003", ("V1", "V2"), {
        "a": block({"V1": True, "V2": True}), "b": block({"V1": False, "V2": False}), "c": {}, "d": None,
        "e": {**block({"V1": True, "V2": False}), "drifted_share": 7.0}})
    assert sorted(table.silos) == ["a", "b"] and table.drifted_silos == ["a"] and table.drifted_share == 0.5
    assert "first window" in table.missing["c"] and "no update manifest" in table.missing["d"]
    assert "drifted_share" in table.missing["e"]
    assert DriftTable.from_dict(table.as_dict()) == table
    assert table.silos["a"] == DriftReport.from_dict(block({"V1": True, "V2": True}))


@pytest.mark.parametrize("action, passed, warning", [("warn", True, True), ("block", False, False)])
def test_the_gate_warns_or_blocks_a_drifted_silo(action, passed, warning):
    table = build_drift_table("000003", ("V1",), {"a": block({"V1": True}), "b": block({"V1": False})})
    gate = drift_gate(table, action)
    assert (gate["passed"], gate["warning"], gate["source"]) == (passed, warning, "drift")
    assert "1 of 2 silos drifted: a (100% of columns)" in gate["detail"]


def test_no_drift_passes_and_off_gives_no_gate():
    table = build_drift_table("000003", ("V1",), {"a": block({"V1": False})})
    assert drift_gate(table, "block")["passed"] and not drift_gate(table, "block")["warning"]
    assert drift_gate(table, "off") is None
    empty = build_drift_table("000003", ("V1",), {"a": {}})
    assert drift_gate(empty, "block")["passed"] and "no silo sent drift scores" in drift_gate(empty, "block")["detail"]
