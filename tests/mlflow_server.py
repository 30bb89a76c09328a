"""A real `mlflow server` on loopback for tests: SQLite backend, local artifact root,
served artifacts (clients upload through the server, as in the deployment)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fl_tasks.embedded import free_port


class MlflowServer:
    """`mlflow server` in its own process group, stopped with the group."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "mlflow-server.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited at start; see {self.log_path}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)  # no grace needed: the store is a throwaway
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
