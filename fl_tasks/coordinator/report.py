"""The round's report (report.json) and what a person reads about a round: the aggregate
step's account, the validation account (per source, per silo), the summary table and the
note an Airflow run carries; and what MLflow records of an evaluation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fl_tasks.coordinator.breaker import REFUSED
from fl_tasks.coordinator.drift import DriftTable
from fl_tasks.coordinator.metrics import RoundMetrics

log = logging.getLogger("fl_tasks.coordinator")


def build_report(plan, closed: dict[str, Any] | None, summary: dict[str, Any] | None, result: dict[str, Any] | None,
                 decision: dict[str, Any] | None, failure: dict[str, Any] | None, *, late: list[dict[str, str]],
                 audit_log: str, metrics: RoundMetrics | None = None, drift: DriftTable | None = None,
                 report_html: str = "", privacy: dict[str, Any] | None = None,
                 personalization: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json: what the round did, from the records its steps stored. `personalization`:
    the per-silo personalization table (`personalization_table`), None when the round had none."""
    refused = bool((failure or {}).get("refused"))
    return {
        "federation": plan.federation, "round_id": plan.round_id, "run_id": plan.run_id, "run_type": plan.run_type,
        "triggered_by": plan.triggered_by,
        "base_version": plan.base_version, "base_origin": plan.base_origin, "data_window": plan.data_window,
        "settings": plan.settings, "task": plan.task,
        "clients_expected": len(plan.clients),
        "clients_committed": len(closed["committed"]) if closed else 0,
        "clients_declined": closed["declined"] if closed else {},
        "clients_accepted": [a["client_id"] for a in summary["accepted"]] if summary else [],
        "clients_rejected": (summary["rejected"] if summary else []) + [
            {"client_id": c, "reason": r} for c, r in ((closed or {}).get("unreadable") or {}).items()],
        "candidate": result["candidate"] if result else None,
        "champion": result["champion"] if result else None,
        "primary_metric": result["primary_metric"] if result else None,
        "gates": result["gates"] if result else [],
        "evaluation_sources": result["sources"] if result else [],
        "decided_by": result["decided_by"] if result else [],
        "federated_evaluation": result["federated_evaluation"] if result else None,
        "coordinator_evaluation": result["coordinator_evaluation"] if result else None,
        "decision": decision["decision"] if decision else REFUSED if refused else "no_model",
        "version": decision["version"] if decision else None,
        "reason": (failure or {}).get("reason") or ("; ".join(decision["reasons"]) if decision else ""),
        "late": late,
        "audit_log": audit_log,
        "metrics": metrics.as_dict() if metrics else None,
        "drift": None if drift is None else {"drifted_silos": drift.drifted_silos, "drifted_share": drift.drifted_share,
                                             "silos": {s: r.drifted_share for s, r in drift.silos.items()},
                                             "missing": drift.missing},
        "report_html": report_html,
        # Differential privacy: epsilon at delta of every round the federation released so far.
        "privacy": privacy,
        # Personal models: each silo's global, personal and local-only scores, what it serves, the lineage.
        "personalization": personalization,
    }


def log_lines(title: str, text: str) -> None:
    """A multi-line account as one log record per line, so that tables stay aligned in Airflow's log view."""
    log.info("%s:", title)
    for line in text.splitlines():
        log.info("  %s", line)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An aligned text table: numbers right-aligned, text left-aligned, '-' for None."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(row[i] is None or isinstance(row[i], (int, float)) and not isinstance(row[i], bool)
                                  for row in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _setting(value: Any, unit: str = "") -> str:
    return "off" if value is None else f"{value:g}{unit}" if isinstance(value, (int, float)) else str(value)


def aggregate_account(summary: dict[str, Any], screening: dict[str, Any]) -> str:
    """The aggregate step's log: strategy and parameters, the screening thresholds, each
    update's norm and verdict, and what the rule did with the accepted ones."""
    params = ", ".join(f"{k}={v}" for k, v in sorted(summary["params"].items())) or "defaults"
    accepted = {a["client_id"]: a for a in summary["accepted"]}
    rejected = {r["client_id"]: r["reason"] for r in summary["rejected"]}
    rows = []
    for client_id in sorted(set(summary["seen"]) | set(accepted) | set(rejected)):
        seen = summary["seen"].get(client_id, {})
        entry = accepted.get(client_id, {})
        verdict = "accepted" if client_id in accepted else f"rejected: {rejected[client_id]}"
        rows.append([client_id, seen.get("num_examples"), seen.get("update_norm"), entry.get("influence"),
                     entry.get("krum_score"), verdict])
    headers = ["client", "examples", "norm", "influence", "krum score", "verdict"]
    if not any(row[4] is not None for row in rows):
        headers, rows = headers[:4] + headers[5:], [row[:4] + row[5:] for row in rows]
    lines = [
        f"strategy {summary['aggregator']} ({params}), clip_norm {_setting(summary['clip_norm'])}",
        f"screening: max_update_norm {_setting(screening.get('max_update_norm'))}, "
        f"max_norm_ratio {_setting(screening.get('max_norm_ratio'), ' x median')}, "
        f"min_cosine {_setting(screening.get('min_cosine'))}",
        table(headers, rows),
        f"rule: {summary['rule']}",
    ]
    if summary.get("selected") is not None:
        lines.append(f"selected: {', '.join(summary['selected'])}")
    lines.append(f"candidate sha256 {summary['candidate_sha256']}")
    return "\n".join(lines)


SOURCE_WORDS = {"federated": "federated evaluation", "coordinator": "the coordinator's own rows",
                "drift": "drift at the silos"}


def sources_text(result: dict[str, Any]) -> str:
    """Which sources the gates read, and which decided, in words."""
    used = " and ".join(SOURCE_WORDS[s] for s in result.get("sources") or [])
    if result.get("passed", True):
        return f"gates on {used}" if used else "no gates"
    return f"gates on {used}; failed on " + " and ".join(SOURCE_WORDS[s] for s in result.get("decided_by") or [])


def validation_account(result: dict[str, Any]) -> str:
    """The deciding candidate and champion figures, each silo's own numbers (federated
    evaluation), the coordinator's rows, and each gate's verdict."""
    candidate, champion = result.get("candidate") or {}, result.get("champion") or {}
    parts = []
    fed, coord = result.get("federated_evaluation"), result.get("coordinator_evaluation")
    if candidate or champion:
        title = f"federated {fed['statistic']}" if fed else "coordinator rows"
        parts.append(f"{title}:\n" + table(["metric", "candidate", "champion"],
                                          [[name, candidate.get(name), champion.get(name)]
                                           for name in sorted(set(candidate) | set(champion))]))
    if fed and fed["per_silo"]:
        primary = result.get("primary_metric")
        rows = [[client, r["num_examples"], r["scores"]["candidate"].get(primary),
                 r["scores"].get("champion", {}).get(primary)] for client, r in sorted(fed["per_silo"].items())]
        parts.append(f"per silo ({primary}, on each silo's own evaluation share):\n"
                     + table(["silo", "rows", "candidate", "champion"], rows))
    if fed and fed["not_counted"]:
        parts.append("\n".join(f"not counted {c}: {why}" for c, why in sorted(fed["not_counted"].items())))
    if coord and fed:
        parts.append(f"coordinator rows ({coord['rows']}):\n" + table(
            ["metric", "candidate", "champion"], [[name, coord["candidate"].get(name), (coord["champion"] or {}).get(
                name)] for name in sorted(coord["candidate"])]))
    if result.get("personalization"):
        parts.append(personalization_account(result["personalization"]))
    gates = result.get("gates") or []
    if gates:
        parts.append(table(["gate", "source", "passed", "detail"],
                           [[g["name"], g.get("source", "coordinator"), g["passed"], g["detail"]] for g in gates]))
    return "\n\n".join(parts)


# --- personalization ---------------------------------------------------------------------------
PERSONAL_MODELS = ("global", "personal", "local_only")


def personalization_table(settings: dict[str, Any], per_silo: dict[str, Any], rejected: dict[str, str], primary: str,
                          global_label: str, versions: dict[str, str]) -> dict[str, Any] | None:
    """The per-silo personalization table (report.json and MLflow's personalization.json), from
    the screened evaluations: for each silo whose personal block counted, the scores of the
    global model (`global_label`: the round's candidate, or an evaluation-only run's champion),
    its personal model and its local-only model (every metric, and the primary one apart),
    which of global and personal it serves, and the lineage: the strategy, the global model its
    personal one came from (label, version, sha256) and the personal weights' sha256. None
    when the evaluation asked for no personalization. `versions`: model label -> version."""
    if not settings:
        return None
    silos: dict[str, Any] = {}
    for client, r in sorted(per_silo.items()):
        p = r.get("personal")
        if not p:
            continue
        scores = {"global": dict(r["scores"].get(global_label) or {}), "personal": dict(p["scores"]["personal"]),
                  "local_only": dict(p["scores"]["local_only"]) if "local_only" in p["scores"] else None}
        silos[client] = {
            "serving": p["serving"],
            "scores": scores,
            "primary": {kind: (values or {}).get(primary) for kind, values in scores.items()},
            "lineage": {"strategy": p["strategy"], "global_model": p["global_model"],
                        "global_version": versions.get(p["global_model"]), "global_sha256": p["global_sha256"],
                        "personal_sha256": p["personal_sha256"]},
            "weights": p.get("weights"),
            "registered": None,
        }
    mean: dict[str, dict[str, float]] = {}
    for kind in PERSONAL_MODELS:
        rows = [s["scores"][kind] for s in silos.values() if s["scores"][kind]]
        names = sorted(set.intersection(*(set(row) for row in rows))) if rows else []
        mean[kind] = {name: float(sum(row[name] for row in rows) / len(rows)) for name in names}
    return {"strategy": settings["strategy"], "settings": dict(settings), "primary_metric": primary,
            "global_model": global_label, "silos": silos, "rejected": dict(sorted(rejected.items())),
            "serving": {served: sorted(c for c, s in silos.items() if s["serving"] == served)
                        for served in ("personal", "global")},
            "mean": mean}


def with_versions(personal: dict[str, Any] | None, candidate_version: str | None,
                  registered: dict[str, dict[str, str]] | None = None) -> dict[str, Any] | None:
    """The table once the round's candidate is a registered version (its global_version), and
    each silo's personal weights registered in MLflow (`registered`: client -> {model, version})."""
    if not personal:
        return personal
    silos = {}
    for client, entry in personal["silos"].items():
        lineage = dict(entry["lineage"])
        if lineage["global_model"] == "candidate" and candidate_version:
            lineage["global_version"] = str(candidate_version)
        silos[client] = {**entry, "lineage": lineage, "registered": (registered or {}).get(client, entry["registered"])}
    return {**personal, "silos": silos}


def personalization_metrics(personal: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of the table: global.<client>.<metric>, personal.<client>.<metric>,
    local_only.<client>.<metric>, serving_personal.<client> (1 or 0), and
    personalization.mean.<model>.<metric> and personalization.serving_personal (a count)."""
    metrics: dict[str, float] = {}
    for client, entry in personal["silos"].items():
        for kind in PERSONAL_MODELS:
            metrics.update({f"{kind}.{client}.{k}": float(v) for k, v in (entry["scores"][kind] or {}).items()})
        metrics[f"serving_personal.{client}"] = float(entry["serving"] == "personal")
    for kind, values in personal["mean"].items():
        metrics.update({f"personalization.mean.{kind}.{k}": float(v) for k, v in values.items()})
    metrics["personalization.serving_personal"] = float(len(personal["serving"]["personal"]))
    metrics["personalization.silos"] = float(len(personal["silos"]))
    return metrics


def personalization_tags(personal: dict[str, Any], lineage: bool = True) -> dict[str, str]:
    """The round run's tags: the strategy, what each silo serves and (`lineage`) each silo's
    lineage in one line, fl.personal.<client>; the candidate version gets the first two."""
    tags = {"fl.personalization": personal["strategy"],
            "fl.personal_serving": "; ".join(f"{c} {s['serving']}" for c, s in personal["silos"].items())[:4000]
            or "no silo counted"}
    for client, entry in personal["silos"].items() if lineage else ():
        line = entry["lineage"]
        tags[f"fl.personal.{client}"] = (
            f"serving {entry['serving']}; {line['strategy']} from {_model(line)} (sha256 {line['global_sha256']}); "
            f"personal sha256 {line['personal_sha256']}")
    if personal["rejected"]:
        tags["fl.personal_rejected"] = "; ".join(f"{c}: {w}" for c, w in personal["rejected"].items())[:4000]
    return tags


def _model(lineage: dict[str, Any]) -> str:
    """The global model a personal one came from, in words: 'candidate', 'candidate version 4'."""
    label, version = lineage["global_model"], lineage["global_version"]
    return label if version in (None, "", label) else f"{label} version {version}"


def personalization_account(personal: dict[str, Any]) -> str:
    """The log's personalization tables: each silo's global, personal and local-only scores per
    metric, then what it serves and where its personal model came from."""
    primary = personal["primary_metric"]
    silos = personal["silos"]
    lines = [f"personalization ({personal['strategy']}): {len(personal['serving']['personal'])} of {len(silos)} silos "
             f"serve their personal model (by {primary}; global = {personal['global_model']})"]
    if silos:
        rows = []
        for client, entry in silos.items():
            names = [primary] + sorted((set(entry["scores"]["global"]) | set(entry["scores"]["personal"])) - {primary})
            for name in names:
                rows.append([client, name, *((entry["scores"][kind] or {}).get(name) for kind in PERSONAL_MODELS)])
        lines.append(table(["silo", "metric", "global", "personal", "local only"], rows))
        lines.append(table(["silo", "serving", "strategy", "from", "global sha256", "personal sha256", "weights"], [
            [client, entry["serving"], entry["lineage"]["strategy"],
             _model(entry["lineage"]),
             entry["lineage"]["global_sha256"][:16], entry["lineage"]["personal_sha256"][:16],
             (entry["registered"] or {}).get("version") and
             f"{entry['registered']['model']} v{entry['registered']['version']}"
             or ("kept" if entry["weights"] else "at the silo")]
            for client, entry in silos.items()]))
    lines += [f"personal not counted {c}: {why}" for c, why in personal["rejected"].items()]
    return "\n".join(lines)


def evaluation_metrics(result: dict[str, Any]) -> dict[str, float]:
    """A validation result's MLflow metrics: the federated ones (`federated_metrics`) and
    coordinator_<model>_<metric> for the coordinator's own rows."""
    metrics = federated_metrics(result["federated_evaluation"]) if result.get("federated_evaluation") else {}
    coord = result.get("coordinator_evaluation")
    if coord:
        for label in ("candidate", "champion"):
            metrics.update({f"coordinator_{label}_{k}": float(v) for k, v in (coord[label] or {}).items()})
    return metrics


def federated_metrics(evaluated: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of the silos' evaluations (a round's or an evaluation-only run's):
    silo_<client>_<model>_<metric> and silo_<client>_examples for each silo that counted,
    <statistic>_<model>_<metric> for both figures, and silos_evaluated."""
    metrics: dict[str, float] = {}
    for client, r in evaluated["per_silo"].items():
        for label, scores in r["scores"].items():
            metrics.update({f"silo_{client}_{label}_{k}": float(v) for k, v in scores.items()})
        metrics[f"silo_{client}_examples"] = float(r["num_examples"])
    for statistic in ("mean", "median"):
        for label, scores in evaluated["figures"].get(statistic, {}).items():
            metrics.update({f"{statistic}_{label}_{k}": float(v) for k, v in scores.items()})
    metrics["silos_evaluated"] = float(len(evaluated["per_silo"]))
    return metrics


def evaluation_tags(result: dict[str, Any]) -> dict[str, str]:
    """The candidate version's tags: which silos evaluated it, with what result, and which
    sources the gates read."""
    tags = {"fl.evaluation_sources": ",".join(result.get("sources") or []),
            "fl.gates": "passed" if result.get("passed") else "failed on " + ",".join(result.get("decided_by") or [])}
    fed = result.get("federated_evaluation")
    if fed:
        primary = result["primary_metric"]
        tags["fl.evaluated_by"] = ",".join(sorted(fed["per_silo"])) or "none"
        tags["fl.evaluation"] = "; ".join(
            f"{c} {primary} {r['scores']['candidate'][primary]:.4f}"
            + (f" (champion {r['scores']['champion'][primary]:.4f})" if "champion" in r["scores"] else "")
            for c, r in sorted(fed["per_silo"].items()))[:4000] or "no silo evaluated"
        if fed["not_counted"]:
            tags["fl.evaluation_not_counted"] = "; ".join(f"{c}: {w}" for c, w in sorted(fed["not_counted"].items()))[:4000]
    return tags


def evaluation_account(report: dict[str, Any]) -> str:
    """An evaluation-only run's log: each silo's numbers and the figures over the silos."""
    labels = list(report["models"])
    rows = [[client, r["num_examples"], *(r["scores"][label].get(metric) for label in labels
                                          for metric in sorted(r["scores"][label]))]
            for client, r in sorted(report["per_silo"].items())]
    metrics = sorted(next(iter(report["per_silo"].values()))["scores"][labels[0]]) if report["per_silo"] else []
    headers = ["silo", "rows", *(f"{label} {metric}" for label in labels for metric in metrics)]
    parts = [", ".join(f"{label} = version {version}" for label, version in report["models"].items())]
    if rows:
        parts.append(table(headers, rows))
        for statistic in ("mean", "median"):
            parts.append(f"{statistic}: " + "; ".join(
                f"{label} " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(report["figures"][statistic][label].items()))
                for label in labels))
    for client, why in sorted(report["not_counted"].items()):
        parts.append(f"not counted {client}: {why}")
    if report.get("personalization"):
        parts.append(personalization_account(report["personalization"]))
    if not report["enough_silos"]:
        parts.append(f"only {len(report['per_silo'])} silos evaluated; {report['required']} were asked for")
    return "\n\n".join(parts)


def summary_table(report: dict[str, Any]) -> str:
    """The summary step's log: the round in a few aligned lines."""
    head = table(["round", "decision", "version", "base", "committed", "declined", "accepted", "rejected", "late"], [[
        report["round_id"], report["decision"], report["version"], report["base_version"],
        f"{report['clients_committed']}/{report['clients_expected']}", len(report.get("clients_declined", {})),
        len(report["clients_accepted"]), len(report["clients_rejected"]), len(report["late"])]])
    parts = [head]
    validation = validation_account(report)
    if validation:
        parts.append(validation)
    if report.get("metrics"):
        parts.append(metrics_account(report["metrics"]))
    if report.get("privacy"):
        parts.append(privacy_account(report["privacy"]))
    for client_id, reason in sorted(report.get("clients_declined", {}).items()):
        parts.append(f"declined {client_id}: {reason}")
    for entry in report["clients_rejected"]:
        parts.append(f"rejected {entry['client_id']}: {entry['reason']}")
    if report["reason"]:
        parts.append(f"reason: {report['reason']}")
    for alert in report.get("alerts") or []:
        parts.append(f"ALERT {alert['kind']}: {alert['message']}")
    parts.append(f"audit log: {report['audit_log']}")
    if report.get("report_html"):
        parts.append(f"report with plots: {report['report_html']}")
    return "\n\n".join(parts)


def metrics_account(metrics: dict[str, Any]) -> str:
    """The round's operating figures in one line."""
    latency = ", ".join(f"{name} {metrics[f'latency_{name}']:.1f}s" for name in ("p50", "p90", "p95", "max")
                        if metrics.get(f"latency_{name}") is not None) or "none"
    line = (f"participation {metrics['participation_rate']:.0%} ({metrics['clients_committed']} of "
            f"{metrics['clients_expected']} silos), update latency {latency}, {metrics['bytes_down']:,} bytes down, "
            f"{metrics['bytes_up']:,} up")
    if metrics.get("drifted_share") is not None:
        line += f", drifted share of silos {metrics['drifted_share']:.0%}"
    return line


def privacy_account(privacy: dict[str, Any]) -> str:
    """The federation's privacy spend in one line."""
    limit = "no limit" if privacy["max_epsilon"] is None else f"max_epsilon {privacy['max_epsilon']:g}"
    return (f"differential privacy: epsilon {privacy['epsilon']:.3f} at delta {privacy['delta']:g} over "
            f"{privacy['rounds_released']} released rounds ({limit}; {privacy['accountant']} accountant); this round "
            f"{'released' if privacy['round_released'] else 'released nothing'}: noise multiplier "
            f"{privacy['noise_multiplier']:g}, clip norm {privacy['clip_norm']:g}, noise at the {privacy['noise']}, "
            f"{privacy['sampling']} sampling drew {len(privacy['sampled'])} of {privacy['population']} silos")


def drift_account(drift: DriftTable) -> str:
    """The drift step's log: each silo's drifted share, its reference and its drifted columns."""
    rows = [[silo, r.current_rows, r.reference_rows, r.drifted_share, r.dataset_drifted,
             ", ".join(c for c, cell in r.columns.items() if cell.drifted)[:80] or "-"]
            for silo, r in sorted(drift.silos.items())]
    parts = [table(["silo", "rows", "reference rows", "drifted share", "drifted", "drifted columns"], rows)] \
        if rows else []
    parts += [f"no scores from {silo}: {why}" for silo, why in sorted(drift.missing.items())]
    return "\n".join(parts) or "no drift scores"


DECISION_WORDS = {"promoted": "promoted", "rejected": "rolled back", "no_model": "no model",
                  REFUSED: "refused (circuit breaker open)"}


def run_note(report: dict[str, Any]) -> str:
    """The Airflow run's note: round id, decision, version and reason, in Markdown."""
    decision = DECISION_WORDS.get(report["decision"], report["decision"])
    version = f" · version {report['version']}" if report["version"] else ""
    lines = [f"**Round {report['round_id']}: {decision}**{version} · "
             f"{len(report['clients_accepted'])} of {report['clients_expected']} updates accepted"]
    if report["reason"]:
        lines.append(f"Reason: {report['reason']}")
    if report.get("evaluation_sources"):
        lines.append(sources_text({"sources": report["evaluation_sources"], "decided_by": report["decided_by"],
                                   "passed": report["decision"] == "promoted"}).capitalize())
    declined = report.get("clients_declined") or {}
    if declined:
        lines.append("Declined: " + "; ".join(f"{c} declined: {r}" for c, r in sorted(declined.items())))
    return "\n\n".join(lines)


def evaluation_note(report: dict[str, Any]) -> str:
    """An evaluation-only run's note: what was scored, by how many silos, the figures."""
    lines = [f"**Evaluation {report['evaluation_id']}**: " + ", ".join(
        f"{label} (version {v})" for label, v in report["models"].items())
        + f" · {len(report['per_silo'])} silos evaluated"]
    statistic = report["statistic"]
    for label, figures in report["figures"][statistic].items():
        lines.append(f"{label}: {statistic} " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(figures.items())))
    if report["not_counted"]:
        lines.append("Not counted: " + "; ".join(f"{c}: {w}" for c, w in sorted(report["not_counted"].items())))
    return "\n\n".join(lines)


def running_note(round_id: str, base_version: str) -> str:
    """The note a run carries while its round is under way."""
    return f"**Round {round_id}: running** · base version {base_version}"
