"""The Federation page of the Airflow UI: every federation, its rounds, charts by round and
the latest drift table, read from the coordinator's bucket.

A FastAPI app that the api-server mounts at URL_PREFIX (plugins/fl_airflow_plugin.py
registers it, with a navigation entry that shows the page inside the UI):

    GET {URL_PREFIX}/                          the HTML page (its script fetches the JSON below)
    GET {URL_PREFIX}/api/federations           the federations the user may read
    GET {URL_PREFIX}/api/federations/{name}    one federation: its rounds and the latest drift table

Airflow protects only its own routes, so every route here asks Airflow who the caller is
(`airflow.api_fastapi.core_api.security.get_user`: the `_token` cookie the UI sets, or a
Bearer token) and shows a federation only to a user whom the auth manager lets read its DAG
`fl_round__<F>` and that DAG's runs. Anonymous JSON requests get Airflow's own 401/403; the
page sends an anonymous browser to Airflow's login, which brings it back here.

Other Airflow components (scheduler, dag-processor, triggerer, workers) import this module
when they load plugins: only FastAPI and the standard library load here; Airflow's API
internals, the coordinator and boto3 load in the handlers, in the api-server.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

log = logging.getLogger(__name__)

URL_PREFIX = "/fl-federations"
# How many recent rounds to search for the latest drift table (one S3 read each): rounds that
# stopped early have none, but a table older than this says little about the data today.
DRIFT_LOOKBACK = 50

# No /docs, /redoc or /openapi.json: Airflow would serve them here without any login.
app = FastAPI(title="Federations", docs_url=None, redoc_url=None, openapi_url=None)
_bearer = HTTPBearer(auto_error=False)


@app.middleware("http")
async def _response_headers(request: Request, call_next) -> Response:
    response = await call_next(request)
    # Per-user data: never cached, never sniffed into HTML (the JSON carries silo-sent text).
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


# --- who is asking, and what they may read -------------------------------------------------
async def airflow_user(request: Request,
                       bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Any:
    """The signed-in Airflow user, by Airflow's own check (the UI's `_token` cookie or a
    Bearer token); raises Airflow's 401 (no or expired token) or 403 (invalid token)."""
    from airflow.api_fastapi.core_api.security import get_user

    return await get_user(request, _oauth_token=None, bearer_credentials=bearer)


def _team_names(dag_ids: Iterable[str]) -> dict[str, str | None]:
    """DAG -> its team, which the auth manager weighs in multi-team deployments only."""
    from airflow.configuration import conf

    if not conf.getboolean("core", "multi_team", fallback=False):
        return {}
    from airflow.models.dag import DagModel

    return DagModel.get_dag_id_to_team_name_mapping(list(dag_ids))


def readable_dag_ids(user: Any, dag_ids: Iterable[str]) -> set[str]:
    """The DAGs whose details and runs `user` may read, as the auth manager decides (the
    page shows each round's run, so both are needed)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    manager, dag_ids = get_auth_manager(), sorted(set(dag_ids))
    teams = _team_names(dag_ids)
    readable = set()
    for dag_id in dag_ids:
        details = DagDetails(id=dag_id, team_name=teams.get(dag_id))
        if (manager.is_authorized_dag(method="GET", details=details, user=user)
                and manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=details,
                                              user=user)):
            readable.add(dag_id)
    return readable


# --- where things are ----------------------------------------------------------------------
def airflow_root(request: Request) -> str:
    """The Airflow UI's path prefix ("" at the host's root): this app's root path less its mount."""
    root = request.scope.get("root_path", "").rstrip("/")
    return root[: -len(URL_PREFIX)] if root.endswith(URL_PREFIX) else root


def run_url(root: str, dag_id: str, run_id: str) -> str:
    return f"{root}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def mlflow_links(refs: dict[str, Any]) -> dict[str, str]:
    """The round's MLflow version and run pages, as its task links give them."""
    from fl_airflow.links import model_version_url, run_url as mlflow_run_url

    links = {"mlflow_version": model_version_url(refs), "mlflow_run": mlflow_run_url(refs)}
    # A record is data from a bucket: only web addresses become links.
    return {k: v if v.startswith(("http://", "https://")) else "" for k, v in links.items()}


# --- the JSON ------------------------------------------------------------------------------
def finite(value: Any) -> Any:
    """JSON without NaN or infinities (a metric can be NaN; JSON cannot carry it)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def round_json(record: Any, root: str) -> dict[str, Any]:
    """One RoundRecord as the page shows it."""
    m = record.metrics
    primary = m.primary_metric
    return {
        "round_id": record.round_id, "run_id": record.run_id, "run_type": record.run_type,
        "triggered_by": record.triggered_by, "decision": record.decision, "version": record.version,
        "base_version": record.base_version, "reason": record.reason, "finished_at": record.finished_at,
        "participation": {"expected": m.clients_expected, "committed": m.clients_committed,
                          "accepted": m.clients_accepted, "rate": m.participation_rate},
        "primary_metric": primary,
        "candidate": m.candidate.get(primary) if primary else None,
        "champion": m.champion.get(primary) if primary else None,
        "metrics": {"candidate": dict(m.candidate), "champion": dict(m.champion)},
        "drifted_share": m.drifted_share,
        "links": {"run": run_url(root, record.dag_id, record.run_id) if record.run_id and record.dag_id else "",
                  **mlflow_links(record.mlflow)},
    }


def drift_json(table: Any) -> dict[str, Any]:
    """A DriftTable as rows of silos and columns of features; the columns any silo scored
    beyond the table's own come after them."""
    columns = list(table.columns)
    columns += sorted({c for report in table.silos.values() for c in report.columns} - set(columns))
    return {
        "round_id": table.round_id, "columns": columns,
        "silos": [{"silo": silo, "reference": r.reference, "reference_rows": r.reference_rows,
                   "current_rows": r.current_rows, "drifted_share": r.drifted_share,
                   "dataset_drifted": r.dataset_drifted,
                   "cells": {c: {"score": cell.score, "drifted": cell.drifted, "method": cell.method}
                             for c, cell in r.columns.items()}}
                  for silo, r in sorted(table.silos.items())],
        "missing": [{"silo": silo, "reason": why} for silo, why in sorted(table.missing.items())],
        "drifted_silos": table.drifted_silos, "drifted_share": table.drifted_share,
    }


def _storage_error(exc: Exception, bucket: str, key: str) -> str:
    """A failed read in words that name the object (and S3's own error code)."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        return f"cannot read s3://{bucket}/{key}: {error.get('Code', '?')}: {error.get('Message') or exc}"
    return f"cannot read s3://{bucket}/{key}: {type(exc).__name__}: {exc}"


def federation_summary(spec: Any, root: str) -> dict[str, Any]:
    return {"name": spec.federation, "dag_id": spec.dag_id, "dag_url": f"{root}/dags/{quote(spec.dag_id, safe='')}",
            "file": Path(spec.source).name, "bucket": spec.coordinator_bucket, "model_name": spec.model_name}


def federation_detail(spec: Any, root: str) -> dict[str, Any]:
    """A federation's rounds (oldest first) and latest drift table from its coordinator's
    bucket. What cannot be read is an `error` (or `drift_error`) naming the object, with
    whatever could be read still there."""
    from fl_airflow.steps import coordinator_for

    from fl_tasks.coordinator.history import FederationHistory

    body = {**federation_summary(spec, root), "drift_enabled": spec.drift is not None, "rounds": [], "drift": None,
            "error": None, "drift_error": None}
    try:
        coordinator = coordinator_for(spec.source)  # S3 credentials from the Airflow connection, as the tasks
    except Exception as exc:  # the file changed since, or its connection is missing: say which, as the task would
        log.warning("federation page: %s: %s", spec.federation, exc)
        body["error"] = f"cannot read the coordinator's bucket s3://{spec.coordinator_bucket}: {exc}"
        return body
    body["bucket"] = coordinator.bucket
    history = FederationHistory(coordinator.store, coordinator.bucket, spec.federation)
    try:
        records = history.rounds()
    except Exception as exc:  # a missing bucket, denied access, an outage, a damaged index
        log.warning("federation page: %s: reading %s failed", spec.federation, history.key, exc_info=True)
        body["error"] = _storage_error(exc, coordinator.bucket, history.key)
        return body
    body["rounds"] = [round_json(r, root) for r in records]
    if coordinator.spec.drift is None:  # its silos compute no drift: no table to look for
        return body
    try:
        table = history.latest_drift(records, lookback=DRIFT_LOOKBACK)
    except Exception as exc:
        log.warning("federation page: %s: reading a drift table failed", spec.federation, exc_info=True)
        body["drift_error"] = _storage_error(exc, coordinator.bucket, f"{spec.federation}/rounds/<round>/drift.json")
    else:
        body["drift"] = None if table is None else drift_json(table)
    return body


# --- routes --------------------------------------------------------------------------------
def _scan():
    from fl_tasks.config import federations_dir, scan_federations

    return scan_federations(federations_dir())


@app.get("/api/federations")
def list_federations(request: Request, user: Annotated[Any, Depends(airflow_user)]) -> JSONResponse:
    """The federations whose DAG the user may read, and the federation files that do not
    load whose error DAG they may read."""
    from fl_tasks.config import error_dag_id

    scan, root = _scan(), airflow_root(request)
    errors = {error_dag_id(e.source): e for e in scan.errors}
    readable = readable_dag_ids(user, [s.dag_id for s in scan.specs] + list(errors))
    return JSONResponse(finite({
        "airflow_root": root,
        "federations": [federation_summary(s, root) for s in scan.specs if s.dag_id in readable],
        "errors": [{"file": Path(e.source).name, "dag_id": dag_id, "error": str(e)}
                   for dag_id, e in errors.items() if dag_id in readable],
    }))


@app.get("/api/federations/{name}")
def get_federation(name: str, request: Request, user: Annotated[Any, Depends(airflow_user)]) -> JSONResponse:
    """One federation's rounds and latest drift table; 404 alike for a federation that does
    not exist and one the user may not read."""
    spec = next((s for s in _scan().specs if s.federation == name), None)
    if spec is None or spec.dag_id not in readable_dag_ids(user, [spec.dag_id]):
        raise HTTPException(404, f"No federation {name!r} that you may read")
    return JSONResponse(finite(federation_detail(spec, airflow_root(request))))


@app.get("/", response_class=HTMLResponse)
async def page(request: Request,
               bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Response:
    """The page itself (no data: its script fetches the JSON); an anonymous browser goes to
    Airflow's login, which comes back here."""
    root = airflow_root(request)
    try:
        await airflow_user(request, bearer)
    except HTTPException:
        return RedirectResponse(f"{root}/api/v2/auth/login?{urlencode({'next': str(request.url)})}", status_code=307)
    nonce = secrets.token_urlsafe(18)
    html = (PAGE.replace("__NONCE__", nonce)
            .replace("__APP_ROOT__", escape(request.scope.get("root_path", "").rstrip("/"), quote=True))
            .replace("__AIRFLOW_ROOT__", escape(root, quote=True)))
    # The script is ours alone (a nonce); it may talk to this origin only, and only Airflow's
    # own pages may frame it.
    policy = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
              "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
    return HTMLResponse(html, headers={"Content-Security-Policy": policy})


# The page: HTML, CSS and a script with no outside dependency (the machines may be offline).
# The script builds every element with DOM calls and text nodes, never from HTML strings:
# silo ids, column names and reasons come from silos and are shown as text, whatever they hold.
PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Federations</title>
<style nonce="__NONCE__">
:root { color-scheme: light dark; --fg: #1a202c; --muted: #5a6577; --line: #d8dee8; --bg: #fff; --panel: #f6f8fb;
  --ok: #1e7d43; --bad: #c0392b; --warn: #b7791f; --cand: #2b6cb0; --champ: #7b4397; --bar: #4a90c2; }
@media (prefers-color-scheme: dark) { :root { --fg: #e2e8f0; --muted: #a0aec0; --line: #3a4556; --bg: #171c24;
  --panel: #1f2631; --ok: #48bb78; --bad: #fc8181; --warn: #f6ad55; --cand: #63b3ed; --champ: #d6a4f2;
  --bar: #63a4d8; } }
body { margin: 0; padding: 16px 24px 40px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 18px; margin: 0 0 4px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
a { color: var(--cand); }
.muted { color: var(--muted); }
section.federation { border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; margin: 0 0 20px;
  background: var(--panel); }
.meta { color: var(--muted); margin: 0 0 8px; } .meta > span + span::before { content: " · "; }
.error { color: var(--bad); border-left: 3px solid var(--bad); padding: 4px 10px; margin: 8px 0; white-space: pre-wrap;
  overflow-wrap: anywhere; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.charts figure { margin: 0; flex: 1 1 420px; max-width: 720px; }
.charts figcaption { font-weight: 600; margin-bottom: 2px; }
svg.chart { width: 100%; height: auto; display: block; background: var(--bg); border: 1px solid var(--line);
  border-radius: 6px; }
svg.chart text { fill: var(--muted); font-size: 11px; }
svg.chart .grid { stroke: var(--line); stroke-width: 1; }
svg.chart .line { fill: none; stroke-width: 2; }
svg.chart .candidate { stroke: var(--cand); } svg.chart .champion { stroke: var(--champ); stroke-dasharray: 5 4; }
svg.chart circle.candidate { fill: var(--cand); }
svg.chart circle.champion { fill: var(--bg); stroke-width: 2; stroke-dasharray: none; }
svg.chart circle.promoted { fill: var(--ok); stroke: var(--ok); } svg.chart circle.rejected, svg.chart circle.no_model,
svg.chart circle.refused { fill: var(--bad); stroke: var(--bad); }
svg.chart rect.bar { fill: var(--bar); } svg.chart rect.bar.low { fill: var(--warn); }
svg.chart .legend-candidate { fill: var(--cand); } svg.chart .legend-champion { fill: var(--champ); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; min-width: 60%; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.reason { max-width: 28em; overflow-wrap: anywhere; color: var(--muted); } td.links { white-space: nowrap; }
.decision { display: inline-block; padding: 0 6px; border-radius: 4px; font-weight: 600; }
.decision.promoted { color: var(--ok); }
.decision.rejected, .decision.no_model, .decision.refused { color: var(--bad); }
td.drifted { color: var(--bad); font-weight: 600; } td.drifted::after { content: " \25B2"; }
tr.drifted th { color: var(--bad); }
</style>
</head>
<body data-app-root="__APP_ROOT__" data-airflow-root="__AIRFLOW_ROOT__">
<main>
<h1>Federations</h1>
<p id="status" class="muted" role="status">Loading…</p>
<div id="federations"></div>
</main>
<script nonce="__NONCE__">
"use strict";
(() => {
  const APP = document.body.dataset.appRoot;        // where this page is mounted
  const AIRFLOW = document.body.dataset.airflowRoot; // the Airflow UI's path prefix
  const SVG_NS = "http://www.w3.org/2000/svg";

  // Elements from DOM calls and text nodes only: whatever a string holds, it stays text.
  function build(node, attrs, children) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  const el = (tag, attrs, ...children) => build(document.createElement(tag), attrs, children);
  const svg = (tag, attrs, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const fmt = (v, digits = 4) => isNum(v) ? (Math.abs(v) >= 1000 ? v.toFixed(0) : v.toPrecision(digits)) : "–";
  const pct = (v) => isNum(v) ? `${Math.round(v * 100)}%` : "–";

  // Only this origin's paths and web addresses become links.
  function safeHref(url) {
    if (typeof url !== "string" || !url) return null;
    if (url.startsWith("/") && !url.startsWith("//")) return url;
    try {
      const parsed = new URL(url);
      return parsed.protocol === "http:" || parsed.protocol === "https:" ? parsed.href : null;
    } catch (e) { return null; }
  }

  // Inside the Airflow UI this page is a sandboxed frame that may neither navigate the window
  // nor open a tab: the (same-origin) Airflow page around it follows the link instead.
  function followFromFrame(event) {
    if (window.top === window || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) return;
    let doc;
    try { doc = window.top.document; } catch (e) { return; }
    event.preventDefault();
    const anchor = doc.createElement("a");
    anchor.href = event.currentTarget.href;
    if (event.currentTarget.target) { anchor.target = event.currentTarget.target; anchor.rel = "noopener noreferrer"; }
    doc.body.append(anchor);
    anchor.click();
    anchor.remove();
  }

  function link(url, text, external) {
    const href = safeHref(url);
    if (!href) return null;
    const a = el("a", {href, target: external ? "_blank" : null, rel: external ? "noopener noreferrer" : null}, text);
    a.addEventListener("click", followFromFrame);
    return a;
  }

  class SignedOut extends Error {}

  async function getJSON(path) {
    const response = await fetch(APP + path, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (response.status === 401 || response.status === 403) throw new SignedOut("Your Airflow session has ended.");
    let body = null;
    try { body = await response.json(); } catch (e) { /* said below */ }
    if (!response.ok) {
      throw new Error(body && typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`);
    }
    return body;
  }

  function failure(error) {
    if (error instanceof SignedOut) {
      const login = `${AIRFLOW}/api/v2/auth/login?next=${encodeURIComponent(window.location.href)}`;
      return el("p", {class: "error", role: "alert"}, error.message, " ", link(login, "Sign in again"));
    }
    return el("p", {class: "error", role: "alert"}, String(error && error.message || error));
  }

  // --- charts: inline SVG from the rounds -------------------------------------------------
  const W = 640, H = 230, LEFT = 52, RIGHT = 14, TOP = 26, BOTTOM = 46;

  function frame(title, labels, lo, hi, yFormat) {
    const chart = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title});
    chart.append(svg("title", {}, title));
    const n = labels.length;
    const x = (i) => n === 1 ? LEFT + (W - LEFT - RIGHT) / 2 : LEFT + 10 + i * (W - LEFT - RIGHT - 20) / (n - 1);
    const y = (v) => TOP + (hi - v) * (H - TOP - BOTTOM) / (hi - lo);
    for (const v of [lo, (lo + hi) / 2, hi]) {
      chart.append(svg("line", {class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v)}),
                   svg("text", {x: LEFT - 6, y: y(v) + 4, "text-anchor": "end"}, yFormat(v)));
    }
    const every = Math.max(1, Math.ceil(n / 6));  // at most about six round labels (ids can be long)
    labels.forEach((label, i) => {
      if (i % every !== 0 && i !== n - 1) return;
      chart.append(svg("text", {x: x(i), y: H - BOTTOM + 16, "text-anchor": "middle"}, label));
    });
    chart.append(svg("text", {x: (LEFT + W - RIGHT) / 2, y: H - 8, "text-anchor": "middle"}, "round"));
    return {chart, x, y};
  }

  function metricChart(rounds) {
    const name = (rounds.find((r) => r.primary_metric) || {}).primary_metric;
    const series = [["candidate", rounds.map((r) => r.candidate)], ["champion", rounds.map((r) => r.champion)]];
    const values = series.flatMap(([, vs]) => vs).filter(isNum);
    if (!name || !values.length) return null;
    let lo = Math.min(...values), hi = Math.max(...values);
    const pad = (hi - lo) * 0.08 || Math.abs(hi) * 0.05 || 0.05;
    lo -= pad; hi += pad;
    const title = `${name} of the candidate and the champion, by round`;
    const {chart, x, y} = frame(title, rounds.map((r) => r.round_id), lo, hi, (v) => fmt(v, 3));
    for (const [kind, vs] of series) {
      let d = "", pen = "M";
      vs.forEach((v, i) => {
        if (!isNum(v)) { pen = "M"; return; }
        d += `${pen}${x(i).toFixed(1)},${y(v).toFixed(1)} `;
        pen = "L";
      });
      if (d) chart.append(svg("path", {class: `line ${kind}`, d}));
      vs.forEach((v, i) => {
        if (!isNum(v)) return;
        const r = rounds[i];
        const cls = kind === "candidate" ? `candidate ${r.decision}` : "champion";
        chart.append(svg("circle", {class: cls, cx: x(i), cy: y(v), r: kind === "candidate" ? 4 : 3.5},
                         svg("title", {}, `round ${r.round_id}: ${kind} ${name} ${fmt(v)} (${r.decision})`)));
      });
    }
    chart.append(svg("text", {x: LEFT, y: 15, class: "legend-candidate"}, "● candidate (green: promoted, red: not)"),
                 svg("text", {x: LEFT + 270, y: 15, class: "legend-champion"}, "◦ - - champion before the round"));
    return figure(`${name} by round`, chart);
  }

  function participationChart(rounds) {
    if (!rounds.some((r) => isNum(r.participation.rate))) return null;
    const title = "Participation by round: updates committed of the clients expected";
    const {chart, x, y} = frame(title, rounds.map((r) => r.round_id), 0, 1, pct);
    const n = rounds.length;
    const width = Math.max(4, Math.min(40, (W - LEFT - RIGHT - 20) / Math.max(1, n) * 0.7));
    rounds.forEach((r, i) => {
      const p = r.participation;
      if (!isNum(p.rate)) return;
      chart.append(svg("rect", {class: p.rate < 1 ? "bar low" : "bar", x: x(i) - width / 2, y: y(p.rate),
                                width, height: Math.max(1, y(0) - y(p.rate))},
                       svg("title", {}, `round ${r.round_id}: ${p.committed} of ${p.expected} committed, ` +
                                        `${p.accepted} accepted (${pct(p.rate)})`)));
    });
    return figure("Participation by round", chart);
  }

  function figure(caption, chart) {
    return el("figure", {}, el("figcaption", {}, caption), chart);
  }

  // --- tables -----------------------------------------------------------------------------
  function roundsTable(rounds, metricName) {
    const head = ["Round", "Finished (UTC)", "Decision", "Version", "Participation",
                  `Candidate ${metricName || "metric"}`, `Champion ${metricName || "metric"}`, "Started by", "Reason",
                  "Links"];
    const rows = rounds.slice().reverse().map((r) => {
      const p = r.participation;
      const links = [link(r.links.run, "Airflow run"), link(r.links.mlflow_version, "MLflow version", true),
                     link(r.links.mlflow_run, "MLflow run", true)].filter(Boolean);
      return el("tr", {"data-round-id": r.round_id, "data-decision": r.decision},
        el("td", {}, r.round_id),
        el("td", {class: "num"}, (r.finished_at || "").replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "")),
        el("td", {}, el("span", {class: `decision ${r.decision}`}, r.decision)),
        el("td", {class: "num"}, r.version || "–",
           r.base_version ? el("span", {class: "muted"}, ` (from ${r.base_version})`) : null),
        el("td", {class: "num", title: `${p.accepted} of ${p.committed} committed updates accepted`},
           `${p.committed}/${p.expected} (${pct(p.rate)})`),
        el("td", {class: "num"}, fmt(r.candidate)),
        el("td", {class: "num"}, fmt(r.champion)),
        el("td", {}, r.triggered_by || "–", el("span", {class: "muted"}, ` (${r.run_type})`)),
        el("td", {class: "reason"}, r.reason || ""),
        el("td", {class: "links"}, links.flatMap((a, i) => i ? [" · ", a] : [a])));
    });
    return el("div", {class: "scroll"},
      el("table", {class: "rounds"}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
         el("tbody", {}, rows)));
  }

  function driftTable(drift) {
    const head = ["Silo", "Drifted", "Columns drifted", "Reference", "Rows (ref → now)", ...drift.columns];
    const rows = drift.silos.map((s) => el("tr", {class: s.dataset_drifted ? "drifted" : null, "data-silo": s.silo},
      el("th", {scope: "row"}, s.silo),
      el("td", {}, s.dataset_drifted ? "yes" : "no"),
      el("td", {class: "num"}, pct(s.drifted_share)),
      el("td", {}, s.reference),
      el("td", {class: "num"}, `${s.reference_rows} → ${s.current_rows}`),
      drift.columns.map((c) => {
        const cell = s.cells[c];
        if (!cell) return el("td", {class: "num muted"}, "–");
        return el("td", {class: cell.drifted ? "num drifted" : "num", "data-column": c,
                         title: `${c}: ${cell.method} = ${cell.score}${cell.drifted ? " (drifted)" : ""}`},
                  fmt(cell.score, 3));
      })));
    const missing = drift.missing.map((m) => el("tr", {"data-silo": m.silo}, el("th", {scope: "row"}, m.silo),
      el("td", {class: "muted", colspan: drift.silos.length ? head.length - 1 : null}, m.reason)));
    if (!drift.silos.length) {  // no scores: only why each silo sent none
      return [el("p", {class: "muted"}, `Round ${drift.round_id}: no silo sent drift scores.`),
              missing.length ? el("table", {class: "drift"}, el("tbody", {}, missing)) : null];
    }
    const share = `${drift.drifted_silos.length} of ${drift.silos.length} silos drifted`;
    return [el("p", {class: "muted"}, `Round ${drift.round_id}: ${share}. ▲ marks a drifted column.`),
            el("div", {class: "scroll"}, el("table", {class: "drift"},
              el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows, missing)))];
  }

  // --- one federation ---------------------------------------------------------------------
  function renderFederation(section, f) {
    section.replaceChildren(
      el("h2", {}, f.name),
      el("p", {class: "meta"}, el("span", {}, "DAG ", link(f.dag_url, f.dag_id)),
         el("span", {}, `bucket s3://${f.bucket}`),
         el("span", {}, `model ${f.model_name}`),
         el("span", {}, `${f.rounds.length} round${f.rounds.length === 1 ? "" : "s"} recorded`)));
    if (f.error) section.append(el("p", {class: "error", role: "alert"}, f.error));
    if (!f.rounds.length) {
      if (!f.error) {
        section.append(el("p", {class: "muted"},
                          "No round recorded yet: a round appears here once its summary step has run."));
      }
    } else {
      const metricName = (f.rounds.find((r) => r.primary_metric) || {}).primary_metric;
      section.append(el("div", {class: "charts"}, metricChart(f.rounds), participationChart(f.rounds)),
                     el("h3", {}, "Rounds (newest first)"), roundsTable(f.rounds, metricName));
    }
    if (f.error && !f.rounds.length) return;
    section.append(el("h3", {}, "Latest drift"));
    if (f.drift_error) section.append(el("p", {class: "error", role: "alert"}, f.drift_error));
    if (f.drift) section.append(...driftTable(f.drift).filter(Boolean));
    else if (!f.drift_enabled) {
      section.append(el("p", {class: "muted"}, "Drift is off for this federation (drift: false)."));
    }
    else if (!f.drift_error) section.append(el("p", {class: "muted"}, "No drift table yet."));
  }

  async function main() {
    const status = document.getElementById("status"), list = document.getElementById("federations");
    let index;
    try { index = await getJSON("/api/federations"); } catch (e) { status.replaceWith(failure(e)); return; }
    for (const broken of index.errors) {
      list.append(el("section", {class: "federation", "data-file": broken.file},
        el("h2", {}, broken.file, el("span", {class: "muted"}, " (does not load)")),
        el("p", {class: "error", role: "alert"}, broken.error)));
    }
    if (!index.federations.length) {
      status.textContent = "No federation whose DAG you may read.";
      return;
    }
    status.textContent = `${index.federations.length} federation${index.federations.length > 1 ? "s" : ""}`;
    await Promise.all(index.federations.map(async (summary) => {
      const section = el("section", {class: "federation", "data-federation": summary.name},
                         el("h2", {}, summary.name), el("p", {class: "muted"}, "Loading rounds…"));
      list.append(section);
      try {
        renderFederation(section, await getJSON(`/api/federations/${encodeURIComponent(summary.name)}`));
      } catch (e) {
        section.replaceChildren(el("h2", {}, summary.name), failure(e));
      }
      section.dataset.loaded = "true";
    }));
    document.body.dataset.loaded = "true";
  }

  main();
})();
</script>
</body>
</html>
"""
