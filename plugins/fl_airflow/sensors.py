"""QuorumSensor: waits for the silos' updates or evaluations without holding a worker slot."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from airflow.sdk import BaseSensorOperator
from airflow.sdk.exceptions import AirflowFailException

from fl_airflow.triggers import QuorumTrigger


class QuorumSensor(BaseSensorOperator):
    """Waits for the silos' answers without holding a worker slot: their updates
    (`answers="update"`, wait_for_quorum) or their evaluations of the round's candidate
    (`answers="evaluation"`, wait_for_evaluations).

    Succeeds when the wait may close (every silo asked answered, the grace period after the
    quorum ended, or the deadline passed with the quorum in). Checks once on the worker; if
    the wait is still open it defers to `QuorumTrigger` and frees the slot. A round that
    misses its update quorum (or whose declines leave too few) fails this task with the
    reason, and nothing downstream builds a model. A missed evaluation quorum is recorded
    and the task succeeds: validate fails the round's gates on it, and the candidate is
    rolled back with the reason.
    """

    template_fields = ("round_id",)

    def __init__(self, *, federation_file: str, round_id: str, answers: str = "update", **kwargs: Any):
        super().__init__(**kwargs)
        if answers not in ("update", "evaluation"):
            raise ValueError(f"QuorumSensor: answers {answers!r} must be 'update' or 'evaluation'")
        self.federation_file = federation_file
        self.round_id = round_id
        self.answers = answers

    def _coordinator(self):
        from fl_airflow.steps import coordinator_for

        return coordinator_for(self.federation_file)

    def _finish(self, coordinator, decision) -> dict[str, Any]:
        record = coordinator.close(self.round_id, self.answers, decision)
        if record["state"] != "met" and self.answers == "update":
            raise AirflowFailException(record["reason"])
        what = "evaluation" if self.answers == "evaluation" else "round"
        self.log.info("round %s: %s closed: %s", self.round_id, what, record["reason"])
        for client, reason in sorted(record["declined"].items()):
            self.log.info("round %s: %s declined: %s", self.round_id, client, reason)
        return {"round_id": self.round_id, "state": record["state"], "committed": record["committed"],
                "declined": record["declined"]}

    def execute(self, context) -> dict[str, Any]:
        from fl_tasks import protocol

        coordinator = self._coordinator()
        decision = coordinator.check(self.round_id, self.answers)
        if decision.state != "waiting":
            return self._finish(coordinator, decision)
        awaited = coordinator.awaited(self.round_id, self.answers)
        kind = protocol.ANSWER_KINDS[self.answers]
        spec = coordinator.spec
        clients = {c.id: {"bucket": c.bucket_name,
                          "answer_key": kind.answer_key(c.prefix, spec.federation, self.round_id),
                          "decline_key": kind.decline_key(c.prefix, spec.federation, self.round_id),
                          "aws_conn_id": c.aws_conn_id or spec.storage_aws_conn_id,
                          "endpoint_url": c.endpoint_url, "federation_endpoint_url": spec.endpoint_url,
                          "signing_conn_id": spec.security.conn_id(spec.federation, c.id)}
                   for c in spec.clients if c.id in awaited.clients}
        left = datetime.fromisoformat(awaited.deadline) - datetime.now(timezone.utc)
        self.log.info("round %s: %s; deferring until quorum or %s", self.round_id, decision.reason, awaited.deadline)
        self.defer(
            trigger=QuorumTrigger(round_id=self.round_id, federation=spec.federation, clients=clients,
                                  deadline=awaited.deadline, required=awaited.required,
                                  grace_seconds=awaited.grace_seconds,
                                  poll_interval=spec.quorum.poll_interval_seconds,
                                  require_signatures=awaited.require_signatures, answers=self.answers,
                                  binding=awaited.binding),
            method_name="execute_complete",
            timeout=max(left, timedelta(0)) + timedelta(minutes=10),
        )

    def execute_complete(self, context, event: dict[str, Any]) -> dict[str, Any]:
        from fl_tasks.coordinator.quorum import QuorumDecision
        from fl_tasks.protocol.storage import StorageUnavailable

        if event["state"] == "error":
            # The trigger could not read S3: nothing is recorded, and the Airflow retry of this
            # task checks again on the worker (and defers again if the wait is still open).
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

