"""Shared fixtures: a real S3-speaking server (moto) on loopback, federation files."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

# Airflow reads its config at import: keep in-process DagBag parsing away from ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="fl-airflow-home-"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

import pytest
import yaml

from fl_tasks.embedded import S3Server

REPO = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One moto S3 server for the session; tests use distinct bucket names."""
    saved = {k: os.environ.get(k) for k in ("FL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    with S3Server(tmp_path_factory.mktemp("s3") / "moto.log") as server:
        os.environ.update({"FL_S3_ENDPOINT_URL": server.endpoint_url, "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
        yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store per test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


def federation_doc(num_clients: int = 3, **overrides) -> dict:
    """A small synthetic-data federation with bucket names unique to this test session."""
    n = next(_names)
    name = overrides.pop("federation", f"test-{n}")
    doc = {
        "federation": name,
        "coordinator": {"bucket": f"coord-{n}"},
        "clients": [{"id": f"silo-{i}", "bucket": f"s3://silo-{n}-{i}"} for i in range(num_clients)],
        "quorum": {"min_clients": 2, "round_timeout_minutes": 2, "poll_interval_seconds": 0.5},
        "model": {"hidden": [16, 8], "seed": 3},
        "training": {"local_epochs": 2, "learning_rate": 0.01, "batch_size": 128},
        "gates": {"min_roc_auc": 0.6, "min_pr_auc": 0.0, "max_regression": 0.05},
        "data": {"dataset": "synthetic", "synthetic_rows": 6000, "seed": 5},
        "mlflow": {"model_name": f"{name}-model"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


@pytest.fixture
def write_federation(tmp_path):
    """Write a federation YAML and return its path."""

    def write(folder: Path | None = None, **overrides) -> Path:
        doc = federation_doc(**overrides)
        folder = folder or tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{doc['federation']}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    return write


@pytest.fixture
def make_federation(s3_server, mlflow_uri, write_federation):
    """Build a federation on the moto server: (spec, coordinator, {client id: ClientRuntime})."""
    from fl_tasks.client import ClientRuntime
    from fl_tasks.config import load_federation
    from fl_tasks.coordinator import Coordinator
    from fl_tasks.datasets import dirichlet_partition, holdout_split, load_dataset
    from fl_tasks.embedded import create_buckets

    def make(**overrides):
        spec = load_federation(write_federation(**overrides))
        coordinator = Coordinator(spec)
        create_buckets(spec, coordinator.store)
        pool = holdout_split(load_dataset("synthetic", seed=spec.data.seed, synthetic_rows=spec.data.synthetic_rows),
                             seed=spec.data.seed)[0]
        parts = dirichlet_partition(pool.y, len(spec.clients), alpha=1.0, seed=1, min_rows=200)
        clients = {c.id: ClientRuntime(c.id, spec.federation, c.bucket, pool.take(p), coordinator.store)
                   for c, p in zip(spec.clients, parts)}
        return spec, coordinator, clients

    return make


# --- faults: a fault-injecting proxy in front of the real servers (tests/faultproxy.py) ---
@pytest.fixture
def s3_proxy(s3_server):
    """A FaultProxy in front of the session's S3 server; pass-through until a test says otherwise."""
    from tests.faultproxy import FaultProxy

    with FaultProxy("127.0.0.1", s3_server.port) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` (SQLite backend, local artifacts) for the session."""
    from tests.mlflow_server import MlflowServer

    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture
def mlflow_proxy(mlflow_server, monkeypatch):
    """A FaultProxy in front of the MLflow server, as this test's tracking URI.

    MLflow's HTTP retries are shortened (2 retries, no backoff, 3 s timeout) so that an
    outage fails a call in seconds; the production values are in fl_tasks.registry.
    """
    import mlflow

    from tests.faultproxy import FaultProxy

    previous = mlflow.get_tracking_uri()
    with FaultProxy("127.0.0.1", mlflow_server.port) as proxy:
        for name, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                            "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
                            "MLFLOW_TRACKING_URI": proxy.url}.items():
            monkeypatch.setenv(name, value)
        mlflow.set_tracking_uri(proxy.url)
        yield proxy
    mlflow.set_tracking_uri(previous)
