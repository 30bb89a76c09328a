"""A real `mlflow server` on loopback for tests: SQLite backend, local artifact root,
served artifacts (clients upload through the server, as in the deployment)."""

from __future__ import annotations

import sys
from pathlib import Path

from devstack.embedded import LoopbackServer


class MlflowServer(LoopbackServer):
    """`mlflow server` with its store under `root`."""

    name = "mlflow server"
    stop_grace_seconds = 3.0  # no grace needed: the store is a throwaway

    def __init__(self, root: Path, port: int | None = None):
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root / "mlflow-server.log", port, cwd=root)
        self.root = root

    def command(self) -> list[str]:
        return [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                "--port", str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts")]

    def health_url(self) -> str:
        return f"{self.url}/health"

    def start(self, timeout: float = 90.0) -> "MlflowServer":
        return super().start(timeout)
