"""MLflow: one run per round, one registered version per candidate, alias `champion`.

Stages are deprecated in MLflow 3; lifecycle lives in the `champion` alias and version tags:
`fl.decision` is `promoted` or `rejected` (with `fl.rejected_reason`). Every call is safe to
repeat for the same round: versions are found again by their `fl.round_id` tag.

Faults: MLflow's own HTTP client retries every request with exponential backoff
(`HTTP_DEFAULTS` below, set unless the environment already sets them). It also retries
POSTs whose answer was lost, which can create a second model version for one round; the
round's versions are therefore deduplicated (the lowest number stays). A model version is
only created from a logged model MLflow finalised as READY (all artifacts uploaded), and a
registry that cannot be reached is an error, never "no champion yet".
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_tasks.config import FederationSpec

CHAMPION = "champion"
TAG = "fl."
log = logging.getLogger(__name__)
# MLflow would attach its own stderr handler to its loggers, and Airflow shows whatever a task
# writes to stderr as an ERROR line (e.g. "Waiting up to 300 seconds for model version to
# finish creation"). Without it, MLflow's records reach the task log at their own level.
os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

# MLflow's client retry settings (mlflow/environment_variables.py, read at every request).
# 5 retries with backoff factor 1 wait about 0+2+4+8+16 s (+ up to 1 s jitter each) before a
# call gives up, i.e. they ride out a blip of about half a minute; longer outages are left
# to the Airflow task retries (see dags/fl_round.py). The timeout bounds each request.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}
# What MLflow answers when the model or the alias does not exist (anything else is an outage).
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class RegisteredVersion:
    """A round's model version and the MLflow run that logged it."""

    version: str
    run_id: str
    experiment_id: str


@dataclass(frozen=True)
class ChampionRef:
    version: str
    weights_uri: str  # s3://coordinator-bucket/<F>/rounds/<R>/candidate/model.safetensors
    weights_sha256: str
    round_id: str


def configure_http_retries() -> dict[str, str]:
    """Our retry defaults for MLflow's HTTP client; values already in the environment win."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in HTTP_DEFAULTS}


def tracking_uri(spec: FederationSpec) -> str:
    """The federation's MLflow tracking URI: its own setting, else MLflow's default for this process."""
    import mlflow

    return spec.mlflow.tracking_uri or mlflow.get_tracking_uri()


def _client(spec: FederationSpec):
    import mlflow
    from mlflow import MlflowClient

    configure_http_retries()
    if spec.mlflow.tracking_uri:
        mlflow.set_tracking_uri(spec.mlflow.tracking_uri)
    return MlflowClient()


def _ensure_registered_model(client, name: str,
                             description: str = "Global model of a federation, one version per round") -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=description)
        except MlflowException:
            client.get_registered_model(name)  # created concurrently: fine if it exists now


def get_champion(spec: FederationSpec) -> ChampionRef | None:
    from mlflow.exceptions import MlflowException

    client = _client(spec)
    try:
        version = client.get_model_version_by_alias(spec.model_name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise  # MLflow unreachable: a round must not silently start from the seed instead
    tags = version.tags
    return ChampionRef(str(version.version), tags[f"{TAG}weights_uri"], tags[f"{TAG}weights_sha256"], tags[f"{TAG}round_id"])


def version_weights(spec: FederationSpec, version: str) -> tuple[str, str] | None:
    """(weights URI, sha256) of a registered version, or None when there is no such version."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(spec).get_model_version(spec.model_name, version)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise
    return found.tags[f"{TAG}weights_uri"], found.tags[f"{TAG}weights_sha256"]


def log_evaluation(spec: FederationSpec, evaluation_id: str, report: dict[str, Any]) -> str:
    """An evaluation-only run in MLflow: one run (found again on a retry) with each silo's
    metrics and the overall figures, the report as an artifact, and on each evaluated version
    a tag naming the evaluation and its result. Returns the run id."""
    client = _client(spec)
    experiment_id = _experiment_id(client, spec)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}evaluation_id` = '{evaluation_id}'",
                              max_results=1)
    run_id = runs[0].info.run_id if runs else client.create_run(
        experiment_id, run_name=f"evaluation-{evaluation_id}",
        tags={f"{TAG}federation": spec.federation, f"{TAG}evaluation_id": evaluation_id,
              f"{TAG}airflow_run_id": report["run_id"]}).info.run_id
    from fl_tasks.coordinator.report import federated_metrics

    log_batch(client, run_id, params={f"model_{label}": version for label, version in report["models"].items()},
              metrics=federated_metrics(report))
    client.log_text(run_id, json.dumps(report, indent=2, sort_keys=True), "evaluation_report.json")
    client.set_terminated(run_id, "FINISHED")
    statistic = report["statistic"]
    for label, version in report["models"].items():
        figure = report["figures"][statistic].get(label, {})
        summary = ", ".join(f"{k} {v:.4f}" for k, v in sorted(figure.items())) or "no silo evaluated"
        client.set_model_version_tag(spec.model_name, version, f"{TAG}last_evaluation",
                                     f"{evaluation_id}: {statistic} over {len(report['per_silo'])} silos: {summary}"[:4000])
    return run_id


def version_weights_sha256(spec: FederationSpec, version: str) -> str | None:
    """The sha256 tag of a registered version's weights, or None when there is no such version."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client(spec).get_model_version(spec.model_name, version)
    except MlflowException as exc:
        if exc.error_code in _NOT_FOUND:
            return None
        raise  # MLflow unreachable: the step retries rather than reject an honest stale update
    return found.tags.get(f"{TAG}weights_sha256")


def _round_versions(client, spec: FederationSpec, round_id: str) -> list:
    found = client.search_model_versions(f"name = '{spec.model_name}' and tag.`{TAG}round_id` = '{round_id}'")
    return sorted(found, key=lambda v: int(v.version))


def _one_version(client, spec: FederationSpec, round_id: str):
    """The round's version (the lowest number); deletes duplicates a retried POST created."""
    versions = _round_versions(client, spec, round_id)
    for extra in versions[1:]:
        if extra.aliases:
            continue  # never pull a version that carries an alias
        log.warning("round %s: deleting duplicate model version %s of %s (keeping %s)", round_id, extra.version,
                    spec.model_name, versions[0].version)
        client.delete_model_version(spec.model_name, extra.version)
    return versions[0] if versions else None


def find_round_version(spec: FederationSpec, round_id: str):
    """The model version already registered for this round, if any (re-runs reuse it)."""
    return _one_version(_client(spec), spec, round_id)


def _experiment_id(client, spec: FederationSpec) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(spec.experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(spec.experiment_name, tags={f"{TAG}federation": spec.federation})
    except MlflowException:
        experiment = client.get_experiment_by_name(spec.experiment_name)  # a retried create found it made
        if experiment is None:
            raise
        return experiment.experiment_id


def _ready_model(experiment_id: str, run_id: str):
    """The model a previous try logged in full for this run, if any (not a PENDING or FAILED one)."""
    import mlflow
    from mlflow.entities import LoggedModelStatus

    models = mlflow.search_logged_models(experiment_ids=[experiment_id], output_format="list",
                                         filter_string=f"source_run_id = '{run_id}'")
    ready = [m for m in models if str(m.status) == str(LoggedModelStatus.READY)]
    return min(ready, key=lambda m: m.creation_timestamp) if ready else None


# MLflow's batch limits (mlflow/utils/validation.py): per log_batch request.
MAX_BATCH_PARAMS, MAX_BATCH_ENTRIES = 100, 1000


def batches(params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
            tags: dict[str, str] | None = None, step: int = 0, stamp: int | None = None) -> list[dict[str, list]]:
    """The keyword arguments of as few `MlflowClient.log_batch` calls as MLflow's limits allow
    (at most 100 params and 1000 entries in all per call), in sorted order within each kind."""
    from mlflow.entities import Metric, Param, RunTag

    stamp = int(time.time() * 1000) if stamp is None else stamp
    entries = [("params", Param(k, str(v))) for k, v in sorted((params or {}).items())]
    entries += [("metrics", Metric(k, float(v), stamp, step)) for k, v in sorted((metrics or {}).items())]
    entries += [("tags", RunTag(k, str(v))) for k, v in sorted((tags or {}).items())]
    calls: list[dict[str, list]] = []
    for kind, entry in entries:
        call = calls[-1] if calls else None
        if call is None or sum(map(len, call.values())) >= MAX_BATCH_ENTRIES or (
                kind == "params" and len(call["params"]) >= MAX_BATCH_PARAMS):
            call = {"params": [], "metrics": [], "tags": []}
            calls.append(call)
        call[kind].append(entry)
    return calls


def log_batch(client, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
              tags: dict[str, str] | None = None) -> int:
    """Params, metrics and tags in as few requests as MLflow allows; returns the requests made."""
    calls = batches(params, metrics, tags)
    for call in calls:
        client.log_batch(run_id, **call)
    return len(calls)


class _no_requirement_scan:
    """Skip MLflow's check of a logged model's pip requirements against this environment (a
    warning only, for requirements we pin ourselves): it maps every installed distribution
    to its modules first, about a second per process. Where MLflow has no such check, nothing
    changes."""

    def __enter__(self):
        from mlflow.utils import environment

        self._module = environment
        self._saved = getattr(environment, "warn_dependency_requirement_mismatches", None)
        if self._saved is not None:
            environment.warn_dependency_requirement_mismatches = lambda requirements: None
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            self._module.warn_dependency_requirement_mismatches = self._saved


def register_candidate(spec: FederationSpec, model, *, round_id: str, airflow_run_id: str, base_version: str,
                       weights_uri: str, weights_sha256: str, params: dict[str, Any], metrics: dict[str, float],
                       report: dict[str, Any], base_origin: str = "",
                       tags: dict[str, str] | None = None) -> RegisteredVersion:
    """Log the round's MLflow run and register the candidate (once per round); `tags` go on
    the version (e.g. which silos evaluated it, and with what result)."""
    import mlflow
    import mlflow.pytorch

    client = _client(spec)
    existing = _one_version(client, spec, round_id)
    if existing is not None:
        return RegisteredVersion(str(existing.version), existing.run_id,
                                 client.get_run(existing.run_id).info.experiment_id)
    _ensure_registered_model(client, spec.model_name)
    version_tags = dict(tags or {})
    tags = {f"{TAG}federation": spec.federation, f"{TAG}round_id": round_id, f"{TAG}airflow_run_id": airflow_run_id,
            f"{TAG}base_version": base_version, f"{TAG}task": spec.task.entrypoint,
            **({f"{TAG}base_origin": base_origin} if base_origin else {})}
    experiment_id = _experiment_id(client, spec)
    # A retried task resumes the run (and the logged model) an interrupted try left behind.
    earlier = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}round_id` = '{round_id}'", max_results=1)
    with mlflow.start_run(run_id=earlier[0].info.run_id) if earlier else mlflow.start_run(
            experiment_id=experiment_id, run_name=f"round-{round_id}", tags=tags) as run:
        logged = {k: str(v)[:500] for k, v in params.items()}
        # One request for the params and the metrics (two with the fluent calls).
        log_batch(client, run.info.run_id, params={k: v for k, v in logged.items() if k not in run.data.params},
                  metrics=metrics)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "round_report.json"
            path.write_text(json.dumps(report, indent=2, sort_keys=True))
            mlflow.log_artifact(str(path))
        logged_model = _ready_model(experiment_id, run.info.run_id) if earlier else None
        if logged_model is not None:
            model_id, model_uri = logged_model.model_id, f"models:/{logged_model.model_id}"
        else:
            # No input example: a task's model takes whatever inputs it likes, and running an
            # example through a model in train mode would move batch-norm statistics (the
            # registered model must stay the candidate that passed the gates, fl.weights_sha256).
            # Loading it needs the task's package installed (the model's class is pickled).
            with _no_requirement_scan():
                info = mlflow.pytorch.log_model(copy.deepcopy(model).eval(), name="model",
                                                serialization_format="pickle",
                                                pip_requirements=["torch==2.13.0", "numpy==2.4.6"])
            model_id, model_uri = info.model_id, info.model_uri
    client.create_model_version(
        spec.model_name, source=model_uri, run_id=run.info.run_id, model_id=model_id,
        tags={**tags, **version_tags, f"{TAG}weights_uri": weights_uri, f"{TAG}weights_sha256": weights_sha256,
              f"{TAG}decision": "pending"},
        description=f"Federated round {round_id} of {spec.federation}",
    )
    return RegisteredVersion(str(_one_version(client, spec, round_id).version), run.info.run_id, experiment_id)


def log_round_record(spec: FederationSpec, round_id: str, files: dict[str, str],
                     metrics: dict[str, float]) -> str:
    """Attach the round's records to its MLflow run (created, marked FAILED, when the round
    never reached register): `files` (artifact path -> text: the audit log, the drift table,
    the HTML report) and `metrics` the run does not hold yet, so that a retry neither
    duplicates a metric nor changes what register logged. Returns the run id."""
    from mlflow.entities import Metric

    client = _client(spec)
    experiment_id = _experiment_id(client, spec)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TAG}round_id` = '{round_id}'", max_results=1)
    if runs:
        run_id, logged = runs[0].info.run_id, set(runs[0].data.metrics)
    else:
        run_id, logged = client.create_run(experiment_id, run_name=f"round-{round_id}", tags={
            f"{TAG}federation": spec.federation, f"{TAG}round_id": round_id}).info.run_id, set()
        client.set_terminated(run_id, "FAILED")
    for path, text in files.items():
        client.log_text(run_id, text, path)
    stamp = int(time.time() * 1000)
    fresh = [Metric(k, float(v), stamp, 0) for k, v in sorted(metrics.items()) if k not in logged]
    for start in range(0, len(fresh), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=fresh[start:start + 1000])
    return run_id


def personal_model_name(spec: FederationSpec, client_id: str) -> str:
    """The registered model that holds one silo's personal models (share_weights)."""
    return f"{spec.model_name}-personal-{client_id}"


def log_personalization(spec: FederationSpec, run_id: str, round_id: str, table: dict[str, Any],
                        weights: dict[str, bytes]) -> dict[str, dict[str, str]]:
    """The round's (or evaluation's) personalization in its MLflow run: the table with its
    lineage as `personalization.json`, the per-silo metrics the run does not hold yet, tags;
    and for each silo in `weights` (its shared personal weights, safetensors) the weights as
    artifacts under `personal/<client>/` and a version of `<model_name>-personal-<client>`
    from them, tagged with the lineage (found again by its fl.round_id tag on a retry).
    Without shared weights only metrics, hashes and lineage reach MLflow. Returns
    client -> {model, version}."""
    from mlflow.entities import Metric

    from fl_tasks.coordinator.report import personalization_metrics, personalization_tags, with_versions

    client = _client(spec)
    run = client.get_run(run_id)
    for key, value in personalization_tags(table).items():
        client.set_tag(run_id, key, value)
    stamp = int(time.time() * 1000)
    fresh = [Metric(k, v, stamp, 0) for k, v in sorted(personalization_metrics(table).items())
             if k not in run.data.metrics]
    for start in range(0, len(fresh), 1000):
        client.log_batch(run_id, metrics=fresh[start:start + 1000])
    registered = {}
    for client_id, payload in sorted(weights.items()):
        entry = table["silos"][client_id]
        lineage = entry["lineage"]
        path = f"personal/{client_id}"
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "model.safetensors").write_bytes(payload)
            (Path(tmp) / "lineage.json").write_text(json.dumps(
                {"client_id": client_id, "round_id": round_id, "serving": entry["serving"], **lineage,
                 "scores": entry["scores"], "weights": entry["weights"]}, indent=2, sort_keys=True))
            client.log_artifacts(run_id, tmp, path)
        name = personal_model_name(spec, client_id)
        _ensure_registered_model(client, name, f"Personal models of silo {client_id} in federation {spec.federation}, "
                                               "one version per round")
        found = sorted(client.search_model_versions(f"name = '{name}' and tag.`{TAG}round_id` = '{round_id}'"),
                       key=lambda v: int(v.version))
        if found:
            version = found[0]
        else:
            version = client.create_model_version(
                name, source=f"{run.info.artifact_uri.rstrip('/')}/{path}", run_id=run_id,
                description=f"Personal model ({lineage['strategy']}) of {client_id}, round {round_id} of "
                            f"{spec.federation}",
                tags={f"{TAG}federation": spec.federation, f"{TAG}round_id": round_id, f"{TAG}client_id": client_id,
                      f"{TAG}strategy": lineage["strategy"], f"{TAG}serving": entry["serving"],
                      f"{TAG}global_model": lineage["global_model"],
                      f"{TAG}global_version": str(lineage["global_version"] or ""),
                      f"{TAG}global_sha256": lineage["global_sha256"],
                      f"{TAG}weights_sha256": lineage["personal_sha256"],
                      f"{TAG}weights_uri": (entry["weights"] or {}).get("uri", "")})
        registered[client_id] = {"model": name, "version": str(version.version)}
    # Last: the table as report.json will hold it, each silo's registered version in it.
    client.log_text(run_id, json.dumps(with_versions(table, None, registered), indent=2, sort_keys=True),
                    "personalization.json")
    return registered


def warm_start_weights(spec: FederationSpec, store, task) -> bytes:
    """The first round's base from a model the team already runs (`task.warm_start`): an
    MLflow model version (`models:/name/version` or `models:/name@alias`) or a safetensors
    weights URI (s3://), checked against the task's model: tensor names, shapes and dtypes.
    Raises ValueError naming the source and the mismatch."""
    from fl_tasks.protocol.codec import CodecError, decode_state, encode_state
    from fl_tasks.tasks.api import load_model_state, model_state

    source = spec.task.warm_start
    if source.startswith("s3://"):
        bucket, _, key = source.removeprefix("s3://").partition("/")
        payload = store.get_bytes(bucket, key)
        if payload is None:
            raise ValueError(f"task.warm_start: {source} does not exist")
        try:
            state = decode_state(payload)
        except CodecError as exc:
            raise ValueError(f"task.warm_start: {source}: {exc}") from None
    else:
        import mlflow.pytorch

        _client(spec)
        try:
            loaded = mlflow.pytorch.load_model(source, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; all mean "cannot use it"
            raise ValueError(f"task.warm_start: cannot load {source} from MLflow: {type(exc).__name__}: {exc}") \
                from None
        state = model_state(loaded)
    try:
        model = load_model_state(task.build_model(), state)
    except ValueError as exc:
        raise ValueError(f"task.warm_start: {source} does not fit the task's model: {exc}") from None
    return encode_state(model_state(model))


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
