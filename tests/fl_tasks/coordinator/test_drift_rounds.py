"""Drift on real rounds, without Airflow: real silo agents compute their scores with
evidently, one silo's data is shifted on purpose, and the coordinator's drift table flags it;
the gate blocks the promotion or only warns, as the federation file says."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fl_tasks.coordinator import RunContext
from fl_tasks.simulation.datasets import shift_rows
from tests.conftest import decide_round

SHIFTED = "silo-1"
COLUMNS = ["Amount", "V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8", "V9", "V10", "V11", "V12", "V13", "V14", "V15"]


def play(coordinator, clients, run_id: str) -> dict:
    round_id = coordinator.prepare(RunContext(run_id=run_id))
    coordinator.dispatch(round_id)
    for agent in clients.values():
        assert agent.answer(round_id)
    coordinator.close_round(round_id, coordinator.check_quorum(round_id))
    coordinator.aggregate(round_id)
    return decide_round(coordinator, round_id)


@pytest.mark.parametrize("action", ["block", "warn"])
def test_a_shifted_silo_is_flagged_and_the_gate_blocks_or_warns(make_federation, action):
    spec, coordinator, clients = make_federation(drift={"reference": "first", "action": action},
                                                 gates={"thresholds": {"roc_auc": 0.5}, "max_regression": 1.0})
    first = play(coordinator, clients, f"drift-{action}-1")
    # The first window of every silo became its reference: no scores yet, and nothing to block.
    assert first["decision"] == "promoted" and first["drift"]["silos"] == {}
    assert sorted(first["drift"]["missing"]) == sorted(clients)

    path = clients[SHIFTED].source.path
    shift_rows(pd.read_parquet(path), COLUMNS, 3.0, 2.0).to_parquet(path, index=False)
    second = play(coordinator, clients, f"drift-{action}-2")
    assert second["drift"]["drifted_silos"] == [SHIFTED]
    assert second["metrics"]["drifted_share"] == pytest.approx(1 / len(clients))
    table = coordinator.drift_table(second["round_id"])
    drifted = {c for c, cell in table.silos[SHIFTED].columns.items() if cell.drifted}
    assert drifted <= set(COLUMNS) and len(drifted) >= len(COLUMNS) // 2
    assert not any(cell.drifted for silo, r in table.silos.items() if silo != SHIFTED for cell in r.columns.values())
    gate = next(g for g in second["gates"] if g["name"] == "drift")
    kinds = {a["kind"] for a in second["alerts"]}
    if action == "block":
        assert second["decision"] == "rejected" and second["decided_by"] == ["drift"] and not gate["passed"]
        assert {"drift", "rollback"} <= kinds and SHIFTED in second["reason"]
    else:
        assert second["decision"] == "promoted" and gate["passed"] and gate["warning"] and "drift" in kinds
    # Scores only: the silo's rows are nowhere in what it sent, its HTML report stayed with it.
    manifest = coordinator.records.get(second["round_id"], f"updates/{SHIFTED}/manifest.json")
    amounts = pd.read_parquet(path)["Amount"].head(50)
    assert not any(f"{v:.6f}" in manifest.decode() for v in amounts if v != 0)
    assert json.loads(manifest)["drift"]["columns"]["Amount"]["drifted"]
    assert list(clients[SHIFTED].state_dir.rglob(f"{second['round_id']}.html"))
