"""A round's plan: what the run asked for, resolved against the federation file once, and
stored so that every later step (and a replay) reads the same settings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from fl_tasks.config import FederationSpec
from fl_tasks.coordinator import quorum
from fl_tasks.settings import resolve


class RoundFailed(RuntimeError):
    """The round cannot produce a model; the reason is recorded in failure.json."""


@dataclass(frozen=True)
class RunContext:
    """What the orchestrator knows about the run that carries this round."""

    run_id: str
    run_type: str = "manual"  # manual | scheduled | backfill | asset_triggered
    data_interval_start: str | None = None
    data_interval_end: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    triggered_by: str = ""


@dataclass(frozen=True)
class RoundPlan:
    federation: str
    round_id: str
    run_id: str
    run_type: str
    triggered_by: str
    base_version: str  # MLflow version of the champion, or "seed"
    base_origin: str  # champion, seed, or the warm-start model it came from
    base_sha256: str
    base_bytes: int
    deadline: str
    clients: list[str]
    settings: dict[str, Any]  # every per-round setting (fl_tasks.settings), resolved
    aggregation: dict[str, Any]  # strategy, params, clip_norm
    screening: dict[str, Any]
    base_round_id: str | None  # the round that produced the base (its server-optimiser state continues)
    training: dict[str, Any]
    data_window: dict[str, str | None]
    created_at: str
    staleness: dict[str, Any]  # the federation's staleness policy
    task: dict[str, Any]  # entrypoint, version, params, params_sha256
    contract: dict[str, Any]
    require_signatures: bool
    drift: dict[str, Any] = field(default_factory=dict)  # DriftSettings the silos compare with; empty: off
    # Differential privacy (empty: off): the federation's privacy settings, the population and
    # the silos this round sampled (`clients` holds the same), the mean's fixed denominator,
    # and the noise each silo adds when the silos add it.
    privacy: dict[str, Any] = field(default_factory=dict)
    # Personal models at the silos (fl_tasks.protocol.personalization.PersonalizationSettings
    # as a dict; empty: off): what the global manifest and the evaluation request carry, and
    # under fedbn the tensors the silos keep (`local_tensors`), never sent nor averaged.
    personalization: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: bytes) -> "RoundPlan":
        return cls(**json.loads(data))


def round_settings(spec: FederationSpec, params: dict[str, Any], task) -> dict[str, Any]:
    """The run's settings: its params where given, else the federation file's; raises
    ValueError naming the param when a value does not fit its bound, the strategy or the task."""
    settings = resolve(spec.round_defaults(), params, len(spec.clients))
    if params.get("aggregator_params") is None:
        # The file's strategy parameters belong to the file's strategy only.
        settings["aggregator_params"] = dict(spec.aggregation_params) if settings["aggregator"] == spec.aggregation \
            else {}
    from fl_tasks.aggregation import build
    from fl_tasks.config import PRIVATE_STRATEGIES

    if spec.privacy is not None and settings["aggregator"] not in PRIVATE_STRATEGIES:
        raise ValueError(f"param 'aggregator' is {settings['aggregator']!r}, which does not average the updates; this "
                         f"federation runs with differential privacy, which needs one of {', '.join(PRIVATE_STRATEGIES)}")
    strategy = build(settings["aggregator"], **settings["aggregator_params"])  # bad names or values fail here
    if strategy.min_updates > len(spec.clients):
        raise ValueError(f"{settings['aggregator']} with {settings['aggregator_params']} needs at least "
                         f"{strategy.min_updates} client updates; the federation has {len(spec.clients)} clients")
    known = [m.name for m in task.metrics]
    for metric, threshold in settings["gate_thresholds"].items():
        if metric not in known:
            raise ValueError(f"param 'gate_thresholds' names metric {metric!r}, which the task "
                             f"{spec.task.entrypoint} does not report; its metrics: {', '.join(known)}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ValueError(f"param 'gate_thresholds' gives {metric!r} the threshold {threshold!r}; use a number")
    return settings


def required_clients(plan: RoundPlan) -> int:
    """The round's quorum from its settings (min_clients and min_fraction)."""
    return quorum.required_clients(len(plan.clients), int(plan.settings["min_clients"]),
                                   plan.settings.get("min_fraction"))


def sample_silos(spec: FederationSpec) -> tuple[list[str], dict[str, Any]]:
    """The round's silos, and the plan's privacy record: every silo and {} without privacy."""
    clients = [c.id for c in spec.clients]
    p = spec.privacy
    if p is None:
        return clients, {}
    import math

    from fl_tasks.coordinator.privacy import draw_silos

    sampled = draw_silos(p, clients)
    silo_noise = p.noise_multiplier * p.clip_norm / math.sqrt(len(sampled)) if p.noise == "silos" and sampled else 0.0
    return sampled, {**asdict(p), "population": len(clients), "sampled": sampled,
                     "denominator": p.expected_silos(len(clients)), "silo_noise_stddev": silo_noise}


def personalization_settings(spec: FederationSpec, learning_rate: float, task) -> dict[str, Any]:
    """The round's personalization block (PersonalizationSettings.as_dict()), {} when the
    federation has none: the learning rate defaults to the round's, and under fedbn
    `local_tensors` names the task model's batch-norm tensors. Raises ConfigError naming the
    field when fedbn meets a model without batch norm, or a value does not fit the protocol."""
    p = spec.personalization
    if p is None:
        return {}
    from fl_tasks.config import ConfigError
    from fl_tasks.protocol.personalization import PersonalizationSchemaError, PersonalizationSettings

    local: tuple[str, ...] = ()
    if p.strategy == "fedbn":
        local = tuple(task.normalization_tensors(task.build_model()))
        if not local:
            raise ConfigError(spec.source, "personalization.strategy",
                              "fedbn needs batch-norm tensors, the task's model has none",
                              "set task.params.batch_norm: true or choose finetune or ditto")
    rate = float(p.learning_rate if p.learning_rate is not None else learning_rate)
    settings = PersonalizationSettings(strategy=p.strategy, layers=p.layers, epochs=int(p.epochs), learning_rate=rate,
                                       batch_size=int(p.batch_size),
                                       ditto_lambda=float(p.ditto_lambda), local_only=bool(p.local_only),
                                       share_weights=bool(p.share_weights), local_tensors=local).as_dict()
    try:
        PersonalizationSettings.from_dict(settings)
    except PersonalizationSchemaError as exc:  # e.g. the round's learning rate, as personalization's default
        raise ConfigError(spec.source, "personalization.learning_rate" if "learning_rate" in str(exc)
                          else "personalization", str(exc), "set personalization.learning_rate in (0, 1)") from None
    return settings


def grace_period(plan: RoundPlan) -> timedelta | None:
    minutes = plan.settings.get("grace_period_minutes")
    return None if minutes is None else timedelta(minutes=float(minutes))
