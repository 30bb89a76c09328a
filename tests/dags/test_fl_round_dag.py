"""The DAG file: parses without errors, wires the round's chain, validates trigger params,
and keeps heavy libraries out of parsing."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.sdk.exceptions import ParamValidationError

REPO = Path(__file__).resolve().parents[2]
CHAIN = ["wait_for_previous_round", "prepare_round", "dispatch", "wait_for_quorum", "aggregate", "validate", "register", "promote_or_rollback"]


@pytest.fixture(scope="module")
def dagbag(monkeypatch_module):
    monkeypatch_module.setenv("FL_FEDERATIONS_DIR", str(REPO / "federations"))
    return DagBag(dag_folder=str(REPO / "dags"))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_no_import_errors_and_one_dag_per_federation(dagbag):
    assert dagbag.import_errors == {}
    federations = sorted(p.stem for p in (REPO / "federations").glob("*.yaml"))
    assert sorted(dagbag.dag_ids) == sorted(f"fl_round__{f.replace('-', '_')}" for f in federations)


def test_round_chain_and_branches(dagbag):
    dag = dagbag.dags["fl_round__banks"]
    assert dag.max_active_runs == 1
    for upstream, downstream in zip(CHAIN, CHAIN[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids, (upstream, downstream)
    assert dag.get_task("promote_or_rollback").downstream_task_ids == {"promote", "rollback"}
    summary = dag.get_task("summary")
    assert summary.upstream_task_ids == {"promote", "rollback"}
    assert summary.trigger_rule == "all_done"
    assert type(dag.get_task("wait_for_quorum")).__name__ == "QuorumSensor"


@pytest.mark.parametrize("conf", [
    {"min_clients": 0}, {"min_clients": 6}, {"aggregator": "nope"}, {"learning_rate": 0},
    {"min_roc_auc": 1.5}, {"local_epochs": "three"}, {"round_id": "../escape"},
])
def test_bad_trigger_params_are_refused(dagbag, conf):
    params = copy.deepcopy(dagbag.dags["fl_round__banks"].params)
    with pytest.raises(ParamValidationError):
        params.update(conf)  # the trigger form and the REST API validate the same way


def test_good_trigger_params_pass_with_defaults_from_the_file(dagbag):
    params = copy.deepcopy(dagbag.dags["fl_round__banks"].params)
    params.update({"min_clients": 4, "round_id": "r-7"})
    values = params.validate()
    assert values["min_clients"] == 4 and values["aggregator"] == "fedavg" and values["min_roc_auc"] == 0.9


def test_parsing_the_dag_file_imports_no_heavy_library():
    code = (
        "import sys, runpy; sys.path[:0] = ['plugins', 'dags']; runpy.run_path('dags/fl_round.py');"
        "print(','.join(m for m in ('torch', 'mlflow', 'evidently', 'pandas', 'sklearn') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1:] in ([], [""]), result.stdout
