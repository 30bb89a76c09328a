"""MLflow: one run per round, one registered version per candidate, alias `champion`.

Stages are deprecated in MLflow 3; lifecycle lives in the `champion` alias and version tags:
`fl.decision` is `promoted` or `rejected` (with `fl.rejected_reason`). Every call is safe to
repeat for the same round: versions are found again by their `fl.round_id` tag.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fl_tasks.config import FederationSpec

CHAMPION = "champion"
TAG = "fl."


@dataclass(frozen=True)
class ChampionRef:
    version: str
    weights_uri: str  # s3://coordinator-bucket/<F>/rounds/<R>/candidate/model.safetensors
    weights_sha256: str
    round_id: str


def _client(spec: FederationSpec):
    import mlflow
    from mlflow import MlflowClient

    if spec.mlflow.tracking_uri:
        mlflow.set_tracking_uri(spec.mlflow.tracking_uri)
    return MlflowClient()


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description="Global model of a federation, one version per round")
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine if it exists now


def get_champion(spec: FederationSpec) -> ChampionRef | None:
    from mlflow.exceptions import MlflowException

    client = _client(spec)
    try:
        version = client.get_model_version_by_alias(spec.model_name, CHAMPION)
    except MlflowException:
        return None
    tags = version.tags
    return ChampionRef(str(version.version), tags[f"{TAG}weights_uri"], tags[f"{TAG}weights_sha256"], tags[f"{TAG}round_id"])


def version_weights_sha256(spec: FederationSpec, version: str) -> str | None:
    """The sha256 tag of a registered version's weights, or None when there is no such version."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(spec).get_model_version(spec.model_name, version)
    except MlflowException:
        return None
    return found.tags.get(f"{TAG}weights_sha256")


def find_round_version(spec: FederationSpec, round_id: str):
    """The model version already registered for this round, if any (re-runs reuse it)."""
    client = _client(spec)
    found = client.search_model_versions(f"name = '{spec.model_name}' and tag.`{TAG}round_id` = '{round_id}'")
    return found[0] if found else None


def _experiment_id(client, spec: FederationSpec) -> str:
    experiment = client.get_experiment_by_name(spec.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(spec.experiment_name, tags={f"{TAG}federation": spec.federation})


def register_candidate(spec: FederationSpec, model, *, round_id: str, airflow_run_id: str, base_version: str,
                       weights_uri: str, weights_sha256: str, params: dict[str, Any], metrics: dict[str, float],
                       report: dict[str, Any]) -> str:
    """Log the round's MLflow run and register the candidate; returns the version number."""
    import mlflow
    import mlflow.pytorch

    existing = find_round_version(spec, round_id)
    if existing is not None:
        return str(existing.version)
    client = _client(spec)
    _ensure_registered_model(client, spec.model_name)
    tags = {f"{TAG}federation": spec.federation, f"{TAG}round_id": round_id, f"{TAG}airflow_run_id": airflow_run_id,
            f"{TAG}base_version": base_version}
    experiment_id = _experiment_id(client, spec)
    # A retried task resumes the run (and the logged model) an interrupted try left behind.
    earlier = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}round_id` = '{round_id}'", max_results=1)
    with mlflow.start_run(run_id=earlier[0].info.run_id) if earlier else mlflow.start_run(
            experiment_id=experiment_id, run_name=f"round-{round_id}", tags=tags) as run:
        logged = {k: str(v)[:500] for k, v in params.items()}
        mlflow.log_params({k: v for k, v in logged.items() if k not in run.data.params})
        mlflow.log_metrics(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "round_report.json"
            path.write_text(json.dumps(report, indent=2, sort_keys=True))
            mlflow.log_artifact(str(path))
        models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                             filter_string=f"source_run_id = '{run.info.run_id}'")
        if models:
            model_id, model_uri = models[0].model_id, f"models:/{models[0].model_id}"
        else:
            info = mlflow.pytorch.log_model(
                model, name="model", input_example=np.zeros((2, spec.model.input_dim), dtype=np.float32),
                pip_requirements=["torch==2.13.0", "numpy==2.4.6"],
            )
            model_id, model_uri = info.model_id, info.model_uri
    version = client.create_model_version(
        spec.model_name, source=model_uri, run_id=run.info.run_id, model_id=model_id,
        tags={**tags, f"{TAG}weights_uri": weights_uri, f"{TAG}weights_sha256": weights_sha256,
              f"{TAG}decision": "pending"},
        description=f"Federated round {round_id} of {spec.federation}",
    )
    return str(version.version)


def log_audit(spec: FederationSpec, round_id: str, jsonl: bytes) -> str:
    """Attach the round's audit log to its MLflow run (created, marked FAILED, when the round
    never reached register); rewriting it on a retry replaces the same artifact. Returns the run id."""
    client = _client(spec)
    experiment_id = _experiment_id(client, spec)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}round_id` = '{round_id}'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name=f"round-{round_id}",
                                   tags={f"{TAG}federation": spec.federation, f"{TAG}round_id": round_id}).info.run_id
        client.set_terminated(run_id, "FAILED")
    client.log_text(run_id, jsonl.decode(), "audit/audit.jsonl")
    return run_id


def promote(spec: FederationSpec, version: str) -> None:
    """Move `champion` to this version (a no-op when it is already there)."""
    client = _client(spec)
    client.set_model_version_tag(spec.model_name, version, f"{TAG}decision", "promoted")
    current = get_champion(spec)
    if current is None or current.version != str(version):
        client.set_registered_model_alias(spec.model_name, CHAMPION, version)


def reject(spec: FederationSpec, version: str, reasons: list[str]) -> None:
    """Keep the champion where it is; mark the candidate rejected with the failed gates."""
    client = _client(spec)
    client.set_model_version_tag(spec.model_name, version, f"{TAG}decision", "rejected")
    client.set_model_version_tag(spec.model_name, version, f"{TAG}rejected_reason", "; ".join(reasons)[:4000])
