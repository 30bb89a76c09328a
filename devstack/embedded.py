"""The embedded default on one machine: a loopback S3 server, a local MLflow store, an
Airflow home, all under one state folder. Used by `make demo` and the integration tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fl_tasks.config import FederationSpec
from fl_tasks.protocol.storage import ObjectStore

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The example tasks are a folder on the path, for the stack's services (service_env) and for
# make stack and make demo themselves, which build each federation's simulated silos.
if str(EXAMPLES) not in sys.path:
    sys.path.append(str(EXAMPLES))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LoopbackServer:
    """A server process on 127.0.0.1 in its own process group, stopped with the group.

    Subclasses name the command and the URL that answers once the server is up.
    """

    name = "server"
    stop_grace_seconds = 10.0

    def __init__(self, log_path: Path, port: int | None = None, cwd: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def health_url(self) -> str:
        raise NotImplementedError

    def start(self, timeout: float = 30.0):
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.name} exited at start; see {self.log_path}")
            try:
                urllib.request.urlopen(self.health_url(), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the {self.name} did not answer on {self.url} within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_grace_seconds)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class S3Server(LoopbackServer):
    """A moto S3 server."""

    name = "S3 server"

    @property
    def endpoint_url(self) -> str:
        return self.url

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(self.port)]

    def health_url(self) -> str:
        return f"{self.url}/moto-api/"


def service_env(state_dir: Path, endpoint_url: str, federations_dir: Path) -> dict[str, str]:
    """Environment for Airflow, the coordinator and the silos on the embedded default."""
    airflow_home = state_dir / "airflow"
    return {
        "FL_S3_ENDPOINT_URL": endpoint_url,
        "AWS_ACCESS_KEY_ID": "embedded",
        "AWS_SECRET_ACCESS_KEY": "embedded",
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{state_dir / 'mlflow.db'}",
        "FL_FEDERATIONS_DIR": str(federations_dir),
        "FL_DATA_CACHE": os.environ.get("FL_DATA_CACHE", str(REPO / ".cache" / "data")),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        # devstack/ is not installed (Airflow's processes import make stack's hostname callable from
        # it), and examples/ is how the example tasks reach workers and silos: a folder on the path.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), str(EXAMPLES), os.environ.get("PYTHONPATH")])),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(airflow_home / "logs"),
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONUNBUFFERED": "1",
    }


def create_buckets(spec: FederationSpec, store: ObjectStore) -> None:
    """On the embedded default the coordinator creates every bucket; in production they exist."""
    store.ensure_bucket(spec.coordinator_bucket)
    for client in spec.clients:
        store.ensure_bucket(client.bucket_name)


def airflow(args: list[str], env: dict[str, str], log_path: Path | None = None, timeout: float = 900,
            ) -> subprocess.CompletedProcess:
    """Run an `airflow` CLI command from this virtualenv with the embedded environment."""
    cmd = [str(Path(sys.executable).with_name("airflow")), *args]
    full_env = {**os.environ, **env}
    if log_path is None:
        return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    with open(log_path, "a") as log:
        return subprocess.run(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, text=True, timeout=timeout)
