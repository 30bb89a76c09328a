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

from devstack.embedded import S3Server

REPO = Path(__file__).resolve().parent.parent
_names = itertools.count(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the node ids
def pytest_collection_modifyitems(items) -> None:
    """Under `pytest -n 2 --dist loadgroup` (make test), the DAG-run tests run one after
    another on one worker, and the stack tests one after another on the other; the unit tests
    fill in around them. Each group starts Airflow processes and silos of its own: one DAG run
    beside one stack leaves the deadlines room on two cores, two of either would not."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.xdist_group("stack"))
        elif item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.xdist_group("dag-runs"))


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


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the session: creating one runs MLflow's migrations (seconds),
    and every test federation has its own model and experiment names anyway."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One SQLite MLflow store for a test module, as the tracking URI of its tests (creating
    its tables costs seconds; each test's federation has its own model name in it)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('module-mlflow') / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def mlflow_uri(mlflow_store, monkeypatch):
    """The session's MLflow store as this test's tracking URI."""
    uri = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri


# The built-in fraud task's data contract (as in federations/banks.yaml).
FRAUD_CONTRACT = {
    "label": {"name": "Class", "type": "boolean"},
    "event_time": "event_time",
    "features": [{"names": [f"V{i}" for i in range(1, 29)], "type": "numeric"}, {"name": "Amount", "type": "numeric"}],
}


def federation_doc(num_clients: int = 3, **overrides) -> dict:
    """A small synthetic-data federation of the built-in fraud task, with bucket names unique
    to this test session."""
    n = next(_names)
    name = overrides.pop("federation", f"test-{n}")
    doc = {
        "federation": name,
        "coordinator": {"bucket": f"coord-{n}"},
        "clients": [{"id": f"silo-{i}", "bucket": f"s3://silo-{n}-{i}"} for i in range(num_clients)],
        "quorum": {"min_clients": 2, "round_timeout_minutes": 2, "poll_interval_seconds": 0.5},
        # The rounds' tests check FedAvg's formula; the default rule (weighted_median) has its own.
        "aggregation": "fedavg",
        "task": {"entrypoint": "fl_tasks.tasks.fraud:FraudTask", "params": {"hidden": [16, 8]}, "seed": 3},
        "training": {"local_epochs": 2, "learning_rate": 0.01, "batch_size": 128},
        "gates": {"thresholds": {"roc_auc": 0.6}, "max_regression": 0.05},
        "data": {"contract": FRAUD_CONTRACT},
        "simulation": {"source": "synthetic", "rows": 6000, "seed": 5},
        "mlflow": {"model_name": f"{name}-model"},
        # Drift costs each silo an evidently report a round: the tests about drift turn it on.
        "drift": False,
    }
    evaluation = overrides.pop("evaluation", {})
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    # The gates read the coordinator's rows (in its bucket) unless a test turns federated evaluation on.
    doc["evaluation"] = {"federated": False, "coordinator_data":
                         f"s3://{doc['coordinator']['bucket']}/{name}/holdout/validation.parquet", **evaluation}
    return doc


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides`; a section given as a mapping updates the base's section."""
    return {**base, **{k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in overrides.items()}}


def signed_federation(folder: Path, doc: dict, keys: dict[str, str], behaviours: dict[str, str] | None = None):
    """(spec, coordinator, {client id: agent}, simulated data) of the federation `doc` on the
    session's S3 server: every silo signs with its key in `keys` and the coordinator holds
    them all; `behaviours` gives some silos a simulated behaviour (AttackingAgent)."""
    from devstack.embedded import create_buckets
    from fl_tasks.config import load_federation
    from fl_tasks.coordinator import Coordinator
    from fl_tasks.protocol.signing import StaticKeys
    from fl_tasks.silo.agent import SiloAgent
    from fl_tasks.silo.sources import FileSource
    from fl_tasks.simulation.attacks import AttackingAgent
    from fl_tasks.simulation.simulate import prepare_silos, publish_validation

    path = folder / f"{doc['federation']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    spec = load_federation(path)
    coordinator = Coordinator(spec, keys=StaticKeys(keys))
    create_buckets(spec, coordinator.store)
    data = prepare_silos(spec, folder / f"{spec.federation}-data", alpha=1.0)
    publish_validation(spec, data, coordinator.store)
    silos = {}
    for c in spec.clients:
        behaviour = (behaviours or {}).get(c.id)
        agent, extra = (AttackingAgent, {"behaviour": behaviour}) if behaviour else (SiloAgent, {})
        silos[c.id] = agent(c.id, spec.federation, c.bucket, FileSource(data.silos[c.id]), coordinator.store,
                            signing_key=keys[c.id], state_dir=folder / f"{spec.federation}-silo-state" / c.id, **extra)
    return spec, coordinator, silos, data


def decide_round(coordinator, round_id: str) -> dict:
    """A round's steps after its candidate (and evaluation) are in: validate, register,
    promote or roll back, summarize; returns the report."""
    coordinator.validate(round_id)
    coordinator.register(round_id)
    getattr(coordinator, coordinator.decide(round_id))(round_id)
    return coordinator.summarize(round_id)


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
    """Build a federation on the moto server: (spec, coordinator, {client id: SiloAgent}),
    each agent reading its own simulated Parquet file, the coordinator's validation rows in
    its bucket."""
    from devstack.embedded import create_buckets
    from fl_tasks.config import load_federation
    from fl_tasks.coordinator import Coordinator
    from fl_tasks.silo.agent import SiloAgent
    from fl_tasks.silo.sources import FileSource
    from fl_tasks.simulation.simulate import prepare_silos, publish_validation

    def make(agent_class=SiloAgent, **overrides):
        path = write_federation(**overrides)
        spec = load_federation(path)
        coordinator = Coordinator(spec)
        create_buckets(spec, coordinator.store)
        data = prepare_silos(spec, path.parent / f"{spec.federation}-data", alpha=1.0)
        publish_validation(spec, data, coordinator.store)
        clients = {c.id: agent_class(c.id, spec.federation, c.bucket, FileSource(data.silos[c.id]), coordinator.store,
                                     state_dir=path.parent / f"{spec.federation}-silo-state" / c.id)
                   for c in spec.clients}
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
    outage fails a call in seconds; the production values are in fl_tasks.coordinator.registry.
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


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL cluster for the session (tests/postgres_server.py); tests
    create their own databases with `postgres_server.create_database(name)`."""
    from tests.postgres_server import PostgresServer

    with PostgresServer() as server:
        yield server
