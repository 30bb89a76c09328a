"""QuorumSensor: waits for the round's quorum without holding a worker slot."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from fl_airflow.triggers import QuorumTrigger


class QuorumSensor(BaseSensorOperator):
    """Succeeds when the round may close (every client answered, the grace period after the
    quorum ended, or the deadline passed with the quorum in). Fails at once when the
    silos' declines leave too few to reach the quorum.

    Checks once on the worker; if the round is still open it defers to `QuorumTrigger` and
    frees the slot. A round that misses quorum fails this task with the reason, and nothing
    downstream builds a model.
    """

    template_fields = ("round_id",)

    def __init__(self, *, federation_file: str, round_id: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.federation_file = federation_file
        self.round_id = round_id

    def _coordinator(self):
        from fl_airflow.steps import coordinator_for

        return coordinator_for(self.federation_file)

    def _finish(self, coordinator, decision) -> dict[str, Any]:
        record = coordinator.close_round(self.round_id, decision)
        if record["state"] != "met":
            raise AirflowFailException(record["reason"])
        self.log.info("round %s closed: %s", self.round_id, record["reason"])
        for client, reason in sorted(record["declined"].items()):
            self.log.info("round %s: %s declined: %s", self.round_id, client, reason)
        return {"round_id": self.round_id, "committed": record["committed"], "declined": record["declined"]}

    def execute(self, context) -> dict[str, Any]:
        from fl_tasks import protocol
        from fl_tasks.coordinator import grace_period, quorum, required_clients

        coordinator = self._coordinator()
        decision = coordinator.check_quorum(self.round_id)
        if decision.state != quorum.WAITING:
            return self._finish(coordinator, decision)
        plan = coordinator.load_plan(self.round_id)
        spec = coordinator.spec
        clients = {c.id: {"bucket": c.bucket_name,
                          "update_key": protocol.update_manifest_key(c.prefix, spec.federation, self.round_id),
                          "decline_key": protocol.decline_key(c.prefix, spec.federation, self.round_id),
                          "aws_conn_id": c.aws_conn_id or spec.storage_aws_conn_id,
                          "endpoint_url": c.endpoint_url, "federation_endpoint_url": spec.endpoint_url,
                          "signing_conn_id": spec.security.conn_id(spec.federation, c.id)}
                   for c in spec.clients if c.id in plan.clients}
        left = datetime.fromisoformat(plan.deadline) - datetime.now(timezone.utc)
        self.log.info("round %s: %s; deferring until quorum or %s", self.round_id, decision.reason, plan.deadline)
        self.defer(
            trigger=QuorumTrigger(round_id=self.round_id, federation=spec.federation, clients=clients,
                                  deadline=plan.deadline, required=required_clients(plan),
                                  grace_seconds=None if (grace := grace_period(plan)) is None else grace.total_seconds(),
                                  poll_interval=spec.quorum.poll_interval_seconds,
                                  require_signatures=plan.require_signatures),
            method_name="execute_complete",
            timeout=max(left, timedelta(0)) + timedelta(minutes=10),
        )

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        from fl_tasks.coordinator.quorum import QuorumDecision
        from fl_tasks.protocol.storage import StorageUnavailable

        if event["state"] == "error":
            # The trigger could not read S3: nothing is recorded, and the Airflow retry of this
            # task checks the quorum again on the worker (and defers again if it is still open).
            raise StorageUnavailable(event["reason"])

        decision = QuorumDecision(event["state"], tuple(event["committed"]), event["reason"])
        # The close reads every answer again and keeps what it read; the trigger only said when.
        return self._finish(self._coordinator(), decision)


class PreviousRoundSensor(BaseSensorOperator):
    """Holds a round until the federation's previous round (by logical date) has finished.

    A round's base is the champion the previous round leaves behind, so rounds must run one
    at a time and in order. The DAG's `max_active_runs=1` does that for scheduled and manual
    runs, but `airflow backfill create` applies its own limit (10 by default); this sensor
    keeps backfilled rounds in order whatever that limit is. It waits in reschedule mode,
    so no worker slot is held. Runs without a logical date have no predecessor.
    """

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("mode", "reschedule")
        # FL_PREVIOUS_ROUND_POKE_SECONDS: how soon a round starts after its predecessor ends.
        kwargs.setdefault("poke_interval", float(os.environ.get("FL_PREVIOUS_ROUND_POKE_SECONDS", "10")))
        kwargs.setdefault("timeout", 24 * 3600)
        super().__init__(**kwargs)

    def poke(self, context) -> bool:
        previous = context["ti"].get_previous_dagrun()
        if previous is None:
            return True
        state = str(getattr(previous.state, "value", previous.state))
        if state in ("success", "failed"):
            return True
        self.log.info("waiting for the previous round (run %s, %s) to finish; mark it failed to skip it",
                      previous.run_id, state)
        return False

