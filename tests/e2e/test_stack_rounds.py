"""End to end on real services: PostgreSQL, an S3 server, an MLflow tracking server, the
Airflow api-server, scheduler, dag-processor and triggerer (LocalExecutor), and silo agents.

Rounds are started the way users start them: the REST API (as the trigger form does), the
schedule, and `airflow backfill create`. The stack is started and stopped with the README's
own `make stack` and `make stack-down`, and the README's CLI and `curl` commands run
verbatim against it (tests/e2e/readme.py); the `banks` federation here is a small synthetic
stand-in for federations/banks.yaml with the same schedule.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from fl_tasks import protocol
from fl_tasks.config import load_federation
from devstack.embedded import REPO
from devstack.localstack import LocalStack
from fl_tasks.protocol import GlobalManifest, UpdateManifest
from fl_tasks.protocol.storage import ObjectStore

from tests.conftest import federation_doc
from tests.e2e import readme

pytestmark = pytest.mark.e2e
CHROMIUM = "/usr/bin/chromium"  # Debian's package; `make test` installs it
# As root in a container, without a GPU, on a machine whose network is closed.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]

FEDERATIONS = {
    # Its silos' updates must be signed: the stack's Airflow reads their keys from connections.
    # Nobody serves it: its quorum sensor can only wait, deferred, until the deadline.
    "e2e-idle": {"quorum": {"min_clients": 2, "round_timeout_minutes": 2}},
    "e2e-sched": {"schedule": "@hourly", "training": {"window": "all"}},
    # Its silos are played by the test, so that the round waits while the scheduler dies.
    "e2e-restart": {"quorum": {"min_clients": 3, "round_timeout_minutes": 15, "poll_interval_seconds": 1}},
    # The README's examples run against it: banks.yaml's schedule and dates, synthetic data.
    # Its silos' updates must be signed, as banks.yaml's: the stack's Airflow reads their keys from connections.
    "banks": {"schedule": "0 */8 * * *", "start_date": "2013-09-01", "end_date": "2013-09-03",
              "security": {"require_signatures": True},
              "gates": {"thresholds": {"roc_auc": 0.5}}, "quorum": {"min_clients": 3, "round_timeout_minutes": 5},
              "clients": [{"id": f"bank-{i}", "bucket": f"s3://e2e-bank-{i}-{uuid.uuid4().hex[:6]}"}
                          for i in range(4)],
              "simulation": {"source": "synthetic", "rows": 12000, "seed": 5},
              # Its monitor finds the champion below this bar, and asks for a round (the last test).
              "monitoring": {"min_metrics": {"roc_auc": 0.999}, "cooldown_minutes": 0}},
}
NO_SILOS = ("e2e-idle", "e2e-restart")


class Api:
    """A REST client for /api/v2 that logs in like a user does (POST /auth/token)."""

    def __init__(self, base: str, password: str):
        self.base = base
        token = self._call("POST", "/auth/token", {"username": "admin", "password": password}, auth=False)
        self.token = token["access_token"]

    def _call(self, method: str, path: str, body: dict | None = None, auth: bool = True):
        request = urllib.request.Request(f"{self.base}{path}", method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        if auth:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def get(self, path: str):
        return self._call("GET", path)

    def post(self, path: str, body: dict):
        return self._call("POST", path, body)

    def runs(self, dag_id: str) -> list[dict]:
        return self.get(f"/api/v2/dags/{dag_id}/dagRuns?order_by=run_after&limit=100")["dag_runs"]

    def wait_for(self, what: str, check, timeout: float, interval: float = 3):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = check()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> dict:
        def finished():
            run = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            return run if run["state"] in ("success", "failed") else None

        return self.wait_for(f"run {run_id} of {dag_id}", finished, timeout)


def make(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A README `make` command, verbatim, from the repository root."""
    assert command.startswith("make "), command
    return subprocess.run(["bash", "-c", command], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def stack():
    """The README's `make stack` in a folder of its own: its state where the README says
    (`.state/stack` under `root`, where the README's other commands run), free ports, and
    the test federations."""
    root = REPO / ".state" / f"e2e-{uuid.uuid4().hex[:8]}"
    state, federations = root / ".state" / "stack", root / "federations"
    federations.mkdir(parents=True)
    for name, overrides in FEDERATIONS.items():
        (federations / f"{name}.yaml").write_text(yaml.safe_dump(federation_doc(federation=name, **overrides)))
    where = {"FL_STACK_DIR": str(state), "FL_FEDERATIONS_DIR": str(federations), "FL_STACK_PORTS": "free",
             "FL_STACK_NO_SILOS": ",".join(NO_SILOS)}
    blocks = readme.shell_blocks()
    up, source = readme.command_lines(blocks[0])
    down = readme.command_lines(blocks[-1])[0]
    assert (up, down) == ("make stack", "make stack-down") and source == "source .state/stack/env"
    started = time.monotonic()
    try:
        result = make(up, where)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # make stack names the one step to take (here from the repository root, where make runs).
        assert f"source {(state / 'env').relative_to(REPO)} " in result.stdout
        local = LocalStack.load(state)
        local.startup_seconds = time.monotonic() - started
        # This process reads the stack's S3 as its services do.
        os.environ.update({k: local.env()[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        api = Api(local.airflow_url, local.password())
        for name in FEDERATIONS:
            api.wait_for(f"DAG of {name} parsed", lambda n=name: _dag_exists(api, n), timeout=120)
        specs = {name: load_federation(federations / f"{name}.yaml") for name in FEDERATIONS}
        yield {"stack": local, "api": api, "specs": specs, "store": ObjectStore(local.s3_url),
               "mlflow": MlflowClient(tracking_uri=local.mlflow_url), "root": root, "source": source}
    finally:
        stopped = make(down, where)
        if not os.environ.get("FL_KEEP_STATE"):  # set it to keep logs and data for debugging
            shutil.rmtree(root, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr[-3000:]


def _dag_exists(api: Api, federation: str) -> bool:
    try:
        api.get(f"/api/v2/dags/fl_round__{federation.replace('-', '_')}")
        return True
    except urllib.error.HTTPError:
        return False


def dag_id(name: str) -> str:
    return f"fl_round__{name.replace('-', '_')}"


def report_of(env, name: str, round_id: str) -> dict:
    spec = env["specs"][name]
    raw = env["store"].get_bytes(spec.coordinator_bucket, f"{spec.federation}/rounds/{round_id}/report.json")
    assert raw is not None, f"no report for round {round_id} of {name}"
    return json.loads(raw)


def test_stack_starts_within_two_minutes(stack):
    assert stack["stack"].startup_seconds < 120


def test_every_service_listens_on_loopback_only(stack):
    import psutil

    local = stack["stack"]
    postmaster = int((local.postgres.data_dir / "postmaster.pid").read_text().split()[0])
    pids = {postmaster}
    for pid in (pid for pid in local.processes.values() if pid > 0):
        pids |= {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    exposed = [(c.pid, c.laddr) for c in listening if c.laddr.ip not in ("127.0.0.1", "::1")]
    assert exposed == [], f"listening beyond loopback: {exposed}"
    # Every service of the stack was among them, so the check above saw them all.
    assert {c.laddr.port for c in listening} >= set(local.ports.values())


def test_a_param_outside_its_schema_is_refused_before_any_run_exists(stack):
    api, name = stack["api"], "banks"
    before = len(api.runs(dag_id(name)))
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.post(f"/api/v2/dags/{dag_id(name)}/dagRuns", {"logical_date": None, "conf": {"min_clients": 99}})
    assert refused.value.code in (400, 422)
    assert "min_clients" in refused.value.read().decode()
    assert len(api.runs(dag_id(name))) == before  # refused before any run was created


def wait_for_sensor(api: Api, name: str, run_id: str) -> str:
    """The quorum sensor's first settled state: deferred, success or failed."""
    def sensor_state():
        try:
            ti = api.get(f"/api/v2/dags/{dag_id(name)}/dagRuns/{run_id}/taskInstances/wait_for_quorum")
        except urllib.error.HTTPError:
            return None
        return ti["state"] if ti["state"] in ("deferred", "success", "failed") else None

    return api.wait_for("the quorum sensor to settle", sensor_state, timeout=120, interval=1)


def audit_counts(env, name: str, round_id: str) -> dict[str, int]:
    spec = env["specs"][name]
    counts: dict[str, int] = {}
    for key in env["store"].list_keys(spec.coordinator_bucket, f"{spec.federation}/audit/{round_id}/"):
        for line in env["store"].get_bytes(spec.coordinator_bucket, key).splitlines():
            event = json.loads(line)["event"]
            counts[event] = counts.get(event, 0) + 1
    return counts


def test_scheduler_and_triggerer_killed_mid_round_then_restarted_finish_the_round(stack):
    api, name, local = stack["api"], "e2e-restart", stack["stack"]
    spec = stack["specs"][name]
    run = api.post(f"/api/v2/dags/{dag_id(name)}/dagRuns", {"logical_date": None, "conf": {}})

    assert wait_for_sensor(api, name, run["dag_run_id"]) == "deferred"
    local.kill("airflow-scheduler")
    local.kill("airflow-triggerer")
    # The clients answer while no scheduler or triggerer is alive (from the data make stack prepared).
    from fl_tasks.silo.agent import SiloAgent
    from fl_tasks.silo.sources import FileSource

    for client in spec.clients:
        silo = local.state_dir / "data" / name / "silos" / f"{client.id}.parquet"
        agent = SiloAgent(client.id, spec.federation, client.bucket, FileSource(silo), stack["store"])
        assert agent.answer("000001")
    local.start_airflow("scheduler")
    local.start_airflow("triggerer")
    finished = api.wait_for_run(dag_id(name), run["dag_run_id"], timeout=300)
    assert finished["state"] == "success"
    report = report_of(stack, name, "000001")
    assert report["decision"] == "promoted" and report["clients_accepted"] == [c.id for c in spec.clients]
    assert len(stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'")) == 1


def test_quorum_sensor_is_deferred_while_clients_are_slow(stack):
    api, name = stack["api"], "e2e-idle"
    run = api.post(f"/api/v2/dags/{dag_id(name)}/dagRuns", {"logical_date": None, "conf": {}})

    assert wait_for_sensor(api, name, run["dag_run_id"]) == "deferred"


def test_scheduled_federation_produces_rounds_on_its_own(stack):
    api, name = stack["api"], "e2e-sched"

    def scheduled_success():
        runs = [r for r in api.runs(dag_id(name)) if r["run_type"] == "scheduled"]
        for run in (r for r in runs if r["state"] == "failed"):  # none other comes before the next interval
            instances = api.get(f"/api/v2/dags/{dag_id(name)}/dagRuns/{run['dag_run_id']}/taskInstances")
            failed = [t["task_id"] for t in instances["task_instances"] if t["state"] == "failed"]
            raise AssertionError(f"scheduled run {run['dag_run_id']} failed; failed tasks: {failed}")
        succeeded = [r for r in runs if r["state"] == "success"]
        return succeeded[0] if succeeded else None

    run = api.wait_for("a scheduled round", scheduled_success, timeout=420)
    start = datetime.fromisoformat(run["data_interval_start"].replace("Z", "+00:00"))
    report = report_of(stack, name, protocol.round_id_for_interval(start))
    assert report["run_type"] == "scheduled" and report["decision"] in ("promoted", "rejected")


def run_readme_example(env, example: str) -> subprocess.CompletedProcess:
    """One README example, verbatim, in a shell that took the README's one step first."""
    result = subprocess.run(["bash", "-c", f"set -euo pipefail\n{env['source']}\n{example}"], cwd=env["root"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{example}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def wait_for_new_runs(api: Api, before: set[str], count: int, timeout: float = 900) -> list[dict]:
    """The runs created since `before`, once `count` exist and every run of the DAG has finished."""
    def done():
        runs = api.runs(dag_id("banks"))
        new = [r for r in runs if r["dag_run_id"] not in before]
        finished = all(r["state"] in ("success", "failed") for r in runs)
        return sorted(new, key=lambda r: r["run_after"]) if len(new) >= count and finished else None

    return api.wait_for(f"{count} new runs of banks to finish", done, timeout, interval=5)


def failed_tasks(api: Api, runs: list[dict]) -> dict[str, list]:
    """What went wrong in the runs that failed: each failed task and the last lines of its log."""
    found = {}
    for run in (r for r in runs if r["state"] != "success"):
        try:
            instances = api.get(f"/api/v2/dags/{dag_id('banks')}/dagRuns/{run['dag_run_id']}/taskInstances")
            found[run["dag_run_id"]] = [(t["task_id"], [e.get("event") for e in task_log(
                api, run["dag_run_id"], t["task_id"])][-8:]) for t in instances["task_instances"]
                if t["state"] == "failed"]
        except Exception as exc:  # the message of a failing assertion: never hide the failure itself
            found[run["dag_run_id"]] = [f"could not read its tasks: {exc!r}"]
    return found


def task_log(api: Api, run_id: str, task_id: str) -> list[dict]:
    return api.get(f"/api/v2/dags/{dag_id('banks')}/dagRuns/{run_id}/taskInstances/{task_id}/logs/1")["content"]


def test_readme_stack_commands_work_verbatim(stack):
    """Every command of the README's stack section, pasted as printed after `source .state/stack/env`."""
    api, spec, client = stack["api"], stack["specs"]["banks"], stack["mlflow"]
    cli, rest, backfill = readme.paragraphs(readme.shell_blocks()[1])

    # 1. From the CLI: a round whose gate cannot pass is rolled back, and says so.
    before = {r["dag_run_id"] for r in api.runs(dag_id("banks"))}
    run_readme_example(stack, cli)
    [run] = wait_for_new_runs(api, before, 1)
    assert run["state"] == "success" and run["conf"] == {"gate_thresholds": {"roc_auc": 0.999}}
    report = report_of(stack, "banks", "000001")
    assert report["run_id"] == run["dag_run_id"] and report["decision"] == "rejected"
    assert run["note"].startswith(f"**Round 000001: rolled back** · version {report['version']}")
    assert "Reason: candidate roc_auc" in run["note"] and "0.9990" in run["note"]
    stack["rolled_back_run"] = run["dag_run_id"]
    rejected = client.get_model_version(spec.model_name, report["version"])
    assert rejected.tags["fl.decision"] == "rejected" and "0.9990" in rejected.tags["fl.rejected_reason"]
    assert rejected.tags["fl.base_version"] == "seed"  # the champion stays where it was: none yet
    # Its rollback task links to the MLflow version, the round's run and its audit log.
    version = client.get_model_version(spec.model_name, report["version"])
    links = api.get(f"/api/v2/dags/{dag_id('banks')}/dagRuns/{run['dag_run_id']}/taskInstances/rollback/links")
    ui = stack["stack"].mlflow_url
    experiment = client.get_run(version.run_id).info.experiment_id
    assert links["extra_links"] == {
        "MLflow model version": f"{ui}/#/models/{spec.model_name}/versions/{report['version']}",
        "MLflow run": f"{ui}/#/experiments/{experiment}/runs/{version.run_id}",
        "Audit log": f"{ui}/#/experiments/{experiment}/runs/{version.run_id}/artifacts/audit/audit.jsonl"}
    assert "audit/audit.jsonl" in [a.path for a in client.list_artifacts(version.run_id, "audit")]
    # Logs a person can read: MLflow's messages at their own level, no false errors.
    register = task_log(api, run["dag_run_id"], "register")
    assert not [e for e in register if e.get("level") in ("error", "critical")], register
    assert any("Waiting up to" in str(e.get("event")) and e.get("level") == "info" for e in register)
    quorum = [e["event"] for e in task_log(api, run["dag_run_id"], "wait_for_quorum")
              if str(e.get("event")).startswith("round 000001:")]
    # Changes only, not one line per poll: the sensor's first check and its close, and the
    # trigger's first count, one line per poll that found new commits, and "all committed".
    assert 2 <= len(quorum) <= len(spec.clients) + 3, quorum

    # 2. From the REST API with curl: the median round logs no per-client weights.
    before = {r["dag_run_id"] for r in api.runs(dag_id("banks"))}
    run_readme_example(stack, rest)
    [run] = wait_for_new_runs(api, before, 1)
    assert run["state"] == "success" and run["conf"] == {"aggregator": "median", "min_clients": 4}
    report = report_of(stack, "banks", "000002")
    assert report["settings"]["aggregator"] == "median" and run["note"].startswith("**Round 000002: ")
    assert report["clients_accepted"] == [c.id for c in spec.clients]  # every signature verified
    version = client.get_model_version(spec.model_name, report["version"])
    assert version.tags["fl.airflow_run_id"] == run["dag_run_id"]
    mlflow_run = client.get_run(client.get_model_version(spec.model_name, report["version"]).run_id)
    assert not [k for k in mlflow_run.data.metrics if k.startswith("weight_")]
    assert "no update has a weight" in mlflow_run.data.params["influence"]

    # 3. Backfill: rounds in order, each on its data window, each from the previous champion.
    champion = client.get_model_version_by_alias(spec.model_name, "champion").version
    before = {r["dag_run_id"] for r in api.runs(dag_id("banks"))}
    run_readme_example(stack, backfill)
    runs = wait_for_new_runs(api, before, 2)  # the windows starting at 00:00 and 08:00
    assert [r["run_type"] for r in runs] == ["backfill"] * 2 and [r["state"] for r in runs] == ["success"] * 2, \
        failed_tasks(api, runs)
    runs.sort(key=lambda r: r["data_interval_start"])

    def task(run, task_id):
        return api.get(f"/api/v2/dags/{dag_id('banks')}/dagRuns/{run['dag_run_id']}/taskInstances/{task_id}")

    # Backfill starts its runs together; the rounds inside them still go one at a time,
    # oldest window first: each prepares only after the previous round's summary ended.
    for earlier, later in zip(runs, runs[1:]):
        assert task(later, "prepare_round")["start_date"] >= task(earlier, "summary")["end_date"]
    store, champion = stack["store"], str(champion)
    for run in runs:
        start = datetime.fromisoformat(run["data_interval_start"].replace("Z", "+00:00"))
        end = datetime.fromisoformat(run["data_interval_end"].replace("Z", "+00:00"))
        round_id = protocol.round_id_for_interval(start)
        report = report_of(stack, "banks", round_id)
        assert report["base_version"] == champion, "each round starts from the previous round's champion"
        assert run["note"].startswith(f"**Round {round_id}: ")
        if report["decision"] == "promoted":
            champion = report["version"]
        for c in spec.clients:
            manifest = GlobalManifest.from_json(store.get_bytes(
                c.bucket_name, protocol.global_manifest_key("", spec.federation, round_id)))
            assert datetime.fromisoformat(manifest.data_window["start"]) == start
            assert datetime.fromisoformat(manifest.data_window["end"]) == end
            update = UpdateManifest.from_json(store.get_bytes(
                c.bucket_name, protocol.update_manifest_key("", spec.federation, round_id)))
            silo = pd.read_parquet(stack["stack"].state_dir / "data" / "banks" / "silos" / f"{c.id}.parquet")
            inside = (silo["event_time"] >= pd.Timestamp(start)) & (silo["event_time"] < pd.Timestamp(end))
            assert update.num_examples == int(inside.sum()) < len(silo)
    versions = client.search_model_versions(f"name = '{spec.model_name}'")

    # The same backfill again, with "none": nothing new.
    api.wait_for("the backfill to complete", lambda: all(
        b["completed_at"] for b in api.get(f"/api/v2/backfills?dag_id={dag_id('banks')}")["backfills"]), timeout=120)
    before = {r["dag_run_id"] for r in api.runs(dag_id("banks"))}
    again = subprocess.run(["bash", "-c", f"{stack['source']}\n{backfill}"], cwd=stack["root"], capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 or "No runs to create" in again.stdout + again.stderr, again.stderr[-2000:]
    time.sleep(5)
    assert {r["dag_run_id"] for r in api.runs(dag_id("banks"))} == before
    assert len(client.search_model_versions(f"name = '{spec.model_name}'")) == len(versions)


ARTIFACTS = REPO / ".state" / "test-artifacts"


@contextlib.contextmanager
def signed_in_page(local: LocalStack, height: int):
    """A headless Chromium (Debian's) page of the Airflow UI, signed in as the admin like a user."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": height})
            page.goto(f"{local.airflow_url}/")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(local.password())
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"{local.airflow_url}/", timeout=30_000)
            yield page
        finally:
            browser.close()


def test_a_rolled_back_rounds_note_is_visible_in_the_airflow_ui(stack):
    """Headless Chromium (Debian's), signed in like a user: the run page shows the note."""
    local, run_id = stack["stack"], stack.get("rolled_back_run")
    assert run_id, "test_readme_stack_commands_work_verbatim rolls a round back first"
    with signed_in_page(local, 1000) as page:
        page.goto(f"{local.airflow_url}/dags/{dag_id('banks')}/runs/{run_id}")
        note = page.get_by_text("Round 000001: rolled back")
        note.wait_for(timeout=30_000)
        assert note.is_visible()
        page.screenshot(path=str(ARTIFACTS / "rolled-back-run.png"))


def finished_rounds(env, name: str) -> dict[str, str]:
    """Round id -> decision of every round of `name` whose run has finished with a report: its
    summary step ran, which writes the report and then the federation's history record."""
    spec, store = env["specs"][name], env["store"]
    finished = {r["dag_run_id"] for r in env["api"].runs(dag_id(name)) if r["state"] in ("success", "failed")}
    rounds = {}
    for key in store.list_keys(spec.coordinator_bucket, f"{spec.federation}/rounds/"):
        if key.endswith("/report.json") and "/evaluation/" not in key:
            report = json.loads(store.get_bytes(spec.coordinator_bucket, key))
            if report.get("run_id") in finished:
                rounds[report["round_id"]] = report["decision"]
    return rounds


def test_the_federation_page_shows_each_federation_and_the_rounds_that_ran(stack):
    """Headless Chromium, signed in like a user: the nav entry opens the Federation page inside
    the UI; it lists every federation and each finished round with its decision, and its run
    links lead to the run's page. Without a session the page's JSON is refused."""
    local = stack["stack"]
    page_url = f"{local.airflow_url}/fl-federations/"

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    for path in ("api/federations", "api/federations/banks"):  # no cookie, no token
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(page_url + path, timeout=30)
        assert refused.value.code == 401 and "banks" not in refused.value.read().decode()
    with pytest.raises(urllib.error.HTTPError) as redirected:
        urllib.request.build_opener(NoRedirect).open(page_url, timeout=30)
    assert redirected.value.code == 307 and "/auth/login?next=" in redirected.value.headers["Location"]

    expected = {name: finished_rounds(stack, name) for name in FEDERATIONS}  # before the page reads the history
    with signed_in_page(local, 1400) as page:
        page.get_by_role("link", name="Federations").click()
        page.wait_for_url(f"{local.airflow_url}/plugin/federations/**", timeout=30_000)
        frame = page.frame_locator('iframe[title="Federations"]')
        frame.locator("body[data-loaded=true]").wait_for(timeout=60_000)
        for name, rounds in expected.items():
            section = frame.locator(f'section[data-federation="{name}"]')
            assert section.count() == 1, f"{name} is not on the page"
            assert section.locator(".error").count() == 0, section.inner_text()
            shown = {row.locator("td").nth(0).inner_text(): row.locator("td").nth(2).inner_text()
                     for row in section.locator("tr[data-round-id]").all()}
            assert shown.items() >= rounds.items(), f"{name}: the page shows {shown}, the reports say {rounds}"
        page.screenshot(path=str(ARTIFACTS / "federation-page.png"))

        ran = [(name, sorted(rounds)[-1]) for name, rounds in expected.items() if rounds]
        assert ran, f"no federation finished a round before this test: {expected}"
        name, round_id = ran[0]  # a round's run link opens its run page in the UI around the page
        row = frame.locator(f'section[data-federation="{name}"] tr[data-round-id="{round_id}"]')
        row.get_by_role("link", name="Airflow run").click()
        page.wait_for_url(f"{local.airflow_url}/dags/{dag_id(name)}/runs/**", timeout=30_000)


def test_cleared_tasks_rerun_to_the_same_outcome(stack):
    """Clear aggregate and everything after it, as from the UI: same model, same version,
    no second MLflow version, no audit event twice."""
    api, name = stack["api"], "banks"
    spec = stack["specs"][name]
    before, counts = report_of(stack, name, "000002"), audit_counts(stack, name, "000002")  # the README's curl round
    run = api.get(f"/api/v2/dags/{dag_id(name)}/dagRuns/{before['run_id']}")
    champion = str(stack["mlflow"].get_model_version_by_alias(spec.model_name, "champion").version)
    versions = len(stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'"))
    cleared = api.post(f"/api/v2/dags/{dag_id(name)}/clearTaskInstances", {
        "dag_run_id": run["dag_run_id"], "task_ids": ["aggregate"], "include_downstream": True,
        "only_failed": False, "dry_run": False, "reset_dag_runs": True})
    assert {ti["task_id"] for ti in cleared["task_instances"]} >= {"aggregate", "register", "promote", "summary"}
    api.wait_for("the cleared run to start again", lambda: api.get(
        f"/api/v2/dags/{dag_id(name)}/dagRuns/{run['dag_run_id']}")["state"] != "success", timeout=60, interval=1)
    assert api.wait_for_run(dag_id(name), run["dag_run_id"])["state"] == "success"
    after = report_of(stack, name, "000002")
    assert (after["version"], after["decision"], after["clients_accepted"]) == (
        before["version"], before["decision"], before["clients_accepted"])
    assert len(stack["mlflow"].search_model_versions(f"name = '{spec.model_name}'")) == versions
    alias = stack["mlflow"].get_model_version_by_alias(spec.model_name, "champion")
    assert str(alias.version) == champion
    assert audit_counts(stack, name, "000002") == counts


def test_the_monitoring_dag_starts_a_round_through_the_scheduler(stack):
    """fl_monitor__banks finds the champion below its monitoring bar and emits an event on the
    federation's asset; the scheduler starts an asset-triggered round, which records why."""
    api, spec = stack["api"], stack["specs"]["banks"]
    before = {r["dag_run_id"] for r in api.runs(dag_id("banks"))}
    monitor = api.post(f"/api/v2/dags/{spec.monitor_dag_id}/dagRuns", {"logical_date": None})
    assert api.wait_for_run(spec.monitor_dag_id, monitor["dag_run_id"], timeout=180)["state"] == "success"

    def started():
        new = [r for r in api.runs(dag_id("banks")) if r["dag_run_id"] not in before]
        return new[0] if new else None

    run = api.wait_for("the round the monitor asked for", started, timeout=120)
    assert run["run_type"] == "asset_triggered"
    finished = api.wait_for_run(dag_id("banks"), run["dag_run_id"], timeout=420)
    assert finished["state"] in ("success", "failed")
    plan = json.loads(stack["store"].get_bytes(spec.coordinator_bucket, next(
        k for k in stack["store"].list_keys(spec.coordinator_bucket, f"{spec.federation}/rounds/")
        if k.endswith("/plan.json") and json.loads(stack["store"].get_bytes(spec.coordinator_bucket, k))["run_id"]
        == run["dag_run_id"])))
    assert plan["run_type"] == "asset_triggered"
    assert plan["triggered_by"].startswith("monitoring: quality: champion roc_auc"), plan["triggered_by"]
    request = json.loads(stack["store"].get_bytes(spec.coordinator_bucket, f"{spec.federation}/monitoring/last_request.json"))
    assert request["run_id"] == monitor["dag_run_id"] and request["reason"] in plan["triggered_by"]
