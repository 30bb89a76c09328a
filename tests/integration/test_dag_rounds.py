"""Real DAG runs (`airflow dags test`) against a moto S3 server and a real MLflow store, with
four simulated silos running as separate `fl-client` processes. The gates read the silos'
own evaluations (federated evaluation): the coordinator holds no rows, and its processes run
under a guard (tests/guard) that refuses, and records, any read of a silo's data. The silos
score drift against their first window, and the rounds' alerts go to a webhook on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from fl_tasks.protocol import signing
from fl_tasks.config import load_federation
from fl_tasks.coordinator import Coordinator
from devstack.embedded import airflow, create_buckets, service_env
from fl_tasks.simulation.simulate import SiloProcesses, prepare_silos
from fl_tasks.protocol.storage import ObjectStore
from tests.alert_receivers import Receiver, serve, stop

pytestmark = pytest.mark.integration
GUARD = Path(__file__).resolve().parents[1] / "guard"
CLIENTS = ("silo-0", "silo-1", "silo-2", "silo-3")
LIAR = "silo-1"  # restarted with another behaviour where a case needs one (its champion scores well)


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """An Airflow home on SQLite, an MLflow store, two federations; silos only for the first."""
    import yaml

    from tests.conftest import federation_doc

    state = tmp_path_factory.mktemp("stack")
    federations = state / "federations"
    federations.mkdir()
    # Its silos sign their updates and evaluations, and the DAG's coordinator checks them with
    # the keys it reads from Airflow connections (AIRFLOW_CONN_FL_SIGNING_<CLIENT>). The gates
    # read the silos' evaluations only: no coordinator data.
    active = federation_doc(federation="itest", num_clients=len(CLIENTS), security={"require_signatures": True},
                            simulation={"rows": 12000}, quorum={"min_clients": 3},
                            evaluation={"federated": {"min_silos": 3, "timeout_minutes": 10}, "coordinator_data": ""},
                            drift={"reference": "first", "action": "warn"},
                            alerts={"webhook_conn_id": "fl_alerts", "max_metric_drop": None},
                            monitoring={"max_drifted_share": 0.25, "cooldown_minutes": 0},
                            circuit_breaker={"max_consecutive_failures": 3})
    # Nobody serves this one: its rounds can only miss quorum.
    idle = federation_doc(federation="itest-idle", quorum={"min_clients": 2, "round_timeout_minutes": 0.1})
    for doc in (active, idle):
        (federations / f"{doc['federation']}.yaml").write_text(yaml.safe_dump(doc))
    env = service_env(state, s3_server.endpoint_url, federations)
    webhook = serve(Receiver())
    env.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                "AIRFLOW_CONN_FL_ALERTS": f"http://127.0.0.1:{webhook.port}/fl/alerts"})
    specs = {name: load_federation(federations / f"{name}.yaml") for name in ("itest", "itest-idle")}
    keys = signing.generate_keys(c.id for c in specs["itest"].clients)
    env.update({k: v for k, v in signing.coordinator_env(specs["itest"], keys).items() if k.startswith("AIRFLOW_CONN_")})
    saved = dict(os.environ)
    os.environ.update(env)
    store = ObjectStore(s3_server.endpoint_url)
    for spec in specs.values():
        create_buckets(spec, store)
    migrated = airflow(["db", "migrate"], env)
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    data = prepare_silos(specs["itest"], state)
    silos = SiloProcesses(specs["itest"], data.silos, state / "silo-logs", poll_seconds=0.5, signing_keys=keys).start()
    # The coordinator's processes (only they: the silos above read their own files) may open
    # none of the silos' files, nor the referee's and the simulator's hold-outs.
    guarded = {**env, "PYTHONPATH": os.pathsep.join([str(GUARD), env["PYTHONPATH"]]),
               "FL_GUARD_FORBIDDEN_PATHS": os.pathsep.join(
                   [str(data.silos["silo-0"].parent), str(data.validation), str(data.test)]),
               "FL_GUARD_LOG": str(state / "guard.log")}
    try:
        yield {"env": guarded, "specs": specs, "store": store, "state": state, "silos": silos, "data": data,
               "webhook": webhook}
    finally:
        silos.stop()
        stop(webhook)
        os.environ.clear()
        os.environ.update(saved)


def run_round(stack, federation: str, conf: dict | None = None, dag_id: str | None = None):
    spec = stack["specs"][federation]
    args = ["dags", "test", dag_id or spec.dag_id]
    if conf:
        args += ["--conf", json.dumps(conf)]
    result = airflow(args, stack["env"], timeout=600)
    return result, spec


def guard_log(stack) -> str:
    path = stack["state"] / "guard.log"
    return path.read_text() if path.exists() else ""


def test_the_guard_refuses_a_silos_file_and_the_simulator(stack):
    """The guard itself: a process under it cannot open a silo's file or import the simulator."""
    probe = ("import sys\n"
             "for act in (lambda: open(sys.argv[1], 'rb'), lambda: __import__('fl_tasks.simulation.datasets')):\n"
             "    try:\n        act()\n    except PermissionError as exc:\n        print('refused:', exc)\n")
    target = str(stack["data"].silos["silo-1"])
    done = subprocess.run([sys.executable, "-c", probe, target], env=stack["env"], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.count("refused: the coordinator must not") == 2, done.stdout + done.stderr
    assert f"open {os.path.realpath(target)}" in guard_log(stack) and "import fl_tasks.simulation" in guard_log(stack)
    (stack["state"] / "guard.log").unlink()


def latest_report(stack, federation: str) -> dict:
    spec = stack["specs"][federation]
    coordinator = Coordinator(spec, stack["store"])
    prefix = f"{spec.federation}/rounds/"
    # A round's own report (not an evaluation-only run's evaluation/report.json), the latest by round id.
    reports = sorted(k for k in stack["store"].list_keys(spec.coordinator_bucket, prefix)
                     if k.endswith("/report.json") and k.count("/") == prefix.count("/") + 1)
    assert reports, f"no round report under s3://{spec.coordinator_bucket}/{prefix}"
    return json.loads(stack["store"].get_bytes(coordinator.bucket, reports[-1]))


def test_round_promotes_and_sets_champion(stack):
    result, spec = run_round(stack, "itest")
    output = result.stdout + result.stderr
    (stack["state"] / "promote-round.log").write_text(output)
    report = latest_report(stack, "itest")
    assert report["decision"] == "promoted", (report, output[-4000:])
    assert report["clients_committed"] == 4 and len(report["clients_accepted"]) == 4  # signatures verified
    # The gates read the silos' own evaluations; the coordinator opened none of their rows.
    assert report["evaluation_sources"] == ["federated"] and report["coordinator_evaluation"] is None
    per_silo = report["federated_evaluation"]["per_silo"]
    assert len(per_silo) >= 3 and all(set(r["scores"]) == {"candidate"} for r in per_silo.values())
    assert guard_log(stack) == ""
    assert "deferring until quorum" in output.split("starting task_id=wait_for_evaluations")[1]
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(spec.model_name, "champion")
    assert str(champion.version) == report["version"]
    assert champion.tags["fl.round_id"] == report["round_id"]
    assert champion.tags["fl.federation"] == "itest"
    assert champion.tags["fl.base_version"] == "seed"
    assert champion.tags["fl.airflow_run_id"] == report["run_id"]
    assert champion.tags["fl.evaluated_by"] == ",".join(sorted(per_silo))
    run = client.get_run(champion.run_id)
    assert run.data.params["participating_clients"] == ",".join(CLIENTS)
    assert abs(sum(v for k, v in run.data.metrics.items() if k.startswith("weight_")) - 1.0) < 1e-9
    for client_id, scored in per_silo.items():
        assert run.data.metrics[f"silo_{client_id}_candidate_pr_auc"] == scored["scores"]["candidate"]["pr_auc"]


def test_multi_krum_and_the_median_against_a_lying_evaluator(stack):
    """One run, two things from the trigger form: multi_krum picks the updates, and the gates
    read the median, which a silo that reports a perfect candidate on a thousand times its
    rows cannot move past the honest silos' own numbers."""
    stack["silos"].restart(LIAR, "inflated_eval")
    result, _ = run_round(stack, "itest", {"aggregator": "multi_krum", "aggregator_params": {"f": 0, "m": 2},
                                           "evaluation_statistic": "median", "gate_thresholds": {"roc_auc": 0.999}})
    output = result.stdout + result.stderr
    (stack["state"] / "multi_krum-round.log").write_text(output)
    report = latest_report(stack, "itest")
    assert report["settings"]["aggregator"] == "multi_krum"
    assert report["settings"]["aggregator_params"] == {"f": 0, "m": 2}
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(client.get_model_version(stack["specs"]["itest"].model_name, report["version"]).run_id)
    assert run.data.params["aggregator"] == "multi_krum"
    # The logs say what happened: the rule, each update's norm and verdict, what it selected.
    assert "strategy multi_krum (f=0, m=2)" in output and "screening: max_update_norm" in output
    assert "rule: multi_krum (f=0, m=2): unweighted mean of the 2 updates with the lowest scores" in output
    selected = [k.removeprefix("selected_") for k, v in run.data.metrics.items() if k.startswith("selected_") and v]
    assert len(selected) == 2 and f"selected: {', '.join(sorted(selected))}" in output
    assert {k: v for k, v in run.data.metrics.items() if k.startswith("weight_")} == {
        f"weight_{c}": (0.5 if c in selected else 0.0) for c in CLIENTS}
    # The liar's numbers are recorded, and the median stays among the honest silos'.
    fed = report["federated_evaluation"]
    liar = fed["per_silo"][LIAR]
    assert liar["scores"]["candidate"]["roc_auc"] == 1.0 and liar["num_examples"] >= 1000
    honest = sorted(r["scores"]["candidate"]["roc_auc"] for c, r in fed["per_silo"].items() if c != LIAR)
    median = fed["figures"]["median"]["candidate"]["roc_auc"]
    assert honest[0] <= median <= honest[-1] < 0.999 and fed["figures"]["mean"]["candidate"]["roc_auc"] > median
    assert report["decision"] == "rejected" and report["decided_by"] == ["federated"]
    gate = next(g for g in report["gates"] if g["name"] == "min_roc_auc")
    assert not gate["passed"] and gate["detail"].startswith(f"median over {len(fed['per_silo'])} silos")
    assert f"round {report['round_id']} summary:" in output and "per silo (pr_auc" in output
    # Nothing MLflow says while registering shows up as an error (it used to write INFO to stderr).
    register_log = output.split("starting task_id=register")[1].split("end task task_id=register")[0]
    assert "[error" not in register_log and "ERROR" not in register_log
    # Tasks whose result the step logs itself do not dump it again as one long line.
    assert "Returned value was: {'passed'" not in output and "Returned value was: {'federation'" not in output
    # airflow dags test runs no api-server: the run note is skipped, and says why.
    assert "run note not set: no Airflow connection 'fl_airflow_api'" in output
    assert guard_log(stack) == ""


def test_one_silo_regressing_on_its_own_data_rolls_the_round_back(stack):
    stack["silos"].restart(LIAR, "sandbagged_eval")
    # The overall regression bound is relaxed so that the per-silo bound alone decides.
    result, _ = run_round(stack, "itest", {"max_regression": 1.0, "max_silo_regression": 0.1})
    report = latest_report(stack, "itest")
    assert report["decision"] == "rejected", (report, result.stdout[-4000:])
    failed = [g for g in report["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["max_silo_regression"] and failed[0]["silos"] == [LIAR]
    assert f"{LIAR} +" in failed[0]["detail"] and LIAR in report["reason"]
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    version = client.get_model_version(stack["specs"]["itest"].model_name, report["version"])
    assert version.tags["fl.decision"] == "rejected" and "max_silo_regression" not in version.tags["fl.gates"]
    assert LIAR in version.tags["fl.rejected_reason"]


def test_an_evaluation_quorum_missed_at_its_deadline_rolls_back(stack):
    stack["silos"].restart(LIAR, "no_eval")
    result, _ = run_round(stack, "itest", {"min_evaluating_silos": 4, "evaluation_timeout_minutes": 0.2})
    output = result.stdout + result.stderr
    report = latest_report(stack, "itest")
    assert report["decision"] == "rejected", (report, output[-4000:])
    gate = next(g for g in report["gates"] if g["name"] == "min_evaluating_silos")
    assert not gate["passed"] and f"{LIAR}: no answer by the deadline" in gate["detail"]
    assert "quorum not met" in output.split("starting task_id=wait_for_evaluations")[1]


def test_an_evaluation_only_run_scores_the_champion_and_a_version(stack):
    stack["silos"].restart(LIAR, "honest")
    spec = stack["specs"]["itest"]
    result, _ = run_round(stack, "itest", {"version": "2"}, dag_id=spec.evaluation_dag_id)
    output = result.stdout + result.stderr
    reports = sorted(k for k in stack["store"].list_keys(spec.coordinator_bucket, f"{spec.federation}/rounds/eval-")
                     if k.endswith("/evaluation/report.json"))
    assert reports, output[-4000:]
    report = json.loads(stack["store"].get_bytes(spec.coordinator_bucket, reports[-1]))
    assert report["models"] == {"champion": "1", "version-2": "2"}
    assert sorted(report["per_silo"]) == list(CLIENTS) and report["enough_silos"]
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(report["mlflow_run_id"])
    assert run.data.metrics["mean_version-2_pr_auc"] == report["figures"]["mean"]["version-2"]["pr_auc"]
    assert client.get_model_version(spec.model_name, "2").tags["fl.last_evaluation"].startswith(
        report["evaluation_id"])
    # Nothing trained, registered or promoted.
    assert len(client.search_model_versions(f"name = '{spec.model_name}'")) == 4
    assert str(client.get_model_version_by_alias(spec.model_name, "champion").version) == "1"
    assert "deferring until quorum" in output and guard_log(stack) == ""


def alerts_posted(stack, round_id: str) -> dict[str, str]:
    """kind -> message of the alerts the webhook received for a round."""
    posted = [json.loads(r["body"]) for r in stack["webhook"].requests]
    return {a["kind"]: a["message"] for body in posted if body["round_id"] == round_id for a in body["alerts"]}


def test_after_three_rolled_back_rounds_the_circuit_breaker_refuses_the_next(stack):
    """The three rounds above rolled back; a fourth is refused before dispatch, with an alert,
    and nothing reaches the silos."""
    result, spec = run_round(stack, "itest")
    output = result.stdout + result.stderr
    report = latest_report(stack, "itest")
    assert report["decision"] == "refused", (report, output[-4000:])
    assert "circuit breaker open: the last 3 rounds failed or rolled back" in report["reason"]
    assert "reset_circuit_breaker" in report["reason"] and "ended without a new model" in output
    for client in spec.clients:
        assert not stack["store"].exists(client.bucket_name,
                                         f"{spec.federation}/rounds/{report['round_id']}/global/manifest.json")
    assert "not dispatched, circuit breaker open after 3" in alerts_posted(stack, report["round_id"])["circuit_open"]


def test_a_shifted_silo_is_flagged_alerted_and_the_monitor_asks_for_a_round(stack):
    """One silo's data shifts (its amounts and first features grow): its drift scores flag it
    in the round's drift table, the gate warns (action warn: still promoted), the alert reaches
    the webhook, the round's page shows the heat map, and the monitoring DAG asks for a round."""
    import sqlite3

    import pandas as pd

    from fl_tasks.simulation.datasets import shift_rows

    shifted = "silo-2"
    path = stack["data"].silos[shifted]
    rows = pd.read_parquet(path)
    shift_rows(rows, ["Amount", "V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8", "V9", "V10", "V11", "V12", "V13",
                      "V14", "V15"], 3.0, 2.0).to_parquet(path, index=False)
    # The operator resets the breaker the round above tripped, from the trigger form.
    result, spec = run_round(stack, "itest", {"reset_circuit_breaker": True, "max_regression": 1.0})
    output = result.stdout + result.stderr
    report = latest_report(stack, "itest")
    assert report["decision"] in ("promoted", "rejected") and report["clients_committed"] == 4, output[-4000:]
    assert report["drift"]["drifted_silos"] == [shifted], report["drift"]
    assert report["drift"]["silos"][shifted] >= 0.5 and report["metrics"]["drifted_share"] == 0.25
    gate = next(g for g in report["gates"] if g["name"] == "drift")
    assert gate["passed"] and gate["warning"] and shifted in gate["detail"]
    table = json.loads(stack["store"].get_bytes(spec.coordinator_bucket,
                                                f"{spec.federation}/rounds/{report['round_id']}/drift.json"))
    assert table["silos"][shifted]["columns"]["Amount"]["drifted"]
    assert not any(cell["drifted"] for silo, r in table["silos"].items() if silo != shifted
                   for cell in r["columns"].values())
    assert shifted in alerts_posted(stack, report["round_id"])["drift"]
    # The round's figures, in the report and in MLflow, and its page with plots.
    metrics = report["metrics"]
    assert metrics["participation_rate"] == 1.0 and metrics["latency_p95"] > 0 and metrics["bytes_up"] > 0
    page = stack["store"].get_bytes(spec.coordinator_bucket, f"{spec.federation}/rounds/{report['round_id']}/report.html")
    assert page is not None and shifted.encode() in page and b"<svg" in page
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    run = client.get_run(client.get_model_version(spec.model_name, report["version"]).run_id)
    assert run.data.metrics["drifted_share"] == 0.25 and run.data.metrics["participation_rate"] == 1.0
    assert {f.path for f in client.list_artifacts(run.info.run_id, "drift")} == {"drift/drift.json"}
    # The HTML report stays at the silo.
    assert list((stack["state"] / "silo-state" / shifted).rglob(f"{report['round_id']}.html"))
    assert "Returned value was" not in output.split("starting task_id=summary")[1].split("end task")[0]

    monitor, _ = run_round(stack, "itest", dag_id=spec.monitor_dag_id)
    monitored = monitor.stdout + monitor.stderr
    assert "a round is due: drift: 1 of 4 silos drifted" in monitored, monitored[-4000:]
    db = stack["env"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].removeprefix("sqlite:///")
    with sqlite3.connect(db) as conn:
        events = conn.execute("SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = ?",
                              (spec.retrain_asset_uri,)).fetchall()
    assert [json.loads(e)["reason"].startswith(f"drift: 1 of 4 silos drifted in round {report['round_id']}")
            for (e,) in events] == [True]
    # `airflow dags test` parses only the DAG it runs, so no round DAG consumes the event here:
    # on the stack, the scheduler starts the round (tests/e2e, the monitoring test).


def test_round_missing_quorum_ends_without_a_model(stack):
    result, spec = run_round(stack, "itest-idle")
    report = latest_report(stack, "itest-idle")
    assert report["decision"] == "no_model"
    assert "quorum not met: 0 of 3" in report["reason"]
    client = MlflowClient(tracking_uri=stack["env"]["MLFLOW_TRACKING_URI"])
    assert client.search_model_versions(f"name = '{spec.model_name}'") == []
    # The sensor handed the wait to the triggerer instead of holding a worker slot.
    assert "deferring until quorum" in result.stdout + result.stderr
    assert "ended without a new model" in result.stdout + result.stderr
