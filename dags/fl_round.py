"""One DAG per federation file in `federations/`: `fl_round__<federation>`.

Each DAG run is one federated round. This file only wires tasks to the plain functions of
`fl_tasks.coordinator`; it imports no torch, mlflow, evidently or pandas, so it parses fast.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from airflow.sdk import CronDataIntervalTimetable, Param, TriggerRule, chain, dag, task
from airflow.sdk.exceptions import AirflowFailException
from fl_airflow.sensors import PreviousRoundSensor, QuorumSensor
from fl_airflow.steps import RoundStepOperator

from fl_tasks.aggregation.names import STRATEGY_NAMES
from fl_tasks.config import FederationSpec, load_federations
from fl_tasks.protocol import ROUND_ID_PATTERN

FEDERATIONS_DIR = Path(os.environ.get("FL_FEDERATIONS_DIR", Path(__file__).resolve().parent.parent / "federations"))


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
**validate** against the quality gates → **register** the candidate in MLflow as
`{model_name}` → **promote** (alias `champion`) or **rollback** (tag `rejected`) → **summary**.

Clients: {clients}. Quorum: {quorum}. Federation file: `{source}`.
"""


def round_params(spec: FederationSpec) -> dict[str, Param]:
    """The trigger form: typed, bounded, defaulting to the federation file."""
    q, t, g = spec.quorum, spec.training, spec.gates
    return {
        "aggregator": Param(spec.aggregation, type="string", enum=list(STRATEGY_NAMES),
                            description="Aggregation strategy for this round"),
        "aggregator_params": Param(None, type=["null", "object"],
                                   description="Strategy parameters, e.g. {\"f\": 1} for krum; "
                                               "empty: the federation file's (for its own strategy)"),
        "min_clients": Param(q.min_clients, type="integer", minimum=1, maximum=len(spec.clients),
                             description="Updates needed at the deadline for the round to proceed"),
        "min_fraction": Param(q.min_fraction, type=["null", "number"], exclusiveMinimum=0, maximum=1,
                              description="Quorum as a share of the clients (the larger of this and "
                                          "min_clients counts); empty: min_clients alone"),
        "round_timeout_minutes": Param(q.round_timeout_minutes, type="number", exclusiveMinimum=0, maximum=10080,
                                       description="Minutes from dispatch to the deadline"),
        "grace_period_minutes": Param(q.grace_period_minutes, type=["null", "number"], minimum=0, maximum=10080,
                                      description="Once the quorum is in, minutes to wait for stragglers before "
                                                  "closing; empty: wait until the deadline"),
        "local_epochs": Param(t.local_epochs, type="integer", minimum=1, maximum=100,
                              description="Epochs each client trains locally"),
        "learning_rate": Param(t.learning_rate, type="number", exclusiveMinimum=0, exclusiveMaximum=1,
                               description="Client learning rate"),
        "min_roc_auc": Param(g.min_roc_auc, type="number", minimum=0, maximum=1, description="Gate: minimum ROC-AUC"),
        "min_pr_auc": Param(g.min_pr_auc, type="number", minimum=0, maximum=1, description="Gate: minimum PR-AUC"),
        "max_regression": Param(g.max_regression, type="number", minimum=0, maximum=1,
                                description="Gate: largest ROC-AUC drop allowed against the champion"),
        "round_id": Param(None, type=["null", "string"], pattern=ROUND_ID_PATTERN.pattern,
                          description="Optional explicit round id (manual runs); default: next free number"),
    }


def _step(federation_file: str, step: str, round_id: str) -> Any:
    from fl_airflow.steps import coordinator_for, run_step

    return run_step(coordinator_for(federation_file), step, round_id)


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
        # Airflow 3's cron default is a point in time; rounds train on data *intervals*.
        schedule=CronDataIntervalTimetable(spec.schedule, timezone="UTC") if spec.schedule else None,
        start_date=_utc(spec.start_date),
        end_date=_utc(spec.end_date) if spec.end_date else None,
        catchup=False,
        max_active_runs=1,
        params=round_params(spec),
        tags=["federated-learning", spec.federation],
        doc_md=DOC.format(federation=spec.federation, description=spec.description, aggregator=spec.aggregation,
                          model_name=spec.model_name, clients=", ".join(c.id for c in spec.clients),
                          quorum=_quorum_text(spec), source=spec.source),
        default_args=retry_policy(),
    )
    def fl_round():
        @task
        def prepare_round(**context) -> str:
            from fl_airflow.run_notes import set_run_note
            from fl_airflow.steps import coordinator_for

            from fl_tasks import round_log
            from fl_tasks.coordinator import RoundFailed, RunContext

            run = context["dag_run"]
            run_type = str(getattr(run.run_type, "value", run.run_type))
            start, end = context.get("data_interval_start"), context.get("data_interval_end")
            ctx = RunContext(
                run_id=run.run_id, run_type=run_type,
                data_interval_start=start.isoformat() if start else None,
                data_interval_end=end.isoformat() if end else None,
                params=dict(context["params"]),
                # For the audit log: the user Airflow names, else the scheduler for scheduled runs.
                triggered_by=getattr(run, "triggering_user_name", None) or (
                    "scheduler" if run_type == "scheduled" else ""),
            )
            coordinator = coordinator_for(federation_file)
            try:
                round_id = coordinator.prepare(ctx)
            except (RoundFailed, ValueError) as exc:
                raise AirflowFailException(str(exc)) from None
            set_run_note(run.dag_id, run.run_id,
                         round_log.running_note(round_id, coordinator.load_plan(round_id).base_version))
            return round_id

        @task
        def dispatch(round_id: str) -> list[str]:
            return _step(federation_file, "dispatch", round_id)

        # The steps log their results readably; Airflow's one-line dump of the return value would repeat them.
        @task(show_return_value_in_logs=False)
        def aggregate(round_id: str) -> dict[str, Any]:
            summary = _step(federation_file, "aggregate", round_id)
            return {"accepted": [a["client_id"] for a in summary["accepted"]], "rejected": summary["rejected"]}

        @task(show_return_value_in_logs=False)
        def validate(round_id: str) -> dict[str, Any]:
            result = _step(federation_file, "validate", round_id)
            return {"passed": result["passed"], "candidate": result["candidate"], "champion": result["champion"]}

        @task.branch
        def promote_or_rollback(round_id: str) -> str:
            return _step(federation_file, "decide", round_id)

        @task(trigger_rule=TriggerRule.ALL_DONE, show_return_value_in_logs=False)  # retried like the others
        def summary(**context) -> dict[str, Any]:
            from fl_airflow.run_notes import set_run_note

            from fl_tasks import round_log

            round_id = context["ti"].xcom_pull(task_ids="prepare_round")
            if not round_id:
                raise AirflowFailException("the round was never prepared; see the prepare_round log")
            report = _step(federation_file, "summarize", round_id)
            run = context["dag_run"]
            set_run_note(run.dag_id, run.run_id, round_log.run_note(report))
            if report["decision"] == "no_model":
                # The run must show red: no model came out of this round.
                raise AirflowFailException(f"round {round_id} ended without a new model: {report['reason']}")
            return report

        previous = PreviousRoundSensor(task_id="wait_for_previous_round", retries=0)
        round_id = prepare_round()
        previous >> round_id
        wait = QuorumSensor(task_id="wait_for_quorum", federation_file=federation_file, round_id=round_id)
        register, promote, rollback = (RoundStepOperator(task_id=step, step=step, federation_file=federation_file,
                                                         round_id=round_id) for step in RoundStepOperator.STEPS)
        chain(dispatch(round_id), wait, aggregate(round_id), validate(round_id), register,
              promote_or_rollback(round_id), [promote, rollback], summary())

    return fl_round()


for _spec in load_federations(FEDERATIONS_DIR):
    globals()[_spec.dag_id] = build_round_dag(_spec)
