"""`make stack`: the deployment column on one machine, without Docker.

Under one state folder and on loopback only: a private PostgreSQL cluster (Airflow and
MLflow databases), an S3 server, an MLflow tracking server (PostgreSQL backend, S3
artifacts), the Airflow api-server, scheduler, dag-processor and triggerer (LocalExecutor,
low parallelism for a small machine), one Airflow log server for the scheduler's and the
triggerer's logs, and one `fl-client` agent per silo of every federation. Every service
runs in its own process group; `down` stops them all.

`up` writes `<state-dir>/env`: sourced in a shell, it puts this virtualenv's `airflow` on
the PATH, points it at the stack's database and settings, and sets `$AIRFLOW`,
`$AIRFLOW_PASSWORD` and `$MLFLOW_TRACKING_URI`, so that the CLI and `curl` work as on a
deployment.

    python -m devstack.localstack up   [--state-dir .state/stack] [--federations-dir federations] [--free-ports]
    python -m devstack.localstack down [--state-dir .state/stack]

The defaults come from FL_STACK_DIR, FL_FEDERATIONS_DIR, FL_STACK_PORTS=free and
FL_STACK_NO_SILOS (comma-separated federations whose silos are not started), so that
`make stack` can run a second stack beside the first (the end-to-end tests do).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fl_tasks.protocol import signing
from fl_tasks.config import ConfigError, FederationSpec, load_federations
from devstack.embedded import REPO, S3Server, create_buckets, free_port, service_env
from fl_tasks.protocol.storage import ObjectStore

ARTIFACT_BUCKET = "mlflow-artifacts"
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
DEFAULT_PORTS = {"postgres": 5433, "s3": 9000, "mlflow": 5000, "airflow": 8080, "logs": 8793}
# The scheduler and the triggerer would each serve their logs on every interface; the stack
# serves both from one log server on loopback instead (same log folder, same machine).
SKIP_SERVE_LOGS = {"scheduler": "--skip-serve-logs", "triggerer": "--skip-serve-logs"}


def loopback_hostname() -> str:
    """Airflow's `hostname_callable` on the stack: the api-server fetches running tasks' logs
    from `http://<hostname>:<log port>`, and the log server listens on loopback only."""
    return "127.0.0.1"


class StackError(RuntimeError):
    """A service did not start; the message names it and its log."""


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if found:
        return found[-1]
    if shutil.which(name):
        return shutil.which(name)
    raise StackError(f"PostgreSQL's {name} was not found; install Debian's server: apt-get install -y postgresql")


def _as_postgres(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the cluster as the `postgres` user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class Postgres:
    data_dir: Path
    port: int
    log: Path

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, "postgres", "postgres")
        if not (self.data_dir / "PG_VERSION").exists():
            self._run([_pg_bin("initdb"), "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        self._run([_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-l", str(self.log), "-w", "-t", "60", "start",
                   "-o", f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data_dir} -c max_connections=200"])
        for database in ("airflow", "mlflow"):
            exists = self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}'")
            if exists.strip() != "1":
                self._psql(f"CREATE DATABASE {database}")

    def _run(self, cmd: list[str]) -> None:
        result = subprocess.run(_as_postgres(cmd), capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"PostgreSQL: {' '.join(cmd[:2])} failed: {result.stderr.strip()[-1500:]} (log: {self.log})")

    def _psql(self, sql: str) -> str:
        result = subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-tAc", sql],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise StackError(f"PostgreSQL: {sql!r} failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            subprocess.run(_as_postgres([_pg_bin("pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]),
                           capture_output=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"


def _postgres_data_dir(state_dir: Path) -> Path:
    """The cluster's folder. When we are root the server runs as `postgres`, which must be
    able to reach it; a checkout under a private folder gets a folder in /tmp instead
    (named after the state folder, so `down` finds it again)."""
    inside = state_dir / "postgres"
    if os.geteuid() != 0 or all(os.stat(p).st_mode & 0o001 for p in [state_dir, *state_dir.parents] if p.exists()):
        return inside
    import hashlib

    return Path("/tmp") / f"fl-postgres-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]}"


def _wait_http(url: str, name: str, log: Path, processes: dict[str, tuple[subprocess.Popen, Path]], timeout: float,
               check=lambda body: True) -> None:
    """Wait until `url` answers and `check` accepts the body; fail as soon as one of the
    processes it depends on (name -> (process, log)) has exited."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        for proc_name, (proc, proc_log) in processes.items():
            if proc.poll() is not None:
                raise StackError(f"{proc_name} exited with code {proc.returncode}; see {proc_log}")
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                body = response.read().decode()
                if check(body):
                    return
                last = body[:300]
        except OSError as exc:
            last = str(exc)
        time.sleep(1)
    raise StackError(f"{name} was not healthy at {url} after {timeout:.0f}s (last answer: {last}); see {log}")


def _airflow_healthy(body: str) -> bool:
    health = json.loads(body)
    return all(health.get(part, {}).get("status") == "healthy"
               for part in ("metadatabase", "scheduler", "triggerer", "dag_processor"))


@dataclass
class LocalStack:
    state_dir: Path
    federations_dir: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    no_silos: tuple[str, ...] = ()  # federations whose silos are not started
    processes: dict[str, int] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['airflow']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def postgres(self) -> Postgres:
        data_dir = _postgres_data_dir(self.state_dir)
        # pg_ctl writes its log as the `postgres` user: keep it in the cluster's own folder.
        return Postgres(data_dir, self.ports["postgres"], data_dir / "server.log")

    @property
    def env_file(self) -> Path:
        """The sourceable settings of this stack (see the module docstring)."""
        return self.state_dir / "env"

    @property
    def password_file(self) -> Path:
        return self.state_dir / "airflow" / "simple_auth_manager_passwords.json"

    @property
    def signing_keys_file(self) -> Path:
        """Connection id -> key, generated at each `up` (one key per connection: federations
        sharing the default `fl_signing_{client}` and a client id share that client's key)."""
        return self.state_dir / "airflow" / "signing_keys.json"

    def signing_keys(self) -> dict[str, str]:
        return json.loads(self.signing_keys_file.read_text()) if self.signing_keys_file.exists() else {}

    def _write_signing_keys(self, specs: list[FederationSpec]) -> None:
        conn_ids = sorted({spec.security.conn_id(spec.federation, c.id) for spec in specs for c in spec.clients})
        signing.write_private(self.signing_keys_file, json.dumps(signing.generate_keys(conn_ids), indent=2))

    def env(self) -> dict[str, str]:
        env = service_env(self.state_dir, self.s3_url, self.federations_dir)
        secret_file = self.state_dir / "airflow" / "jwt_secret"
        env.update({
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url("airflow"),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            # Two cores: a few task processes at a time, one API worker.
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.ports["airflow"]),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.ports["logs"]),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.ports["logs"]),
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "devstack.localstack.loopback_hostname",
            "AIRFLOW__API__BASE_URL": self.airflow_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.airflow_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text().strip() if secret_file.exists() else "",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
            # A local stack is for trying rounds: federations start unpaused.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            # A round is a chain of short tasks: the scheduler's idle sleep (1 s by default) comes
            # between every task and the next (benchmarks/scale.py, overhead).
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            # Backfilled rounds follow each other within seconds on a local stack.
            "FL_PREVIOUS_ROUND_POKE_SECONDS": "3",
        })
        if self.password_file.exists():
            # The round's tasks set run notes through the REST API (plugins/fl_airflow/run_notes.py).
            env["AIRFLOW_CONN_FL_AIRFLOW_API"] = json.dumps({"conn_type": "http", "host": self.airflow_url,
                                                             "login": "admin", "password": self.password()})
        # The silos' signing keys, as Airflow connections (the coordinator's key provider).
        env.update({signing.airflow_conn_env_var(conn_id): signing.airflow_conn_value(key)
                    for conn_id, key in self.signing_keys().items()})
        return env

    def write_env_file(self) -> None:
        """`<state-dir>/env` for a shell: the stack's settings without the silos' keys, plus
        $AIRFLOW, $AIRFLOW_PASSWORD and this virtualenv's bin folder first on the PATH."""
        settings = {k: v for k, v in self.env().items() if not k.startswith("AIRFLOW_CONN_FL_SIGNING")}
        settings.update({"AIRFLOW": self.airflow_url, "AIRFLOW_PASSWORD": self.password()})
        lines = ["# Written by `make stack`: `source` it to use this stack from a shell (make stack-down stops it).",
                 f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:\"$PATH\""]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in sorted(settings.items())]
        signing.write_private(self.env_file, "\n".join(lines) + "\n")

    def password(self) -> str:
        return json.loads(self.password_file.read_text())["admin"]

    # --- processes ---------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                    start_new_session=True, cwd=REPO)
        self.processes[name] = proc.pid
        self._save()
        return proc

    def _save(self) -> None:
        (self.state_dir / "stack.json").write_text(json.dumps(
            {"ports": self.ports, "processes": self.processes, "federations_dir": str(self.federations_dir),
             "no_silos": list(self.no_silos)}, indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> "LocalStack":
        """The stack a `make stack` started from this state folder."""
        saved = json.loads((state_dir / "stack.json").read_text())
        return cls(state_dir, Path(saved["federations_dir"]), saved["ports"], tuple(saved.get("no_silos", ())),
                   saved["processes"])

    def _bin(self, name: str) -> str:
        return str(Path(sys.executable).with_name(name))

    def up(self, timeout: float = 240) -> None:
        started = time.monotonic()
        # The S3 server keeps objects in memory, so databases kept from an earlier stack
        # would point at models that are gone: every stack starts empty.
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        shutil.rmtree(self.postgres.data_dir, ignore_errors=True)
        self.state_dir.mkdir(parents=True)
        os.chmod(self.state_dir, 0o755)  # the postgres user must reach its data folder
        (self.state_dir / "airflow").mkdir(exist_ok=True)
        if not self.password_file.exists():
            self.password_file.write_text(json.dumps({"admin": secrets.token_urlsafe(12)}))
        secret_file = self.state_dir / "airflow" / "jwt_secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(32))
        try:
            specs = load_federations(self.federations_dir)
        except ConfigError as exc:
            raise StackError(str(exc)) from None
        self._write_signing_keys(specs)
        self.say("starting PostgreSQL")
        self.postgres.start()
        self.processes["postgres"] = -1  # stopped with pg_ctl, not by signal
        self.say("starting the S3 server")
        s3 = S3Server(self.logs / "s3.log", self.ports["s3"]).start()
        self.processes["s3"] = s3.proc.pid
        self._save()
        env = self.env()
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "FL_DATA_CACHE"):
            os.environ[name] = env[name]  # this process creates the buckets and the silo data
        store = ObjectStore(self.s3_url)
        store.ensure_bucket(ARTIFACT_BUCKET)
        for spec in specs:
            create_buckets(spec, store)
        self.store = store

        self.say("starting MLflow and migrating the Airflow DB")
        mlflow = self._spawn("mlflow", [self._bin("mlflow"), "server", "--host", "127.0.0.1",
                                        "--port", str(self.ports["mlflow"]), "--workers", "1",
                                        "--backend-store-uri", self.postgres.url("mlflow").replace("+psycopg2", ""),
                                        "--artifacts-destination", f"s3://{ARTIFACT_BUCKET}"], env)
        with ThreadPoolExecutor(2) as pool:
            migrate = pool.submit(subprocess.run, [self._bin("airflow"), "db", "migrate"], env={**os.environ, **env},
                                  capture_output=True, text=True)
            silos = pool.submit(self._prepare_silos, specs)
            result = migrate.result()
            if result.returncode != 0:
                (self.logs / "airflow-db-migrate.log").write_text(result.stdout + result.stderr)
                raise StackError(f"airflow db migrate failed; see {self.logs / 'airflow-db-migrate.log'}")
            silo_paths = silos.result()
        self.say("starting Airflow: " + ", ".join(AIRFLOW_COMPONENTS) + ", and a log server")
        # A task starts through the api-server's execution API (a few tries, seconds apart), and a
        # federation's first scheduled round is queued as soon as its DAG is parsed: the scheduler
        # and the triggerer wait for that API, or on a small machine the round's first task (and
        # so the round) fails while the api-server is still starting.
        airflow_processes = {f"Airflow {component}": (self.start_airflow(component),
                                                      self.logs / f"airflow-{component}.log")
                             for component in ("api-server", "dag-processor")}
        _wait_http(f"{self.airflow_url}/execution/health", "Airflow's execution API",
                   self.logs / "airflow-api-server.log", airflow_processes, timeout - (time.monotonic() - started))
        airflow_processes.update({f"Airflow {component}": (self.start_airflow(component),
                                                           self.logs / f"airflow-{component}.log")
                                  for component in ("scheduler", "triggerer")})
        self._spawn("airflow-log-server", [sys.executable, "-m", "uvicorn", "--factory",
                                           "airflow.utils.serve_logs.log_server:get_app", "--host", "127.0.0.1",
                                           "--port", str(self.ports["logs"]), "--no-access-log"], self.env())
        self.say("starting the silo agents")
        keys = self.signing_keys()
        silo_env = {k: v for k, v in env.items() if not k.startswith("AIRFLOW_CONN_")}  # no other silo's key
        for spec in specs:
            for client in spec.clients if spec.federation not in self.no_silos else ():
                cmd = [sys.executable, "-m", "fl_tasks.silo.agent", "--client-id", client.id, "--federation",
                       spec.federation, "--bucket", client.bucket, "--data",
                       str(silo_paths[spec.federation].silos[client.id]),
                       "--endpoint-url", self.s3_url, "--poll-seconds", "2"]
                self._spawn(f"silo-{spec.federation}-{client.id}", cmd,
                            {**silo_env, "FL_SIGNING_KEY": keys[spec.security.conn_id(spec.federation, client.id)]})
        left = timeout - (time.monotonic() - started)
        _wait_http(f"{self.mlflow_url}/health", "MLflow", self.logs / "mlflow.log",
                   {"MLflow": (mlflow, self.logs / "mlflow.log")}, left)
        left = timeout - (time.monotonic() - started)
        _wait_http(f"{self.airflow_url}/api/v2/monitor/health", "Airflow", self.logs / "airflow-api-server.log",
                   airflow_processes, left, _airflow_healthy)
        self.write_env_file()
        self.say(f"stack healthy in {time.monotonic() - started:.0f}s")

    def start_airflow(self, component: str) -> subprocess.Popen:
        """Start one Airflow component (api-server, scheduler, dag-processor, triggerer)."""
        command = [self._bin("airflow"), component, *([SKIP_SERVE_LOGS[component]] if component in SKIP_SERVE_LOGS else [])]
        return self._spawn(f"airflow-{component}", command, self.env())

    def kill(self, name: str) -> None:
        """SIGKILL one process group, e.g. 'airflow-scheduler': a crash, not a clean shutdown."""
        pid = self.processes.pop(name)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while _alive(pid):
            time.sleep(0.1)
        self._save()

    def _prepare_silos(self, specs) -> dict:
        """Every federation's simulated silo data (agents start only for those not in
        no_silos), and, where a federation has evaluation.coordinator_data, those rows published."""
        from fl_tasks.simulation.simulate import prepare_silos, publish_validation

        prepared = {spec.federation: prepare_silos(spec, self.state_dir / "data" / spec.federation) for spec in specs}
        for spec in specs:
            publish_validation(spec, prepared[spec.federation], self.store)
        return prepared

    def down(self) -> None:
        state = self.state_dir / "stack.json"
        processes = json.loads(state.read_text())["processes"] if state.exists() else self.processes
        for name, pid in processes.items():
            if pid > 0:
                try:
                    os.killpg(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10  # then SIGKILL: a dev stack keeps nothing that needs a slow stop
        for name, pid in processes.items():
            while pid > 0 and time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if pid > 0 and _alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.postgres.stop()
        if self.postgres.data_dir.parent != self.state_dir:
            shutil.rmtree(self.postgres.data_dir, ignore_errors=True)
        if state.exists():
            state.unlink()

    def say(self, message: str) -> None:
        print(f"[stack {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def describe(self) -> str:
        env_file = self.env_file.relative_to(Path.cwd()) if self.env_file.is_relative_to(Path.cwd()) else self.env_file
        return "\n".join([
            f"Airflow UI and REST API: {self.airflow_url}   (login: admin / {self.password()})",
            f"MLflow:                  {self.mlflow_url}",
            f"S3 endpoint:             {self.s3_url}   (access key 'embedded', secret 'embedded')",
            f"PostgreSQL:              127.0.0.1:{self.ports['postgres']} (user postgres, databases airflow, mlflow)",
            f"Logs:                    {self.logs}",
            f"From a shell:            source {env_file}   (airflow on the PATH, $AIRFLOW, $AIRFLOW_PASSWORD)",
            "Stop everything with:    make stack-down",
        ])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours is as good as gone
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="localstack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("--state-dir", default=os.environ.get("FL_STACK_DIR") or str(REPO / ".state" / "stack"))
    parser.add_argument("--federations-dir", default=os.environ.get("FL_FEDERATIONS_DIR") or str(REPO / "federations"))
    parser.add_argument("--free-ports", action="store_true", default=os.environ.get("FL_STACK_PORTS") == "free",
                        help="pick free ports instead of the defaults")
    parser.add_argument("--no-silos", action="append", metavar="FEDERATION",
                        default=[f for f in os.environ.get("FL_STACK_NO_SILOS", "").split(",") if f],
                        help="do not start silo agents for this federation")
    args = parser.parse_args(argv)
    state_dir = Path(args.state_dir).resolve()
    saved = state_dir / "stack.json"
    ports = json.loads(saved.read_text())["ports"] if saved.exists() else (
        {name: free_port() for name in DEFAULT_PORTS} if args.free_ports else dict(DEFAULT_PORTS))
    stack = LocalStack(state_dir, Path(args.federations_dir).resolve(), ports, tuple(args.no_silos))
    if args.action == "down":
        stack.down()
        stack.say("stopped")
        return 0
    if saved.exists():
        print(f"a stack is already running from {state_dir}; run 'make stack-down' first", file=sys.stderr)
        return 1
    try:
        stack.up()
    except (StackError, OSError) as exc:
        print(f"stack: {exc}", file=sys.stderr)
        stack.down()
        return 1
    except KeyboardInterrupt:
        stack.down()
        return 130
    print(stack.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
