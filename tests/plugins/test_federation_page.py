"""The Federation page (plugins/fl_airflow/federation_page.py) in Airflow's own api-server app.

`create_app("core")` builds the api-server's app as `airflow api-server` does, loading the
plugin from a plugins folder that holds plugins/fl_airflow_plugin.py; users sign in through
SimpleAuthManager's own API (POST /auth/token) and the page reads rounds and drift tables
that the test writes into the loopback S3 server, as the summary step does.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import pytest
import yaml

from fl_tasks.coordinator.drift import DriftTable
from fl_tasks.coordinator.history import FederationHistory, RoundRecord
from fl_tasks.coordinator.metrics import RoundMetrics
from fl_tasks.protocol.drift import ColumnDrift, DriftReport
from fl_tasks.protocol.storage import ObjectStore

from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from tests.conftest import REPO, federation_doc

PASSWORDS = {"admin": "admin-password", "outsider": "outsider-password"}
PREFIX = "/fl-federations"
CHROMIUM = "/usr/bin/chromium"

# Hostile text where silos (and the records built from what they send) put text.
HOSTILE_SILO = '<img src=x onerror="window.__pwned=1">'
HOSTILE_COLUMN = "<svg onload=window.__pwned=2>"
HOSTILE_REASON = '<script>window.__pwned=3</script> candidate pr_auc 0.41 < 0.5 & "rolled back"'
HOSTILE_MISSING = "<b>drift scores unusable</b><script>window.__pwned=4</script>"


class OneDagHiddenAuthManager(SimpleAuthManager):
    """SimpleAuthManager (its users, passwords, tokens and roles) with one per-DAG rule, as
    richer auth managers have: `outsider` may not read the DAG of the federation `page-hidden`."""

    def is_authorized_dag(self, *, method, user, access_entity=None, details=None) -> bool:
        if user.get_name() == "outsider" and details is not None and details.id == "fl_round__page_hidden":
            return False
        return super().is_authorized_dag(method=method, user=user, access_entity=access_entity, details=details)


def _record(spec, round_id: str, decision: str, candidate: float, champion: float, committed: int, **extra):
    metrics = RoundMetrics(
        federation=spec.federation, round_id=round_id, clients_expected=4, clients_committed=committed,
        clients_accepted=committed, participation_rate=committed / 4, primary_metric="pr_auc",
        candidate={"pr_auc": candidate, "roc_auc": 0.9}, champion={"pr_auc": champion, "roc_auc": 0.88})
    values = dict(round_id=round_id, run_id=f"manual__2026-01-{round_id[-2:]}T08:00:00+00:00", dag_id=spec.dag_id,
                  run_type="manual", triggered_by="admin", decision=decision,
                  version=str(int(round_id)) if decision != "no_model" else None, base_version="seed", reason="",
                  finished_at=f"2026-01-{round_id[-2:]}T08:30:00+00:00", metrics=metrics,
                  mlflow={"model_name": spec.model_name, "version": str(int(round_id)), "mlflow_run_id": f"run{round_id}",
                          "experiment_id": "7", "tracking_uri": "http://mlflow.example:5000"})
    return RoundRecord(**{**values, **extra})


def _drift_table(round_id: str) -> DriftTable:
    def report(drifted: bool) -> DriftReport:
        return DriftReport(reference="first window (round 000001)", reference_rows=500, current_rows=480,
                           drifted_share=0.5 if drifted else 0.0, dataset_drifted=drifted,
                           columns={"Amount": ColumnDrift(0.01 if drifted else 0.6, drifted, "ks"),
                                    HOSTILE_COLUMN: ColumnDrift(0.2, False, "ks")})

    return DriftTable(round_id, ("Amount", HOSTILE_COLUMN), {"bank-a": report(False), HOSTILE_SILO: report(True)},
                      {"bank-c": HOSTILE_MISSING})


@pytest.fixture(scope="module")
def federations(s3_server, tmp_path_factory):
    """A folder of federation files, as the DAG folder reads them:
    page-main (three rounds; its silos compute drift, and two rounds have drift tables),
    page-hidden (one round whose drift table has no scores; `outsider` may not read its DAG),
    page-nobucket (its bucket does not exist), page-noconn (its S3 connection does not exist)
    and a file that does not load."""
    from fl_tasks.config import load_federation

    folder = tmp_path_factory.mktemp("federations")
    docs = {
        "page-main": federation_doc(federation="page-main", coordinator={"bucket": "page-main-coord"}, drift={}),
        "page-hidden": federation_doc(federation="page-hidden", coordinator={"bucket": "page-hidden-coord"}, drift={}),
        "page-nobucket": federation_doc(federation="page-nobucket", coordinator={"bucket": "page-nobucket-coord"}),
        "page-noconn": federation_doc(federation="page-noconn", coordinator={"bucket": "page-noconn-coord"},
                                      storage={"aws_conn_id": "aws_page_nowhere"}),
    }
    for name, doc in docs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    (folder / "page-broken.yaml").write_text(yaml.safe_dump({**docs["page-main"], "federation": "Not A Name!"}))
    specs = {name: load_federation(folder / f"{name}.yaml") for name in docs}

    store = ObjectStore()
    main, hidden = specs["page-main"], specs["page-hidden"]
    for spec in (main, hidden):
        store.ensure_bucket(spec.coordinator_bucket)
    history = FederationHistory(store, main.coordinator_bucket, main.federation)
    history.record(_record(main, "000001", "promoted", 0.62, math.nan, 4, triggered_by="scheduler",
                           run_type="scheduled"))
    history.record(_record(main, "000002", "rejected", 0.41, 0.62, 3, reason=HOSTILE_REASON,
                           triggered_by=HOSTILE_SILO))
    history.record(_record(main, "000003", "promoted", 0.71, 0.62, 4))
    for round_id in ("000002", "000003"):  # the latest table is round 000003's
        table = _drift_table(round_id)
        store.put_bytes(main.coordinator_bucket, f"{main.federation}/rounds/{round_id}/drift.json",
                        json.dumps(table.as_dict()).encode(), "application/json")
    FederationHistory(store, hidden.coordinator_bucket, hidden.federation).record(
        _record(hidden, "000001", "no_model", math.nan, math.nan, 1))
    no_scores = DriftTable("000001", ("Amount",), {}, {"silo-0": "no update manifest kept"})  # no silo sent scores
    store.put_bytes(hidden.coordinator_bucket, f"{hidden.federation}/rounds/000001/drift.json",
                    json.dumps(no_scores.as_dict()).encode(), "application/json")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FL_FEDERATIONS_DIR", str(folder))
        patch.delenv("FL_MLFLOW_UI_URL", raising=False)
        yield specs


def _clear_plugin_caches() -> None:
    from airflow import plugins_manager

    for value in vars(plugins_manager).values():
        if callable(getattr(value, "cache_clear", None)):
            value.cache_clear()


@pytest.fixture(scope="module")
def airflow_app(federations, tmp_path_factory):
    """Airflow's api-server app, with this repository's plugin file in its plugins folder and
    SimpleAuthManager's users `admin` and `outsider` (a viewer)."""
    from airflow import settings
    from airflow.api_fastapi.app import create_app, purge_cached_app
    from airflow.models.revoked_token import RevokedToken

    home = tmp_path_factory.mktemp("airflow-api")
    (home / "passwords.json").write_text(json.dumps(PASSWORDS))
    plugins = home / "plugins"
    plugins.mkdir()
    (plugins / "fl_airflow_plugin.py").symlink_to(REPO / "plugins" / "fl_airflow_plugin.py")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                     f"{OneDagHiddenAuthManager.__module__}.{OneDagHiddenAuthManager.__qualname__}")
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin,outsider:viewer")
        patch.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(home / "passwords.json"))
        patch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(64))
        patch.setattr(settings, "PLUGINS_FOLDER", str(plugins))
        _clear_plugin_caches()
        purge_cached_app()
        # Token checks look up revoked tokens: the one table of the metadata DB this needs.
        RevokedToken.__table__.create(settings.engine, checkfirst=True)
        try:
            yield create_app("core")
        finally:
            purge_cached_app()
            _clear_plugin_caches()


@pytest.fixture(scope="module")
def tokens(airflow_app) -> dict[str, str]:
    """A JWT per user, from SimpleAuthManager's own login API."""
    from fastapi.testclient import TestClient

    client = TestClient(airflow_app)
    out = {}
    for user, password in PASSWORDS.items():
        answer = client.post("/auth/token", json={"username": user, "password": password})
        assert answer.status_code == 201, answer.text
        out[user] = answer.json()["access_token"]
    return out


@pytest.fixture
def anonymous(airflow_app):
    from fastapi.testclient import TestClient

    return TestClient(airflow_app, follow_redirects=False)


@pytest.fixture
def admin(airflow_app, tokens):
    """The admin as the UI's pages are: the `_token` cookie the UI sets at login."""
    from fastapi.testclient import TestClient

    client = TestClient(airflow_app, follow_redirects=False)
    client.cookies.set("_token", tokens["admin"])
    return client


@pytest.fixture
def outsider(airflow_app, tokens):
    """A viewer as API clients are: a Bearer token."""
    from fastapi.testclient import TestClient

    return TestClient(airflow_app, follow_redirects=False, headers={"Authorization": f"Bearer {tokens['outsider']}"})


JSON_PATHS = [f"{PREFIX}/api/federations", f"{PREFIX}/api/federations/page-main",
              f"{PREFIX}/api/federations/page-hidden", f"{PREFIX}/api/federations/no-such-federation"]


# --- who may see what ------------------------------------------------------------------------
@pytest.mark.parametrize("path", JSON_PATHS)
def test_anonymous_json_requests_are_refused(anonymous, path):
    answer = anonymous.get(path)
    assert answer.status_code == 401
    assert answer.json() == {"detail": "Not authenticated"}


@pytest.mark.parametrize("path", JSON_PATHS)
def test_a_forged_token_is_refused(anonymous, path):
    forged = "eyJhbGciOiJIUzUxMiJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl"
    assert anonymous.get(path, headers={"Authorization": f"Bearer {forged}"}).status_code == 403
    anonymous.cookies.set("_token", forged)
    assert anonymous.get(path).status_code == 403


def test_an_anonymous_browser_is_sent_to_the_login_and_gets_no_data(anonymous):
    answer = anonymous.get(f"{PREFIX}/")
    assert answer.status_code == 307
    assert answer.headers["location"] == f"/api/v2/auth/login?next={quote('http://testserver/fl-federations/', safe='')}"
    assert "page-main" not in answer.text and "<script" not in answer.text
    anonymous.cookies.set("_token", "not-a-token")
    assert anonymous.get(f"{PREFIX}/").status_code == 307
    # Airflow's login route accepts that `next` and sends the browser on to the auth manager's login form.
    login = anonymous.get(answer.headers["location"])
    assert login.status_code == 307 and login.headers["location"].startswith("/auth/login?next=")


def test_no_public_openapi_or_docs(anonymous):
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert anonymous.get(f"{PREFIX}{path}").status_code == 404


def test_each_user_sees_only_the_federations_whose_dag_they_may_read(admin, outsider):
    seen = admin.get(f"{PREFIX}/api/federations").json()
    assert [f["name"] for f in seen["federations"]] == ["page-hidden", "page-main", "page-nobucket", "page-noconn"]
    main = next(f for f in seen["federations"] if f["name"] == "page-main")
    assert main == {"name": "page-main", "dag_id": "fl_round__page_main", "dag_url": "/dags/fl_round__page_main",
                    "file": "page-main.yaml", "bucket": "page-main-coord", "model_name": "page-main-model"}
    [broken] = seen["errors"]
    assert broken["file"] == "page-broken.yaml" and broken["dag_id"] == "fl_config_error__page_broken"
    assert "field 'federation'" in broken["error"]

    assert [f["name"] for f in outsider.get(f"{PREFIX}/api/federations").json()["federations"]] == [
        "page-main", "page-nobucket", "page-noconn"]
    hidden = outsider.get(f"{PREFIX}/api/federations/page-hidden")
    unknown = outsider.get(f"{PREFIX}/api/federations/no-such-federation")
    assert hidden.status_code == unknown.status_code == 404  # alike: a hidden federation is not confirmed
    assert outsider.get(f"{PREFIX}/api/federations/page-main").status_code == 200
    assert admin.get(f"{PREFIX}/api/federations/page-hidden").json()["rounds"][0]["decision"] == "no_model"


# --- what the JSON says ----------------------------------------------------------------------
def test_a_federations_rounds_with_links_metrics_and_participation(admin):
    answer = admin.get(f"{PREFIX}/api/federations/page-main")
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    body = answer.json()
    assert body["error"] is None and body["drift_error"] is None
    assert [(r["round_id"], r["decision"], r["version"]) for r in body["rounds"]] == [
        ("000001", "promoted", "1"), ("000002", "rejected", "2"), ("000003", "promoted", "3")]
    first, second, third = body["rounds"]
    assert (first["triggered_by"], first["run_type"]) == ("scheduler", "scheduled")
    assert (second["triggered_by"], second["reason"]) == (HOSTILE_SILO, HOSTILE_REASON)  # data, as recorded
    assert second["participation"] == {"expected": 4, "committed": 3, "accepted": 3, "rate": 0.75}
    assert (third["primary_metric"], third["candidate"], third["champion"]) == ("pr_auc", 0.71, 0.62)
    assert first["champion"] is None  # NaN (no champion yet) is null in JSON
    assert third["metrics"] == {"candidate": {"pr_auc": 0.71, "roc_auc": 0.9}, "champion": {"pr_auc": 0.62, "roc_auc": 0.88}}
    assert third["links"] == {
        "run": "/dags/fl_round__page_main/runs/manual__2026-01-03T08%3A00%3A00%2B00%3A00",
        "mlflow_version": "http://mlflow.example:5000/#/models/page-main-model/versions/3",
        "mlflow_run": "http://mlflow.example:5000/#/experiments/7/runs/run000003"}


def test_mlflow_links_follow_the_operator_links(admin, monkeypatch):
    monkeypatch.setenv("FL_MLFLOW_UI_URL", "https://mlflow.example.org/")
    links = admin.get(f"{PREFIX}/api/federations/page-main").json()["rounds"][0]["links"]
    assert links["mlflow_version"] == "https://mlflow.example.org/#/models/page-main-model/versions/1"


def test_a_record_without_a_web_mlflow_gives_no_mlflow_links():
    from fl_airflow.federation_page import mlflow_links

    assert mlflow_links({"model_name": "m", "version": "1", "tracking_uri": "sqlite:///x.db"}) == {
        "mlflow_version": "", "mlflow_run": ""}
    assert mlflow_links({"model_name": "m", "version": "1", "tracking_uri": "javascript:alert(1)//"}) == {
        "mlflow_version": "", "mlflow_run": ""}


def test_the_latest_drift_table(admin):
    drift = admin.get(f"{PREFIX}/api/federations/page-main").json()["drift"]
    assert drift["round_id"] == "000003" and drift["columns"] == ["Amount", HOSTILE_COLUMN]
    assert [s["silo"] for s in drift["silos"]] == sorted(["bank-a", HOSTILE_SILO])
    bad = next(s for s in drift["silos"] if s["silo"] == HOSTILE_SILO)
    assert bad["dataset_drifted"] is True and bad["cells"]["Amount"] == {"score": 0.01, "drifted": True, "method": "ks"}
    assert drift["missing"] == [{"silo": "bank-c", "reason": HOSTILE_MISSING}]
    assert drift["drifted_silos"] == [HOSTILE_SILO] and drift["drifted_share"] == 0.5


def test_a_bucket_that_cannot_be_read_is_an_error_naming_it(admin):
    answer = admin.get(f"{PREFIX}/api/federations/page-nobucket")
    assert answer.status_code == 200
    body = answer.json()
    assert body["rounds"] == [] and body["drift"] is None
    assert body["error"].startswith("cannot read s3://page-nobucket-coord/page-nobucket/history/rounds.json: NoSuchBucket")


def test_a_missing_s3_connection_is_an_error_naming_bucket_and_connection(admin):
    body = admin.get(f"{PREFIX}/api/federations/page-noconn").json()
    assert body["error"].startswith("cannot read the coordinator's bucket s3://page-noconn-coord: ")
    assert "Airflow connection 'aws_page_nowhere'" in body["error"] and "does not exist" in body["error"]


# --- the page --------------------------------------------------------------------------------
def test_the_page_is_served_to_a_signed_in_user_with_a_strict_policy(admin, outsider):
    answer = admin.get(f"{PREFIX}/")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
    policy = answer.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", policy).group(1)
    assert f'<script nonce="{nonce}">' in answer.text and "default-src 'none'" in policy
    assert "frame-ancestors 'self'" in policy and "connect-src 'self'" in policy
    assert 'data-app-root="/fl-federations"' in answer.text and 'data-airflow-root=""' in answer.text
    assert "page-main" not in answer.text  # no data in the HTML: the script fetches it with the same cookie
    assert outsider.get(f"{PREFIX}/").status_code == 200
    assert admin.get(f"{PREFIX}/").headers["content-security-policy"] != policy  # a nonce per page


def test_the_pages_script_never_parses_html():
    from fl_airflow.federation_page import PAGE

    script = PAGE.split("<script", 1)[1]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "http://", "https://", "//cdn"):
        assert sink not in script.replace("http://www.w3.org/2000/svg", ""), sink


def test_the_plugin_registers_the_app_and_a_nav_entry(admin, tokens):
    plugins = admin.get("/api/v2/plugins", headers={"Authorization": f"Bearer {tokens['admin']}"}).json()["plugins"]
    [ours] = [p for p in plugins if p["name"] == "fl_airflow"]
    assert ours["fastapi_apps"] == [{"app": "fastapi.applications.FastAPI", "url_prefix": "/fl-federations",
                                     "name": "Federation page"}]
    [view] = ours["external_views"]
    assert {k: view[k] for k in ("name", "href", "url_route", "destination", "nav_top_level")} == {
        "name": "Federations", "href": "fl-federations/", "url_route": "federations", "destination": "nav",
        "nav_top_level": True}
    assert view["icon"].startswith("data:image/svg+xml,")


def test_loading_the_plugin_imports_no_airflow_api_coordinator_or_boto3():
    """The scheduler, dag-processor, triggerer and workers load plugins too."""
    code = ("import sys; import fl_airflow_plugin; "
            "print(sorted(m for m in ('airflow.api_fastapi.core_api.security', 'airflow.api_fastapi.app', 'boto3', "
            "'fl_tasks.coordinator.history', 'fl_airflow.steps', 'fl_tasks.config') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --- the page in a browser: hostile text stays text --------------------------------------------
@pytest.fixture
def live_server(airflow_app):
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(airflow_app, host="127.0.0.1", port=port, lifespan="off",
                                          log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_in_a_browser_hostile_silo_ids_and_reasons_are_shown_as_text(live_server, tokens):
    from playwright.sync_api import sync_playwright

    from tests.e2e.test_stack_rounds import CHROMIUM_ARGS

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.add_cookies([{"name": "_token", "value": tokens["admin"], "url": live_server}])
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(f"{live_server}{PREFIX}/")
            page.wait_for_selector("body[data-loaded=true]", timeout=30_000)

            main = page.locator('section[data-federation="page-main"]')
            assert [main.locator(f'tr[data-round-id="{r}"]').get_attribute("data-decision")
                    for r in ("000001", "000002", "000003")] == ["promoted", "rejected", "promoted"]
            assert main.locator("svg.chart").count() == 2  # the metric and the participation charts
            assert main.locator("svg.chart circle.candidate").count() == 3
            assert main.locator("svg.chart rect.bar").count() == 3
            # The hostile strings are the cells' text, and made no element and ran no script.
            assert main.locator('tr[data-round-id="000002"] td.reason').inner_text() == HOSTILE_REASON
            assert HOSTILE_SILO in main.locator('tr[data-round-id="000002"]').inner_text()
            assert main.locator("table.drift tr.drifted th").inner_text() == HOSTILE_SILO
            assert main.locator("table.drift thead th").last.inner_text() == HOSTILE_COLUMN
            assert main.locator('table.drift tr[data-silo="bank-c"] td').inner_text() == HOSTILE_MISSING
            assert main.locator("table.drift td.drifted").count() == 1
            assert page.evaluate("window.__pwned") is None
            assert page.locator("img").count() == 0 and page.locator("script").count() == 1
            assert page.locator("svg:not(.chart)").count() == 0

            # The other federations: an error naming the bucket, the hidden one, the broken file.
            assert "NoSuchBucket" in page.locator('section[data-federation="page-nobucket"] .error').inner_text()
            hidden = page.locator('section[data-federation="page-hidden"]')
            assert hidden.locator('tr[data-round-id="000001"]').count() == 1
            assert "Round 000001: no silo sent drift scores." in hidden.inner_text()
            assert hidden.locator('table.drift tr[data-silo="silo-0"] td').inner_text() == "no update manifest kept"
            assert "field 'federation'" in page.locator('section[data-file="page-broken.yaml"] .error').inner_text()
            assert errors == []
            artifacts = REPO / ".state" / "test-artifacts"
            artifacts.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(artifacts / "federation-page-hostile.png"), full_page=True)
        finally:
            browser.close()


# Airflow's UI frames an external view with exactly these flags (no top navigation, no popups).
UI_FRAME = ('<!doctype html><title>UI</title><iframe title="Federations" style="width:100%;height:900px" '
            'sandbox="allow-scripts allow-same-origin allow-forms allow-downloads" src="/fl-federations/"></iframe>')


def test_in_the_uis_sandboxed_frame_links_open_in_the_ui_around_it(live_server, tokens, monkeypatch):
    from playwright.sync_api import sync_playwright

    from tests.e2e.test_stack_rounds import CHROMIUM_ARGS

    monkeypatch.setenv("FL_MLFLOW_UI_URL", f"{live_server}/mlflow-ui")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()
            context.add_cookies([{"name": "_token", "value": tokens["admin"], "url": live_server}])
            page = context.new_page()
            # The UI's page around the frame, from the same origin.
            page.route(f"{live_server}/ui-around", lambda route: route.fulfill(body=UI_FRAME, content_type="text/html"))
            page.goto(f"{live_server}/ui-around")
            frame = page.frame_locator('iframe[title="Federations"]')
            frame.locator("body[data-loaded=true]").wait_for(timeout=30_000)
            row = frame.locator('section[data-federation="page-main"] tr[data-round-id="000003"]')

            with context.expect_page(timeout=15_000) as opened:  # MLflow: a tab of its own
                row.get_by_role("link", name="MLflow version").click()
            assert opened.value.url == f"{live_server}/mlflow-ui/#/models/page-main-model/versions/3"
            assert page.url == f"{live_server}/ui-around"

            row.get_by_role("link", name="Airflow run").click()  # the run: the UI's own page navigates
            page.wait_for_url(f"{live_server}/dags/fl_round__page_main/runs/**", timeout=15_000)
            assert page.url.endswith("/runs/manual__2026-01-03T08%3A00%3A00%2B00%3A00")
        finally:
            browser.close()
