"""A round's figures as Airflow metrics, next to Airflow's own (task durations, pool slots):
whatever the deployment configured in `[metrics]` (statsd_on, statsd_datadog_enabled or
otel_on, with their host, port and prefix) receives them, through the Task SDK's `Stats`.

Names: `<prefix>.fl.<federation>.<figure>` for every `RoundMetrics.flat()` figure (a gauge;
the prefix is `[metrics] statsd_prefix` / `otel_prefix`, `airflow` by default), and one
timer `<prefix>.fl.<federation>.update_latency` with a sample per silo (dispatch to commit;
tagged `silo=<id>` where the backend keeps tags). When no backend is enabled, `Stats` is
Airflow's no-op logger and so is this.
"""

from __future__ import annotations

import logging
import math
from datetime import timedelta

from airflow.sdk.observability.stats import Stats, normalize_name_for_stats

from fl_tasks.coordinator.metrics import RoundMetrics

log = logging.getLogger(__name__)


def _segment(part: str) -> str:
    """One dot-separated level of a metric name. Silo ids, reasons and metric names end up
    inside a level, so a '.' in them becomes '__' (as Airflow does for task ids in its legacy
    names) and would not add a level to the StatsD/Graphite hierarchy; anything else StatsD
    does not take becomes '_' (Airflow's own normalize_name_for_stats)."""
    return normalize_name_for_stats(part.replace(".", "__"), log_warning=False)


def stat_name(federation: str, figure: str) -> str:
    """`fl.<federation>.<figure>`, valid as a StatsD and an OpenTelemetry name."""
    return f"fl.{_segment(federation)}.{_segment(figure)}"


def emit_round_metrics(metrics: RoundMetrics) -> int:
    """Send the round's figures to Airflow's metrics backend; how many were handed to it.
    Stats initialises itself from the [metrics] config when the Task SDK loads (the task
    runner and airflow.sdk.serde call `stats.initialize`), so nothing is set up here."""
    sent = 0
    for figure, value in sorted(metrics.flat().items()):
        if not math.isfinite(value):  # StatsD has no NaN; OTel would record a meaningless point
            log.info("metric %s not sent: its value is %s", figure, value)
            continue
        Stats.gauge(stat_name(metrics.federation, figure), value)
        sent += 1
    latency_name = stat_name(metrics.federation, "update_latency")
    for silo, seconds in sorted(metrics.latency_seconds.items()):
        if not math.isfinite(seconds):
            continue
        # A timedelta, so each backend converts to its own unit (StatsD and OTel: milliseconds).
        Stats.timing(latency_name, timedelta(seconds=seconds),
                     tags={"silo": normalize_name_for_stats(silo, log_warning=False)})
        sent += 1
    return sent
