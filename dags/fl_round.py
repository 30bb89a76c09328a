"""The DAGs of each federation file in `federations/`: `fl_round__<federation>`, its
monitoring DAG `fl_monitor__<federation>`, and, when the federation evaluates on its silos,
`fl_evaluate__<federation>`.

Each run of `fl_round__<F>` is one federated round; each run of `fl_evaluate__<F>` asks
every silo to score the champion (and optionally one named version) on its own data,
without training or registering anything; `fl_monitor__<F>` starts a round through an asset
event when drift or the champion's quality crosses the federation file's thresholds. This file only wires tasks to the plain functions of
`fl_tasks.coordinator`; it imports no torch, mlflow, evidently or pandas, so it parses fast.
A federation file that does not load becomes a paused DAG `fl_config_error__<file>` whose
description and docs name the file, the field and the fix; the other federations' DAGs
stay in place.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import (Asset, AssetOrTimeSchedule, CronDataIntervalTimetable, Param, TriggerRule, chain, dag,
                         task)
from airflow.sdk.exceptions import AirflowFailException
from fl_airflow.sensors import PreviousRoundSensor, QuorumSensor
from fl_airflow.steps import RoundStepOperator

from fl_tasks.config import ConfigError, FederationSpec, error_dag_id, federations_dir, scan_federations
from fl_tasks.protocol import ROUND_ID_PATTERN
from fl_tasks.settings import FEDERATED_EVALUATION_PREFIX, ROUND_SETTINGS

log = logging.getLogger(__name__)



def retry_policy() -> dict[str, Any]:
    """Task retries: the second line of defence against S3 and MLflow outages.

    Each S3 and MLflow request is already retried inside the task (boto3: 5 attempts; MLflow:
    5 retries over about 30 s). A task that still fails is retried by Airflow 4 times, after
    30 s, then doubling (Airflow waits between 1x and 2x each step), at most 5 minutes
    apart: an outage of about 8 minutes or more is ridden out. Every step is safe to re-run
    (it finds its own earlier writes; commit markers are written last). What cannot get
    better by waiting fails at once without retries (AirflowFailException): a bad trigger
    param, RoundFailed (missed quorum, too few updates after screening, a corrupted base).
    The FL_TASK_* variables tune it per deployment (read when the DAG file is parsed).
    """
    return {
        "retries": int(os.environ.get("FL_TASK_RETRIES", "4")),
        "retry_delay": timedelta(seconds=float(os.environ.get("FL_TASK_RETRY_DELAY_SECONDS", "30"))),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=float(os.environ.get("FL_TASK_MAX_RETRY_DELAY_SECONDS", "300"))),
    }

DOC = """
### Federated round: {federation}

{description}

One run is one round: **wait_for_previous_round** (rounds run one at a time, in order)
→ **prepare** (round id, base = `champion` or the seeded model, deadline)
→ **dispatch** the base model to every client bucket → **wait_for_quorum** (deferred: no
worker slot while clients train) → **aggregate** the screened updates ({aggregator}) →
{evaluation}**validate** against the quality gates ({gates}) → **register** the candidate in MLflow as
`{model_name}` → **promote** (alias `champion`) or **rollback** (tag `rejected`) → **summary**.

Clients: {clients}. Quorum: {quorum}. Federation file: `{source}`.
"""

EVALUATION_STEPS = ("**request_evaluation** (the candidate and the champion to every silo that took part) → "
                    "**wait_for_evaluations** (deferred: no worker slot while silos evaluate; {min_silos} silos "
                    "within {timeout:g} minutes) → ")

CHECK_DOC = """
### Evaluation-only run: {federation}

Asks every silo to score the current champion ({model_name}@champion), and optionally one more
registered version (the `version` param), on its own evaluation share: the rows it never
trains on. Nothing is trained, registered or promoted. The figures per silo and over the
silos go to MLflow (a run `evaluation-<id>`, a `fl.last_evaluation` tag on each version) and to
`evaluation/report.json` in the coordinator's bucket.

**prepare_evaluation** → **request_evaluation** → **wait_for_evaluations** (deferred: {min_silos} silos
within {timeout:g} minutes) → **report_evaluation**. Federation file: `{source}`.
"""


def round_params(spec: FederationSpec) -> dict[str, Param]:
    """The trigger form: every per-round setting (fl_tasks.settings), typed, bounded,
    defaulting to the federation file."""
    defaults = spec.round_defaults()
    params = {s.name: Param(None if s.name == "aggregator_params" else defaults[s.name], type=s.json_type(),
                            description=s.description, **s.bounds(len(spec.clients)))
              for s in ROUND_SETTINGS
              if spec.evaluation.federated is not None or not s.path.startswith(FEDERATED_EVALUATION_PREFIX)}
    params["round_id"] = Param(None, type=["null", "string"], pattern=ROUND_ID_PATTERN.pattern,
                               description="Optional explicit round id (manual runs); default: next free number")
    params["reset_circuit_breaker"] = Param(False, type="boolean", description=(
        "Reset the circuit breaker before this round: after circuit_breaker.max_consecutive_failures failed or "
        "rolled-back rounds, rounds refuse to dispatch until an operator resets it here"))
    return params


def retrain_asset(spec: FederationSpec) -> Asset:
    """The asset whose events start a round: the monitoring DAG emits them."""
    return Asset(name=spec.retrain_asset_name, uri=spec.retrain_asset_uri)


def round_schedule(spec: FederationSpec):
    """Rounds start on the federation's schedule (over data intervals: Airflow 3's cron default
    is a point in time) and whenever the monitoring DAG asks for one (an asset event)."""
    if not spec.schedule:
        return [retrain_asset(spec)]
    return AssetOrTimeSchedule(timetable=CronDataIntervalTimetable(spec.schedule, timezone="UTC"),
                               assets=retrain_asset(spec))


def trigger_reason(context: dict[str, Any]) -> str:
    """Why an asset-triggered run started: the reason the monitoring DAG attached to its event."""
    reasons = [str((event.extra or {}).get("reason") or "")
               for events in (context.get("triggering_asset_events") or {}).values() for event in events]
    return "; ".join(r for r in reasons if r)


def _step(federation_file: str, step: str, round_id: str) -> Any:
    from fl_airflow.steps import coordinator_for, run_step

    return run_step(coordinator_for(federation_file), step, round_id)


def _shard_step(federation_file: str, step: str, round_id: str, shard: int | None = None) -> Any:
    """A sharded round's step (fl_tasks.coordinator.shards), for one shard when `shard` is given."""
    from fl_airflow.steps import coordinator_for

    from fl_tasks.config import ConfigError
    from fl_tasks.coordinator import RoundFailed

    coordinator = coordinator_for(federation_file)
    try:
        return getattr(coordinator, step)(round_id) if shard is None else getattr(coordinator, step)(round_id, shard)
    except (RoundFailed, ConfigError) as exc:
        raise AirflowFailException(str(exc)) from None


def _aggregator_text(spec: FederationSpec) -> str:
    if spec.shards <= 1:
        return spec.aggregation
    return (f"{spec.aggregation}, in {spec.shards} shards: **shard_statistics** and **aggregate_shard** mapped over "
            "the shards, each reading only its byte ranges of every update, then **assemble_candidate**")


def _quorum_text(spec: FederationSpec) -> str:
    q = spec.quorum
    text = f"{q.min_clients} of {len(spec.clients)} clients"
    if q.min_fraction is not None:
        text += f" and at least {q.min_fraction:.0%} of them"
    text += f", within {q.round_timeout_minutes:g} minutes of dispatch"
    if q.grace_period_minutes is not None:
        text += f"; stragglers get {q.grace_period_minutes:g} more minutes once the quorum is in"
    return text


def _utc(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def build_round_dag(spec: FederationSpec):
    federation_file = str(Path(spec.source).resolve())

    @dag(
        dag_id=spec.dag_id,
        description=f"Federated round of {spec.federation}",
        schedule=round_schedule(spec),
        start_date=_utc(spec.start_date),
        end_date=_utc(spec.end_date) if spec.end_date else None,
        catchup=False,
        max_active_runs=1,
        params=round_params(spec),
        tags=["federated-learning", spec.federation],
        doc_md=DOC.format(federation=spec.federation, description=spec.description, aggregator=_aggregator_text(spec),
                          model_name=spec.model_name, clients=", ".join(c.id for c in spec.clients),
                          quorum=_quorum_text(spec), source=spec.source, gates=_gates_text(spec),
                          evaluation=EVALUATION_STEPS.format(min_silos=fed.min_silos, timeout=fed.timeout_minutes)
                          if (fed := spec.evaluation.federated) else ""),
        default_args=retry_policy(),
    )
    def fl_round():
        @task
        def prepare_round(**context) -> str:
            from fl_airflow.run_notes import set_run_note
            from fl_airflow.steps import coordinator_for

            from fl_tasks.config import ConfigError
            from fl_tasks.coordinator import RoundFailed, RunContext, report

            run = context["dag_run"]
            run_type = str(getattr(run.run_type, "value", run.run_type))
            start, end = context.get("data_interval_start"), context.get("data_interval_end")
            ctx = RunContext(
                run_id=run.run_id, run_type=run_type,
                data_interval_start=start.isoformat() if start else None,
                data_interval_end=end.isoformat() if end else None,
                params=dict(context["params"]),
                # For the audit log: the user Airflow names, else the scheduler for scheduled runs,
                # else the monitoring DAG's reason for asset-triggered ones.
                triggered_by=getattr(run, "triggering_user_name", None) or (
                    "scheduler" if run_type == "scheduled" else f"monitoring: {trigger_reason(context)}"
                    if run_type == "asset_triggered" else ""),
            )
            coordinator = coordinator_for(federation_file)
            try:
                round_id = coordinator.prepare(ctx)
            except (RoundFailed, ConfigError, ValueError) as exc:
                raise AirflowFailException(str(exc)) from None
            set_run_note(run.dag_id, run.run_id,
                         report.running_note(round_id, coordinator.load_plan(round_id).base_version))
            return round_id

        @task
        def dispatch(round_id: str) -> list[str]:
            return _step(federation_file, "dispatch", round_id)

        # The steps log their results readably; Airflow's one-line dump of the return value would repeat them.
        # A `dict` return annotation would also make TaskFlow push every key as an XCom of its own
        # (multiple_outputs): a write each (summary's report has 20 keys) that nothing reads.
        @task(show_return_value_in_logs=False, multiple_outputs=False)
        def aggregate(round_id: str) -> dict[str, Any]:
            summary = _step(federation_file, "aggregate", round_id)
            return {"accepted": [a["client_id"] for a in summary["accepted"]], "rejected": summary["rejected"]}

        # Sharded rounds (aggregation.shards > 1): `aggregate` screens; these aggregate.
        @task(show_return_value_in_logs=False, multiple_outputs=False)
        def shard_statistics(round_id: str, shard: int) -> dict[str, Any]:
            return _shard_step(federation_file, "shard_statistics", round_id, shard)

        @task(show_return_value_in_logs=False, multiple_outputs=False)
        def aggregate_shard(round_id: str, shard: int) -> dict[str, Any]:
            return _shard_step(federation_file, "aggregate_shard", round_id, shard)

        @task(show_return_value_in_logs=False, multiple_outputs=False)
        def assemble_candidate(round_id: str) -> dict[str, Any]:
            summary = _shard_step(federation_file, "assemble_candidate", round_id)
            return {"accepted": [a["client_id"] for a in summary["accepted"]], "candidate": summary["candidate_sha256"]}

        @task
        def request_evaluation(round_id: str) -> list[str]:
            return _step(federation_file, "request_evaluation", round_id)

        @task(show_return_value_in_logs=False, multiple_outputs=False)
        def validate(round_id: str) -> dict[str, Any]:
            result = _step(federation_file, "validate", round_id)
            return {"passed": result["passed"], "decided_by": result["decided_by"], "candidate": result["candidate"],
                    "champion": result["champion"]}

        @task.branch
        def promote_or_rollback(round_id: str) -> str:
            return _step(federation_file, "decide", round_id)

        # Retried like the others.
        @task(trigger_rule=TriggerRule.ALL_DONE, show_return_value_in_logs=False, multiple_outputs=False)
        def summary(**context) -> dict[str, Any]:
            from fl_airflow.metrics import emit_round_metrics
            from fl_airflow.notifiers import send_round_alerts
            from fl_airflow.run_notes import set_run_note
            from fl_airflow.steps import coordinator_for, run_step

            from fl_tasks.coordinator import report as round_report
            from fl_tasks.coordinator.alerts import Alert
            from fl_tasks.coordinator.metrics import RoundMetrics

            round_id = context["ti"].xcom_pull(task_ids="prepare_round")
            if not round_id:
                raise AirflowFailException("the round was never prepared; see the prepare_round log")
            coordinator = coordinator_for(federation_file)
            report = run_step(coordinator, "summarize", round_id)
            run = context["dag_run"]
            set_run_note(run.dag_id, run.run_id, round_report.run_note(report))
            send_round_alerts([Alert.from_dict(a) for a in report["alerts"]],
                              coordinator.spec.alerts, context)
            emit_round_metrics(RoundMetrics.from_dict(report["metrics"]))
            if report["decision"] in ("no_model", "refused"):
                # The run must show red: no model came out of this round.
                raise AirflowFailException(f"round {round_id} ended without a new model: {report['reason']}")
            return report

        # Retried like every step: its start goes through the execution API, which can be slow or
        # away (an api-server restarting); without a retry that fails the whole round, and a
        # scheduled round is not tried again before the next interval.
        previous = PreviousRoundSensor(task_id="wait_for_previous_round")
        round_id = prepare_round()
        previous >> round_id
        wait = QuorumSensor(task_id="wait_for_quorum", federation_file=federation_file, round_id=round_id)
        register, promote, rollback = (RoundStepOperator(task_id=step, step=step, federation_file=federation_file,
                                                         round_id=round_id) for step in RoundStepOperator.STEPS)
        evaluation = []
        if spec.evaluation.federated is not None:
            evaluation = [request_evaluation(round_id), QuorumSensor(
                task_id="wait_for_evaluations", federation_file=federation_file, round_id=round_id,
                answers="evaluation")]
        sharded = []
        if spec.shards > 1:
            # Mapped over the shards known when the file is parsed. The statistics tasks always run:
            # a round's trigger form may pick a strategy that needs them; for one that does not,
            # each returns at once without reading anything.
            shards = list(range(spec.shards))
            sharded = [shard_statistics.partial(round_id=round_id).expand(shard=shards),
                       aggregate_shard.partial(round_id=round_id).expand(shard=shards), assemble_candidate(round_id)]
        chain(dispatch(round_id), wait, aggregate(round_id), *sharded, *evaluation, validate(round_id), register,
              promote_or_rollback(round_id), [promote, rollback], summary())

    return fl_round()


def _gates_text(spec: FederationSpec) -> str:
    parts = []
    fed = spec.evaluation.federated
    if fed is not None:
        parts.append(f"on the silos' own data: the {fed.statistic} over at least {fed.min_silos} silos"
                     + (f", no silo losing more than {fed.max_silo_regression:g}" if fed.max_silo_regression is not None
                        else ""))
    if spec.evaluation.coordinator_data:
        parts.append(f"on the coordinator's rows `{spec.evaluation.coordinator_data}`")
    return "; ".join(parts)


def build_evaluation_dag(spec: FederationSpec):
    """`fl_evaluate__<F>`: an evaluation-only run, asked of every silo."""
    federation_file = str(Path(spec.source).resolve())
    fed = spec.evaluation.federated

    @dag(
        dag_id=spec.evaluation_dag_id,
        description=f"Evaluation-only run of {spec.federation}: the silos score the champion on their own data",
        schedule=None,
        start_date=_utc(spec.start_date),
        catchup=False,
        max_active_runs=1,
        params={"version": Param(None, type=["null", "string"], pattern=r"^[0-9]+$",
                                 description=f"A registered version of {spec.model_name} to score beside the "
                                             "champion; empty: the champion alone")},
        tags=["federated-learning", spec.federation, "evaluation"],
        doc_md=CHECK_DOC.format(federation=spec.federation, model_name=spec.model_name, min_silos=fed.min_silos,
                                timeout=fed.timeout_minutes, source=spec.source),
        default_args=retry_policy(),
    )
    def fl_evaluate():
        @task
        def prepare_evaluation(**context) -> str:
            from fl_airflow.steps import coordinator_for

            from fl_tasks.coordinator import RoundFailed, RunContext

            run = context["dag_run"]
            try:
                return coordinator_for(federation_file).prepare_evaluation(
                    RunContext(run_id=run.run_id, params=dict(context["params"])))
            except (RoundFailed, ValueError) as exc:
                raise AirflowFailException(str(exc)) from None

        @task
        def request_evaluation(evaluation_id: str) -> list[str]:
            return _step(federation_file, "request_evaluation", evaluation_id)

        @task(show_return_value_in_logs=False, multiple_outputs=False)
        def report_evaluation(**context) -> dict[str, Any]:
            from fl_airflow.run_notes import set_run_note

            from fl_tasks.coordinator import report

            evaluation_id = context["ti"].xcom_pull(task_ids="prepare_evaluation")
            result = _step(federation_file, "report_evaluation", evaluation_id)
            run = context["dag_run"]
            set_run_note(run.dag_id, run.run_id, report.evaluation_note(result))
            if not result["enough_silos"]:
                raise AirflowFailException(f"evaluation {evaluation_id}: only {len(result['per_silo'])} silos "
                                           f"evaluated; {result['required']} were asked for")
            return {"evaluation_id": evaluation_id, "figures": result["figures"]}

        evaluation_id = prepare_evaluation()
        chain(request_evaluation(evaluation_id),
              QuorumSensor(task_id="wait_for_evaluations", federation_file=federation_file, round_id=evaluation_id,
                           answers="evaluation"),
              report_evaluation())

    return fl_evaluate()


MONITOR_DOC = """
### Monitoring: {federation}

Reads the latest drift table (silo x column, from the drift scores the silos send with their
updates) and the champion's latest federated figures. When {conditions}, it starts a round of
`{round_dag}` through an event on the asset `{asset}`; the round records why it was started.
No new request within {cooldown:g} minutes of the last one. Schedule: {schedule}.
"""


def _monitor_conditions(spec: FederationSpec) -> str:
    m = spec.monitoring
    parts = [f"at least {m.max_drifted_share:.0%} of the silos drifted"] if m.max_drifted_share is not None else []
    parts += [f"the champion's {metric} crosses {bound:g}" for metric, bound in sorted(m.min_metrics.items())]
    return " or ".join(parts) or "(no condition is configured: it never starts a round)"


def build_monitor_dag(spec: FederationSpec):
    """`fl_monitor__<F>`: starts a round (an asset event) when drift or quality crosses a threshold."""
    federation_file = str(Path(spec.source).resolve())
    asset = retrain_asset(spec)

    @dag(
        dag_id=spec.monitor_dag_id,
        description=f"Monitoring of {spec.federation}: drift and the champion's quality; starts a round when due",
        schedule=spec.monitoring.schedule,
        start_date=_utc(spec.start_date),
        catchup=False,
        max_active_runs=1,
        tags=["federated-learning", spec.federation, "monitoring"],
        doc_md=MONITOR_DOC.format(federation=spec.federation, conditions=_monitor_conditions(spec),
                                  round_dag=spec.dag_id, asset=asset.uri, cooldown=spec.monitoring.cooldown_minutes,
                                  schedule=spec.monitoring.schedule or "none (trigger it, or set monitoring.schedule)"),
        default_args=retry_policy(),
    )
    def fl_monitor():
        @task.short_circuit
        def check_federation() -> dict[str, Any] | bool:
            from fl_airflow.steps import coordinator_for

            from fl_tasks.coordinator.monitoring import Monitor

            coordinator = coordinator_for(federation_file)
            decision = Monitor(coordinator.spec, coordinator.store).check(
                datetime.now(timezone.utc), {m.name: m.higher_is_better for m in coordinator.task.metrics})
            if decision.start:
                log.info("%s: a round is due: %s", spec.federation, decision.reason)
                return decision.as_dict()
            log.info("%s: no round needed%s", spec.federation,
                     f" yet: {decision.reason}; held back: {decision.held_back}" if decision.held_back else
                     f" (drift table of round {decision.drift_round or '-'}, champion {decision.champion or '-'})")
            return False

        @task(outlets=[asset])
        def request_round(decision: dict[str, Any], **context) -> str:
            from fl_airflow.steps import coordinator_for

            from fl_tasks.coordinator.monitoring import Monitor, RetrainDecision

            coordinator = coordinator_for(federation_file)
            run_id = context["dag_run"].run_id
            wanted = RetrainDecision(**{k: v for k, v in decision.items() if k != "reason"})
            Monitor(coordinator.spec, coordinator.store).record_request(wanted, datetime.now(timezone.utc), run_id)
            context["outlet_events"][asset].extra = {"reason": wanted.reason, "monitor_run_id": run_id}
            return wanted.reason

        request_round(check_federation())

    return fl_monitor()


def build_error_dag(error: ConfigError):
    """A federation file that does not load: a paused DAG that shows the error in the UI (its
    description, docs and its one task's failure), in place of the federation's DAG."""
    dag_id = error_dag_id(error.source)

    @dag(dag_id=dag_id, description=f"BROKEN federation file: {error}"[:1000], schedule=None,
         start_date=datetime(2024, 1, 1, tzinfo=timezone.utc), catchup=False, is_paused_upon_creation=True,
         tags=["federated-learning", "config-error"],
         doc_md=f"### Federation file `{error.source}` does not load\n\n- **Field:** `{error.field_path}`\n"
                f"- **Problem:** {error.problem}\n- **Fix:** {error.fix}\n\nThe other federations are not "
                "affected. Fix the file; this DAG disappears and the federation's own DAG appears at the next "
                "parse.")
    def config_error():
        @task(retries=0)
        def fix_federation_file() -> None:
            raise AirflowFailException(str(error))

        fix_federation_file()

    return config_error()


_scan = scan_federations(federations_dir())
for _spec in _scan.specs:
    globals()[_spec.dag_id] = build_round_dag(_spec)
    globals()[_spec.monitor_dag_id] = build_monitor_dag(_spec)
    if _spec.evaluation.federated is not None:
        globals()[_spec.evaluation_dag_id] = build_evaluation_dag(_spec)
for _error in _scan.errors:
    _dag = build_error_dag(_error)
    globals()[_dag.dag_id] = _dag
