"""The coordinator's steps as Airflow tasks: one coordinator per task, signing keys from
Airflow connections, and a round that cannot go on failing at once instead of retrying."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from fl_airflow.links import ROUND_LINKS


def coordinator_for(federation_file: str):
    """The coordinator of a task: the federation file as it is now, signing keys and S3
    credentials from Airflow connections."""
    from fl_airflow.connections import s3_access
    from fl_airflow.keys import ConnectionKeys

    from fl_tasks.config import ConfigError, load_federation
    from fl_tasks.coordinator import Coordinator

    try:
        spec = load_federation(federation_file)
    except ConfigError as exc:  # the file changed since the DAG was parsed: say so, do not retry
        raise AirflowFailException(str(exc)) from None
    try:
        return Coordinator(spec, keys=ConnectionKeys(spec), access=s3_access)
    except ValueError as exc:  # the coordinator's own S3 connection is missing: a retry will not create it
        raise AirflowFailException(f"{spec.source}: field 'storage.aws_conn_id': {exc}") from None


def run_step(coordinator, step: str, round_id: str) -> Any:
    """One coordinator step; RoundFailed (nothing to gain from a retry) fails the task for good."""
    from fl_tasks.config import ConfigError
    from fl_tasks.coordinator import RoundFailed

    try:
        return getattr(coordinator, step)(round_id)
    except (RoundFailed, ConfigError) as exc:
        raise AirflowFailException(str(exc)) from None


class RoundStepOperator(BaseOperator):
    """register, promote or rollback, with links to the MLflow model version, the round's
    MLflow run and its audit log. Returns where the round lives in MLflow (register) or the
    decision (promote, rollback), both carrying those references."""

    template_fields = ("round_id",)
    operator_extra_links = ROUND_LINKS
    STEPS = ("register", "promote", "rollback")

    def __init__(self, *, federation_file: str, step: str, round_id: str, **kwargs: Any):
        super().__init__(**kwargs)
        if step not in self.STEPS:
            raise ValueError(f"RoundStepOperator: step {step!r} is not one of {', '.join(self.STEPS)}")
        self.federation_file = federation_file
        self.step = step
        self.round_id = round_id

    def execute(self, context) -> dict[str, Any]:
        coordinator = coordinator_for(self.federation_file)
        result = run_step(coordinator, self.step, self.round_id)
        return coordinator.mlflow_refs(self.round_id) if self.step == "register" else result
