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
CHAIN = ["wait_for_previous_round", "prepare_round", "dispatch", "wait_for_quorum", "aggregate", "request_evaluation",
         "wait_for_evaluations", "validate", "register", "promote_or_rollback"]
CHECK_CHAIN = ["prepare_evaluation", "request_evaluation", "wait_for_evaluations", "report_evaluation"]


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
    # Each federation that evaluates on its silos also gets its evaluation-only DAG, and each its monitoring DAG.
    assert sorted(dagbag.dag_ids) == sorted(f"fl_{kind}__{f.replace('-', '_')}" for f in federations
                                            for kind in ("round", "evaluate", "monitor"))


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
    waits = dag.get_task("wait_for_evaluations")
    assert type(waits).__name__ == "QuorumSensor" and waits.answers == "evaluation"
    assert "the mean over at least 3 silos" in dag.doc_md


def test_evaluation_only_dag(dagbag):
    dag = dagbag.dags["fl_evaluate__banks"]
    for upstream, downstream in zip(CHECK_CHAIN, CHECK_CHAIN[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids, (upstream, downstream)
    assert dag.schedule is None and dag.get_task("wait_for_evaluations").answers == "evaluation"
    params = copy.deepcopy(dag.params)
    params.update({"version": "3"})
    assert params.validate()["version"] == "3"
    with pytest.raises(ParamValidationError):
        params.update({"version": "champion; drop"})


def test_monitoring_starts_rounds_through_the_federations_asset(dagbag):
    """fl_monitor__<F> emits events on the asset that fl_round__<F> is scheduled on (next to
    its cron timetable, which keeps its data intervals for backfills)."""
    monitor, rounds = dagbag.dags["fl_monitor__banks"], dagbag.dags["fl_round__banks"]
    assert monitor.get_task("check_federation").downstream_task_ids == {"request_round"}
    [outlet] = monitor.get_task("request_round").outlets
    assert outlet.uri == "x-fl://banks/retrain"
    assert type(rounds.timetable).__name__ == "AssetOrTimeSchedule"
    assert rounds.timetable.asset_condition.uri == outlet.uri
    assert type(rounds.timetable.timetable).__name__ == "CronDataIntervalTimetable"
    # A federation without a schedule is started by hand and by the monitor only.
    claims = dagbag.dags["fl_round__claims"]
    assert [a.uri for a in claims.timetable.asset_condition.objects] == ["x-fl://claims/retrain"]
    assert "half" not in monitor.doc_md and "at least 50% of the silos drifted" in monitor.doc_md


def test_an_asset_triggered_run_records_the_monitors_reason():
    from types import SimpleNamespace

    from fl_round import trigger_reason

    events = {"asset": [SimpleNamespace(extra={"reason": "drift: 3 of 5 silos drifted"}), SimpleNamespace(extra=None)]}
    assert trigger_reason({"triggering_asset_events": events}) == "drift: 3 of 5 silos drifted"
    assert trigger_reason({}) == ""


def test_without_federated_evaluation_the_round_has_no_evaluation_steps(tmp_path, monkeypatch):
    federations = tmp_path / "federations"
    federations.mkdir()
    text = (REPO / "federations" / "banks.yaml").read_text()
    start = text.index("evaluation:\n")
    end = text.index("\n", text.index("statistic:", start))
    (federations / "banks.yaml").write_text(text[:start] + "evaluation: {federated: false, coordinator_data: "
                                            "s3://fl-coordinator/banks/holdout.parquet}" + text[end:])
    monkeypatch.setenv("FL_FEDERATIONS_DIR", str(federations))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {} and sorted(bag.dag_ids) == ["fl_monitor__banks", "fl_round__banks"]
    dag = bag.dags["fl_round__banks"]
    assert "validate" in dag.get_task("aggregate").downstream_task_ids
    assert "wait_for_evaluations" not in dag.task_ids


@pytest.mark.parametrize("conf", [
    {"min_clients": 0}, {"min_clients": 6}, {"aggregator": "nope"}, {"learning_rate": 0},
    {"gate_thresholds": "high"}, {"max_regression": -0.1}, {"local_epochs": "three"}, {"round_id": "../escape"},
])
def test_bad_trigger_params_are_refused(dagbag, conf):
    params = copy.deepcopy(dagbag.dags["fl_round__banks"].params)
    with pytest.raises(ParamValidationError):
        params.update(conf)  # the trigger form and the REST API validate the same way


def test_good_trigger_params_pass_with_defaults_from_the_file(dagbag):
    params = copy.deepcopy(dagbag.dags["fl_round__banks"].params)
    params.update({"min_clients": 4, "round_id": "r-7"})
    values = params.validate()
    assert values["min_clients"] == 4 and values["aggregator"] == "weighted_median"
    assert values["gate_thresholds"] == {"roc_auc": 0.8, "pr_auc": 0.3} and values["max_regression"] == 0.02
    assert values["min_evaluating_silos"] == 3 and values["evaluation_statistic"] == "mean"
    assert values["max_silo_regression"] is None


def test_the_trigger_form_is_the_settings_table():
    """Every per-round setting appears in the form once, typed and bounded as fl_tasks.settings says."""
    from fl_round import round_params

    from fl_tasks.config import load_federation
    from fl_tasks.settings import ROUND_SETTINGS

    spec = load_federation(REPO / "federations" / "banks.yaml")
    params = round_params(spec)
    assert sorted(params) == sorted([s.name for s in ROUND_SETTINGS] + ["round_id", "reset_circuit_breaker"])
    assert params["reset_circuit_breaker"].value is False
    assert params["min_clients"].schema["maximum"] == len(spec.clients) == 5
    assert params["min_fraction"].schema["type"] == ["number", "null"]


def test_a_broken_federation_file_leaves_the_other_dags_and_shows_its_error(tmp_path, monkeypatch):
    """One typo must not take every federation's DAG down: the good files still load, and the
    bad one becomes a paused DAG whose description names the file, the field and the fix."""
    import shutil

    federations = tmp_path / "federations"
    federations.mkdir()
    shutil.copy(REPO / "federations" / "banks.yaml", federations / "banks.yaml")
    broken = (REPO / "federations" / "banks.yaml").read_text().replace("federation: banks", "federation: broken")
    (federations / "broken.yaml").write_text(broken.replace("min_clients: 3", "min_client: 3"))
    (federations / "garbled.yaml").write_text("federation: [unclosed")
    monkeypatch.setenv("FL_FEDERATIONS_DIR", str(federations))
    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == ["fl_config_error__broken", "fl_config_error__garbled", "fl_evaluate__banks",
                                   "fl_monitor__banks", "fl_round__banks"]
    error = bag.dags["fl_config_error__broken"]
    assert "broken.yaml: field 'quorum.min_client': unknown field. Fix: did you mean 'min_clients'?" in \
        error.description
    assert error.is_paused_upon_creation and "config-error" in error.tags
    assert "line 1" in bag.dags["fl_config_error__garbled"].description


def test_parsing_the_dag_file_imports_no_heavy_library():
    # numpy too: it would double the parse, which the dag-processor repeats for every file.
    code = (
        "import sys, runpy; sys.path[:0] = ['plugins', 'dags']; runpy.run_path('dags/fl_round.py');"
        "print(','.join(m for m in ('torch', 'mlflow', 'evidently', 'pandas', 'sklearn', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1:] in ([], [""]), result.stdout
