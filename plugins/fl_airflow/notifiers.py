"""A round's alerts (fl_tasks.coordinator.alerts) delivered the Airflow way: a notifier.

The round's summary task calls `send_round_alerts`; the same `FederationAlertNotifier` also
works as a DAG or task callback. It takes the alerts as plain dicts (so it stays
serialisable) and the delivery fields of the federation file's `alerts` section. Delivery is
best effort: the round's outcome is decided before anyone is told, so a channel that fails
is logged (naming the field and the fix) and never raises. Only the standard library talks
to the servers (smtplib, urllib.request); Airflow supplies the connections.
"""

from __future__ import annotations

import base64
import json
import logging
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from airflow.sdk import BaseNotifier

from fl_tasks.coordinator.alerts import Alert

if TYPE_CHECKING:
    from airflow.sdk import Connection

    from fl_tasks.config import AlertsSpec

log = logging.getLogger(__name__)

SMTP_TIMEOUT_SECONDS = 30.0  # the smtp provider's default; the connection's extra `timeout` overrides it
WEBHOOK_TIMEOUT_SECONDS = 10.0
SMTP_FIX = ("create it (conn type smtp: host, port, login, password; extra from_email, and disable_ssl: true "
            "for a server without implicit TLS, disable_tls: true for one without STARTTLS)")
WEBHOOK_FIX = ("create it (conn type http: host = the full webhook URL, e.g. https://hooks.example.com/services/x; "
               "or schema https, host, port and extra endpoint /path; extra headers for tokens)")


class FederationAlertNotifier(BaseNotifier):
    """Tell people about a round's alerts: the task log always, one e-mail for all of the
    round's alerts when `email_to` is set, one webhook POST when `webhook_conn_id` is set.

    E-mail (Airflow connection `alerts.smtp_conn_id`, default `smtp_default`), read as the
    smtp provider reads it: host and port; login and password (AUTH when both are set);
    extra `from_email` (else the login is the sender), `disable_ssl` (default false: implicit
    TLS, port 465), `disable_tls` (default false: STARTTLS on a plain connection),
    `ssl_context` (`default`, or `none` to skip certificate checks) and `timeout` (seconds).
    E.g. port 587 with STARTTLS::

        AIRFLOW_CONN_SMTP_DEFAULT='{"conn_type": "smtp", "host": "smtp.bank.example", "port": 587,
            "login": "fl-alerts", "password": "...",
            "extra": {"from_email": "fl-alerts@bank.example", "disable_ssl": true}}'

    Webhook (an Airflow HTTP connection, `alerts.webhook_conn_id`): POST of
    `{"federation", "round_id", "alerts": [alert dicts]}` as JSON; any 2xx is delivered. The
    URL comes from the connection, whichever way it was written:

    * `host` is the full URL (what a Slack/Teams/Mattermost-style incoming webhook gives
      you): `{"conn_type": "http", "host": "https://hooks.example.com/services/T0/B0/xyz"}`;
    * or, as the http provider splits it, `schema` (http or https, default http), `host`,
      `port`, and the path in extra `endpoint`:
      `{"conn_type": "http", "schema": "https", "host": "alerts.bank.example", "port": 8443,
      "extra": {"endpoint": "/fl/alerts"}}`;
    * or the URI form `AIRFLOW_CONN_FL_ALERTS='http://alerts.bank.example:8080/fl/alerts'`
      (Airflow keeps that path in the `schema` field; it is read back as the path).

    Extra `headers` (a JSON object) is sent with the request (e.g. an Authorization token),
    login and password become HTTP basic auth, extra `timeout` is in seconds (default 10).

    After `notify`, `delivered` maps each channel tried (`log`, `email`, `webhook`) to
    whether it delivered.
    """

    # Only the delivery settings are templates: the alert messages carry silo-supplied text
    # (reasons, column names) that Jinja must never evaluate.
    template_fields: Sequence[str] = ("email_to", "smtp_conn_id", "webhook_conn_id")

    def __init__(self, alerts: Sequence[Mapping[str, Any] | Alert], *, email_to: Sequence[str] = (),
                 smtp_conn_id: str = "smtp_default", webhook_conn_id: str | None = None) -> None:
        super().__init__()
        self.alerts = [a.as_dict() if isinstance(a, Alert) else dict(a) for a in alerts]
        self.email_to = list(email_to)
        self.smtp_conn_id = smtp_conn_id
        self.webhook_conn_id = webhook_conn_id
        self.delivered: dict[str, bool] = {}

    @classmethod
    def from_spec(cls, alerts: Sequence[Mapping[str, Any] | Alert], spec: AlertsSpec) -> "FederationAlertNotifier":
        return cls(alerts, email_to=spec.email_to, smtp_conn_id=spec.smtp_conn_id,
                   webhook_conn_id=spec.webhook_conn_id)

    @property
    def federation(self) -> str:
        return str(self.alerts[0]["federation"]) if self.alerts else ""

    @property
    def round_id(self) -> str:
        return str(self.alerts[0]["round_id"]) if self.alerts else ""

    def notify(self, context: Mapping[str, Any]) -> None:
        self.delivered = {}
        if not self.alerts:
            return
        for alert in self.alerts:
            log.warning("fl alert %s: %s", alert.get("kind"), alert.get("message"))
        self.delivered["log"] = True
        channels = [("email", "alerts.smtp_conn_id", lambda: self._email(context))] if self.email_to else []
        if self.webhook_conn_id:
            channels.append(("webhook", "alerts.webhook_conn_id", self._webhook))
        for channel, field, send in channels:
            try:
                self.delivered[channel] = send()
            except Exception as exc:  # the round is decided; telling people must not fail it
                log.exception("alerts not sent by %s: field '%s': unexpected %s: %s. Fix: see the traceback; the "
                              "alerts are in this log", channel, field, type(exc).__name__, exc)
                self.delivered[channel] = False

    # --- e-mail --------------------------------------------------------------------------------
    def message(self, sender: str, context: Mapping[str, Any] | None = None) -> EmailMessage:
        """The round's one e-mail: a subject naming the round and its alerts, a line per alert."""
        kinds = [str(a.get("kind", "")).replace("_", " ") for a in self.alerts]
        subject = (str(self.alerts[0].get("subject")) if len(self.alerts) == 1 and self.alerts[0].get("subject")
                   else f"[fl {self.federation}] round {self.round_id}: {len(self.alerts)} alerts ({', '.join(kinds)})")
        lines = [f"Federation {self.federation}, round {self.round_id}: "
                 f"{len(self.alerts)} alert{'s' if len(self.alerts) != 1 else ''}.", ""]
        lines += [f"- {kind}: {a.get('message')}" for kind, a in zip(kinds, self.alerts)]
        log_url = getattr((context or {}).get("ti"), "log_url", None)
        if log_url:
            lines += ["", f"Airflow task log: {log_url}"]
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = sender
        msg["To"] = ", ".join(self.email_to)
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
        msg.set_content("\n".join(lines) + "\n")
        return msg

    def _email(self, context: Mapping[str, Any]) -> bool:
        field = "alerts.smtp_conn_id"
        conn = _connection(self.smtp_conn_id, field, "alerts not e-mailed", SMTP_FIX)
        if conn is None:
            return False
        extra = conn.extra_dejson
        sender = extra.get("from_email") or conn.login
        problem = ("has no host" if not conn.host else
                   "names no sender" if not sender or "@" not in str(sender) else None)
        if problem:
            log.error("alerts not e-mailed: field '%s': Airflow connection '%s' %s. Fix: set the SMTP server's host "
                      "and port, and extra from_email (or a login that is an e-mail address)",
                      field, self.smtp_conn_id, problem)
            return False
        use_ssl, starttls = not _flag(extra.get("disable_ssl")), not _flag(extra.get("disable_tls"))
        tls = None if str(extra.get("ssl_context", "default")).lower() == "none" else ssl.create_default_context()
        timeout = _seconds(extra.get("timeout"), SMTP_TIMEOUT_SECONDS)
        where = f"{conn.host}:{conn.port or (465 if use_ssl else 25)}"
        try:
            client: smtplib.SMTP = (smtplib.SMTP_SSL(conn.host, conn.port or 0, timeout=timeout, context=tls)
                                    if use_ssl else smtplib.SMTP(conn.host, conn.port or 0, timeout=timeout))
            with client:
                if starttls and not use_ssl:
                    client.starttls(context=tls)
                    client.ehlo()
                if conn.login and conn.password:
                    client.login(conn.login, conn.password)
                refused = client.send_message(self.message(str(sender), context), from_addr=str(sender),
                                              to_addrs=self.email_to)
        except (OSError, smtplib.SMTPException) as exc:  # ssl.SSLError and socket errors are OSErrors
            log.error("alerts not e-mailed: field '%s': Airflow connection '%s' (%s) failed: %s: %s. Fix: check its "
                      "host, port, login and password; set extra disable_ssl: true for a server without implicit "
                      "TLS (port 25 or 587) and disable_tls: true for one without STARTTLS",
                      field, self.smtp_conn_id, where, type(exc).__name__, exc)
            return False
        if refused:
            log.error("alerts not e-mailed to %s: field 'alerts.email_to': the server (%s) refused them. Fix: check "
                      "those addresses", ", ".join(sorted(refused)), where)
        log.info("alerts e-mailed to %s through %s", ", ".join(a for a in self.email_to if a not in refused), where)
        return True

    # --- webhook -------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        return {"federation": self.federation, "round_id": self.round_id, "alerts": self.alerts}

    def _webhook(self) -> bool:
        field = "alerts.webhook_conn_id"
        conn = _connection(str(self.webhook_conn_id), field, "alerts not posted", WEBHOOK_FIX)
        if conn is None:
            return False
        url = webhook_url(conn)
        if url is None:
            log.error("alerts not posted: field '%s': Airflow connection '%s' gives no http(s) URL. Fix: %s",
                      field, self.webhook_conn_id, WEBHOOK_FIX.replace("create it", "set its host"))
            return False
        extra = conn.extra_dejson
        headers = {"Content-Type": "application/json", "User-Agent": "fl-airflow-alerts"}
        extra_headers = extra.get("headers")
        if isinstance(extra_headers, str):  # the URI form gives every extra as text
            try:
                extra_headers = json.loads(extra_headers)
            except ValueError:
                extra_headers = None
        if extra_headers is not None and not isinstance(extra_headers, dict):
            log.error("alerts not posted: field 'alerts.webhook_conn_id': extra headers of Airflow connection '%s' "
                      "is not a JSON object. Fix: write it as {\"Authorization\": \"Bearer ...\"}",
                      self.webhook_conn_id)
            return False
        headers.update({str(k): str(v) for k, v in (extra_headers or {}).items()})
        if conn.login:
            token = base64.b64encode(f"{conn.login}:{conn.password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        # Incoming-webhook URLs carry their secret in the path: logs name the server only.
        where = _origin(url)
        request = urllib.request.Request(url, data=json.dumps(self.payload(), default=str).encode(),
                                         headers=headers, method="POST")
        try:
            with _OPENER.open(request, timeout=_seconds(extra.get("timeout"), WEBHOOK_TIMEOUT_SECONDS)) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            body = exc.read(300).decode("utf-8", "replace").strip()
            fix = ("the receiving service failed; check it, the alerts are in this log" if exc.code >= 500 else
                   f"check the URL, headers and credentials of Airflow connection '{self.webhook_conn_id}'")
            log.error("alerts not posted: field '%s': POST to %s (Airflow connection '%s') answered HTTP %s%s. Fix: %s",
                      field, where, self.webhook_conn_id, exc.code, f": {' '.join(body.split())}" if body else "", fix)
            return False
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a malformed URL
            log.error("alerts not posted: field '%s': POST to %s (Airflow connection '%s') failed: %s: %s. Fix: check "
                      "that the service is up and the connection's host and port", field, where, self.webhook_conn_id,
                      type(exc).__name__, getattr(exc, "reason", exc))
            return False
        log.info("alerts posted to %s (HTTP %s)", where, status)
        return True


def send_round_alerts(alerts: list[Alert], spec: AlertsSpec, context: Mapping[str, Any] | None) -> dict[str, bool]:
    """Deliver a round's alerts as `spec` says; channel -> delivered ({} when there are none).
    Never raises for a channel that fails: that is logged with the field and the fix."""
    if not alerts:
        return {}
    notifier = FederationAlertNotifier.from_spec(alerts, spec)
    # Through BaseNotifier.__call__, as a callback would run it (templates rendered first);
    # on a copy, since the base class merges its fields into the context it is given.
    notifier(dict(context or {}))
    return dict(notifier.delivered)


def webhook_url(conn: Connection) -> str | None:
    """The URL a webhook connection points at (see FederationAlertNotifier), or None."""
    host = (conn.host or "").strip()
    extra = conn.extra_dejson
    endpoint = str(extra.get("endpoint") or "")
    if "://" in host:
        url = host
    elif host:
        schema = (conn.schema or "").strip()
        scheme = schema.lower() if schema.lower() in ("http", "https") else (
            conn.conn_type if conn.conn_type in ("http", "https") else "http")
        if schema and schema.lower() not in ("http", "https") and not endpoint:
            endpoint = schema  # the URI form: Airflow stored the URL's path as the schema
        url = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
    else:
        return None
    if endpoint:
        url = url.rstrip("/") + "/" + endpoint.lstrip("/")
    parts = urlsplit(url)
    return url if parts.scheme in ("http", "https") and parts.hostname else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib turns a redirected POST into a body-less GET that a receiver may answer 200
    to; a webhook that moved is better reported (as HTTP 3xx) than silently half-delivered."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)  # proxies from the environment still apply


def _seconds(value: Any, default: float) -> float:
    try:
        seconds = float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default
    return seconds if seconds > 0 else default


def _origin(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, "", "", ""))


def _connection(conn_id: str, field: str, what: str, fix: str) -> Connection | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.error("%s: field '%s': Airflow connection '%s' does not exist. Fix: %s", what, field, conn_id, fix)
        return None


def _flag(value: Any) -> bool:
    """A connection extra's boolean: JSON gives true/false, the URI form gives strings."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
