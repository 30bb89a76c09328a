"""fl_airflow.notifiers: a round's alerts reach a real SMTP server and a real HTTP server on
loopback through Airflow connections given as AIRFLOW_CONN_<ID> variables; a channel that
fails is logged with the field and the fix, and never raises."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import logging
import socket

import pytest
from fl_airflow.notifiers import FederationAlertNotifier, send_round_alerts, webhook_url

from fl_tasks.config import AlertsSpec
from fl_tasks.coordinator.alerts import Alert, circuit_open_alert
from tests.alert_receivers import Receiver, SmtpServer, serve, stop

ALERTS = [
    Alert("low_participation", "banks", "000007",
          "banks round 000007: 2 of 5 silos sent updates (participation 40%, alert below 60%)",
          {"participation_rate": 0.4, "min_participation": 0.6}),
    Alert("rollback", "banks", "000007", "banks round 000007: candidate rolled back, the champion stays: auc fell"),
]


@pytest.fixture(autouse=True)
def clean_connections(monkeypatch):
    from airflow.sdk.execution_time.cache import SecretCache

    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # loopback servers: never through a proxy
    SecretCache.reset()
    yield
    SecretCache.reset()


@pytest.fixture
def smtp_server():
    server = serve(SmtpServer())
    yield server
    stop(server)


@pytest.fixture
def receiver():
    server = serve(Receiver())
    yield server
    stop(server)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smtp_conn(monkeypatch, port: int, **extra) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_ALERTS", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": port, "login": "fl-alerts", "password": "s3cret",
        "extra": {"from_email": "fl-alerts@bank.example", "disable_ssl": True, "disable_tls": True, **extra}}))


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "fl_airflow.notifiers"]


# --- tests ----------------------------------------------------------------------------------------
def test_every_alert_is_logged_as_a_warning_even_with_no_channel(caplog):
    caplog.set_level(logging.INFO, logger="fl_airflow.notifiers")
    assert send_round_alerts(ALERTS, AlertsSpec(), {}) == {"log": True}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"fl alert {a.kind}: {a.message}" for a in ALERTS]
    assert send_round_alerts([], AlertsSpec(), {}) == {}


def test_one_email_carries_all_the_rounds_alerts_to_every_recipient(monkeypatch, smtp_server):
    smtp_conn(monkeypatch, smtp_server.port)
    spec = AlertsSpec(email_to=("ops@bank.example", "ml@bank.example"), smtp_conn_id="smtp_alerts")
    assert send_round_alerts(ALERTS, spec, {}) == {"log": True, "email": True}
    [sent] = smtp_server.messages
    assert sent["auth"] == ("fl-alerts", "s3cret")  # login and password of the connection
    assert sent["from"] == "fl-alerts@bank.example"
    assert sent["rcpt"] == ["ops@bank.example", "ml@bank.example"]
    msg = email.message_from_bytes(sent["data"], policy=email.policy.default)
    assert msg["Subject"] == "[fl banks] round 000007: 2 alerts (low participation, rollback)"
    assert msg["To"] == "ops@bank.example, ml@bank.example" and msg["From"] == "fl-alerts@bank.example"
    body = msg.get_content()
    assert "Federation banks, round 000007: 2 alerts." in body
    for alert in ALERTS:
        assert f"- {alert.kind.replace('_', ' ')}: {alert.message}" in body


def test_a_single_alert_uses_its_own_subject_and_the_login_is_the_sender_without_from_email(monkeypatch,
                                                                                            smtp_server):
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT",
                       f"smtp://ops%40bank.example:pw@127.0.0.1:{smtp_server.port}?disable_ssl=true&disable_tls=true")
    alert = circuit_open_alert("banks", "000010", [("000008", "no quorum"), ("000009", "no quorum")], 2)
    assert send_round_alerts([alert], AlertsSpec(email_to=("ops@bank.example",)), {}) == \
        {"log": True, "email": True}
    [sent] = smtp_server.messages
    assert sent["from"] == "ops@bank.example" and sent["auth"] == ("ops@bank.example", "pw")
    msg = email.message_from_bytes(sent["data"], policy=email.policy.default)
    assert msg["Subject"] == "[fl banks] round 000010: circuit open"
    assert "reset_circuit_breaker" in msg.get_content()


def test_the_webhook_gets_the_rounds_alerts_as_json_with_the_connections_headers(monkeypatch, receiver):
    monkeypatch.setenv("AIRFLOW_CONN_FL_ALERTS", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": receiver.port,
        "extra": {"endpoint": "/hooks/fl", "headers": {"X-Token": "t0k3n"}}}))
    spec = AlertsSpec(webhook_conn_id="fl_alerts")
    assert send_round_alerts(ALERTS, spec, {}) == {"log": True, "webhook": True}
    [request] = receiver.requests
    assert request["path"] == "/hooks/fl"
    assert request["headers"]["Content-Type"] == "application/json" and request["headers"]["X-Token"] == "t0k3n"
    body = json.loads(request["body"])
    assert body == {"federation": "banks", "round_id": "000007", "alerts": [a.as_dict() for a in ALERTS]}
    assert body["alerts"][0]["subject"] == "[fl banks] round 000007: low participation"


def test_the_webhook_url_may_be_a_full_url_in_host_or_the_uri_form(monkeypatch, receiver):
    monkeypatch.setenv("AIRFLOW_CONN_FULL_URL", json.dumps({
        "conn_type": "http", "host": f"http://127.0.0.1:{receiver.port}/services/T0/B0/xyz"}))
    monkeypatch.setenv("AIRFLOW_CONN_URI_FORM", f"http://bot:pw@127.0.0.1:{receiver.port}/fl/alerts")
    assert send_round_alerts(ALERTS, AlertsSpec(webhook_conn_id="full_url"), {})["webhook"] is True
    assert send_round_alerts(ALERTS, AlertsSpec(webhook_conn_id="uri_form"), {})["webhook"] is True
    assert [r["path"] for r in receiver.requests] == ["/services/T0/B0/xyz", "/fl/alerts"]
    assert receiver.requests[1]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"bot:pw").decode()


def test_webhook_urls_from_each_way_of_writing_the_connection():
    from airflow.sdk import Connection

    assert webhook_url(Connection(conn_id="a", conn_type="http", host="alerts.example", schema="https", port=8443,
                                  extra=json.dumps({"endpoint": "fl"}))) == "https://alerts.example:8443/fl"
    assert webhook_url(Connection(conn_id="b", conn_type="http", host="alerts.example")) == "http://alerts.example"
    assert webhook_url(Connection(conn_id="c", conn_type="http")) is None
    assert webhook_url(Connection(conn_id="d", conn_type="http", host="ftp://x/y")) is None


def test_a_failing_webhook_server_is_logged_with_the_field_and_does_not_raise(monkeypatch, receiver, caplog):
    receiver.status = 503
    monkeypatch.setenv("AIRFLOW_CONN_FL_ALERTS", json.dumps({
        "conn_type": "http", "host": f"http://127.0.0.1:{receiver.port}/services/secret-token"}))
    assert send_round_alerts(ALERTS, AlertsSpec(webhook_conn_id="fl_alerts"), {}) == {"log": True, "webhook": False}
    [error] = errors(caplog)
    assert "field 'alerts.webhook_conn_id'" in error and "HTTP 503: receiver broke" in error and "Fix:" in error
    assert "secret-token" not in error  # the URL's secret path stays out of the log


def test_a_redirected_webhook_is_reported_not_followed_as_a_bodyless_get(monkeypatch, receiver, caplog):
    receiver.status = 302
    monkeypatch.setenv("AIRFLOW_CONN_FL_ALERTS", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": receiver.port}))
    assert send_round_alerts(ALERTS, AlertsSpec(webhook_conn_id="fl_alerts"), {})["webhook"] is False
    assert [r["path"] for r in receiver.requests] == ["/"]
    [error] = errors(caplog)
    assert "answered HTTP 302" in error and "Fix: check the URL" in error


def test_servers_that_are_down_are_logged_and_do_not_raise(monkeypatch, caplog):
    port = free_port()
    smtp_conn(monkeypatch, port)
    monkeypatch.setenv("AIRFLOW_CONN_FL_ALERTS", json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": port}))
    spec = AlertsSpec(email_to=("ops@bank.example",), smtp_conn_id="smtp_alerts", webhook_conn_id="fl_alerts")
    assert send_round_alerts(ALERTS, spec, {}) == {"log": True, "email": False, "webhook": False}
    smtp_error, webhook_error = errors(caplog)
    assert "field 'alerts.smtp_conn_id'" in smtp_error and f"127.0.0.1:{port}" in smtp_error
    assert "ConnectionRefusedError" in smtp_error and "Fix:" in smtp_error
    assert "field 'alerts.webhook_conn_id'" in webhook_error and "Fix: check that the service is up" in webhook_error


def test_missing_connections_name_the_field_and_the_fix(caplog):
    spec = AlertsSpec(email_to=("ops@bank.example",), smtp_conn_id="smtp_nowhere", webhook_conn_id="hook_nowhere")
    assert send_round_alerts(ALERTS, spec, {}) == {"log": True, "email": False, "webhook": False}
    smtp_error, webhook_error = errors(caplog)
    assert smtp_error.startswith("alerts not e-mailed: field 'alerts.smtp_conn_id': Airflow connection "
                                 "'smtp_nowhere' does not exist. Fix: create it (conn type smtp")
    assert webhook_error.startswith("alerts not posted: field 'alerts.webhook_conn_id': Airflow connection "
                                    "'hook_nowhere' does not exist. Fix: create it (conn type http")


def test_an_implicit_tls_connection_against_a_plain_server_fails_with_the_disable_ssl_fix(monkeypatch, smtp_server,
                                                                                          caplog):
    smtp_conn(monkeypatch, smtp_server.port, disable_ssl=False)  # the provider's default: implicit TLS
    spec = AlertsSpec(email_to=("ops@bank.example",), smtp_conn_id="smtp_alerts")
    assert send_round_alerts(ALERTS, spec, {})["email"] is False
    [error] = errors(caplog)
    assert "field 'alerts.smtp_conn_id'" in error and "disable_ssl: true" in error
    assert smtp_server.messages == []


def test_the_notifier_stays_serialisable_and_works_as_a_callback(monkeypatch, receiver):
    monkeypatch.setenv("AIRFLOW_CONN_FL_ALERTS", json.dumps({
        "conn_type": "http", "host": "127.0.0.1", "port": receiver.port}))
    notifier = FederationAlertNotifier([a.as_dict() for a in ALERTS], webhook_conn_id="{{ params.hook }}")
    assert json.loads(json.dumps(notifier.alerts)) == notifier.alerts
    context = {"params": {"hook": "fl_alerts"}}
    notifier(context)  # BaseNotifier.__call__ renders the templated delivery fields first
    assert notifier.webhook_conn_id == "fl_alerts"
    assert notifier.delivered == {"log": True, "webhook": True}
    assert len(receiver.requests) == 1
