"""Scale: DAG parse time and round overhead (orchestration only), and what else the other
parts add (many silos, large models).

- parse: importing dags/fl_round.py with the repository's federations, as the dag-processor
  does (Airflow already imported, the DAG file parsed by a DagBag), in fresh subprocesses;
  the median of several runs. Target: at most 0.3 s.
- overhead: one federated round with "instant clients": in-process silo agents that answer
  the moment the model (or an evaluation request) reaches their bucket, with a precomputed
  update and fixed scores, so what is measured is orchestration only. Two modes:
  `dags_test` (`airflow dags test`, as `make demo` and the integration tests run rounds: a
  SQLite Airflow DB, a SQLite MLflow store, a loopback S3 server) and `scheduler` (the
  `make stack` deployment: PostgreSQL, MLflow server, Airflow api-server, scheduler,
  dag-processor and triggerer under LocalExecutor; one run triggered through the REST API,
  timed from the trigger to the run's end). Per task: the task instances' start and end
  in the Airflow metadata DB. Targets: at most 10 s (dags test) and 20 s (scheduler).

    .venv/bin/python benchmarks/scale.py [--only parse,overhead,many_silos,large] [--rounds 3]
        [--modes dags_test,scheduler] [--output benchmarks/results-scale.json]

The parts run now replace theirs in the output file; the others' figures are kept. Each part
(each overhead mode) records the machine it ran on, with the time of a fixed Python loop
(`reference_loop_seconds`), since seconds from a faster or busier machine do not compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results-scale.json"
TARGETS = {"dag_parse_seconds_at_most": 0.3, "round_overhead_dags_test_seconds_at_most": 10.0,
           "round_overhead_scheduler_seconds_at_most": 20.0}
ROUND_TASKS = ("wait_for_previous_round", "prepare_round", "dispatch", "wait_for_quorum", "aggregate",
               "request_evaluation", "wait_for_evaluations", "validate", "register", "promote_or_rollback", "promote",
               "rollback", "summary")


def reference_loop_seconds(repeats: int = 3) -> float:
    """The median time of a fixed pure-Python loop: how fast this machine runs Python now, so
    that figures from different runs (and machines) can be set side by side."""
    times = []
    for _ in range(repeats):
        started, total = time.perf_counter(), 0
        for i in range(5_000_000):
            total += i
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 3)


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "reference_loop_seconds": reference_loop_seconds()}


# --- DAG parse ------------------------------------------------------------------------------

_PARSE_PROBE = r"""
import json, sys, time
t0 = time.perf_counter()
import airflow.sdk  # the dag-processor has Airflow imported before it parses a file
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
t2 = time.perf_counter()
print(json.dumps({"airflow_import": t1 - t0, "parse": t2 - t1, "dags": sorted(bag.dag_ids),
                  "errors": {k: str(v)[:300] for k, v in bag.import_errors.items()}}))
"""


def dag_parse(repeats: int = 7, federations_dir: Path | None = None) -> dict:
    """Seconds to parse dags/fl_round.py (every federation of `federations_dir`, by default
    the repository's), each run in a fresh interpreter with Airflow already imported."""
    federations_dir = federations_dir or REPO / "federations"
    home = Path(tempfile.mkdtemp(prefix="fl-scale-parse-"))
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__UNIT_TEST_MODE": "False", "FL_FEDERATIONS_DIR": str(federations_dir),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "plugins"), str(REPO), os.environ.get("PYTHONPATH")]))}
    runs = []
    try:
        for _ in range(repeats):
            done = subprocess.run([sys.executable, "-c", _PARSE_PROBE, str(REPO / "dags" / "fl_round.py")], env=env,
                                  capture_output=True, text=True, timeout=300, cwd=home)
            if done.returncode != 0:
                raise RuntimeError(f"parse probe failed: {done.stderr[-2000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        shutil.rmtree(home, ignore_errors=True)
    parse = [r["parse"] for r in runs]
    return {"federations_dir": str(federations_dir.relative_to(REPO) if federations_dir.is_relative_to(REPO)
                                   else federations_dir),
            "dags": runs[-1]["dags"], "import_errors": runs[-1]["errors"], "runs": len(runs),
            "parse_seconds_median": statistics.median(parse), "parse_seconds": [round(p, 4) for p in parse],
            "airflow_import_seconds_median": statistics.median(r["airflow_import"] for r in runs),
            "target_at_most": TARGETS["dag_parse_seconds_at_most"],
            "met": statistics.median(parse) <= TARGETS["dag_parse_seconds_at_most"]}


# --- instant clients ------------------------------------------------------------------------

def _instant_agent_class():
    import numpy as np

    from fl_tasks import protocol
    from fl_tasks.protocol import UpdateManifest, sha256_hex
    from fl_tasks.protocol.codec import Codec, encode_update
    from fl_tasks.silo.agent import SiloAgent
    from fl_tasks.silo.holdout import split_rows

    class InstantAgent(SiloAgent):
        """A silo that answers at once: its update is the base plus a small fixed change (no
        training), its scores are fixed (the candidate a little better than the champion), so
        every gate passes and the round promotes. Rows are a small generated frame, only so
        that the agent's own checks (contract, evaluation share) run as in production."""

        rows = None

        def read_rows(self, manifest, contract):
            return self.rows

        def train_and_commit(self, manifest, task, rows, base, fetch_seconds) -> bool:
            from datetime import datetime, timezone

            round_id, t = manifest.round_id, manifest.training
            rng = np.random.default_rng(abs(hash((self.client_id, round_id))) % 2**32)
            trained = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
                       for k, v in base.items()}
            update = encode_update(trained, base, Codec.parse(t["codec"]), None, task.tensor_ranges).payload
            trained_on, _ = split_rows(rows, float(t.get("holdout_fraction", 0.0)), self.salt)
            self.store.put_bytes(self.bucket, self.key(protocol.update_payload_key, round_id), update)
            commit = UpdateManifest(
                client_id=self.client_id, federation=self.federation, round_id=round_id,
                base_model_version=manifest.model_version, base_sha256=manifest.payload_sha256,
                num_examples=len(trained_on), codec=t["codec"], payload_sha256=sha256_hex(update), payload_bytes=len(update),
                metrics={"loss": 0.1}, timings={"fetch_seconds": fetch_seconds, "train_seconds": 0.0},
                created_at=datetime.now(timezone.utc).isoformat(), drift={})
            self.commit(round_id, protocol.update_manifest_key, commit)
            return True

        def score_state(self, task, label, state, rows):
            bump = 0.02 if label == "candidate" else 0.0
            return {m.name: (min(m.high, 0.9 + bump) if m.higher_is_better else max(m.low, 0.1 - bump))
                    for m in task.metrics}

    return InstantAgent


class InstantSilos:
    """Every silo of a federation as an in-process agent, each polling its own bucket in a
    thread (`poll_seconds`), answering rounds and evaluation requests at once."""

    def __init__(self, spec, endpoint_url: str, keys: dict[str, str] | None, poll_seconds: float = 0.2):
        from fl_tasks.protocol.storage import ObjectStore

        cls = _instant_agent_class()
        task = spec.load_task()
        rows = task.example_data("synthetic", 400, 0)
        self.poll_seconds = poll_seconds
        self.stop_event = threading.Event()
        self.agents = []
        for client in spec.clients:
            agent = cls(client_id=client.id, federation=spec.federation, bucket_uri=client.bucket, source=None,
                        store=ObjectStore(endpoint_url), signing_key=(keys or {}).get(client.id),
                        state_dir=Path(tempfile.mkdtemp(prefix=f"fl-instant-{client.id}-")))
            agent.rows = rows
            self.agents.append(agent)
        self.threads: list[threading.Thread] = []

    def _loop(self, agent) -> None:
        while not self.stop_event.is_set():
            try:
                rounds, evaluations = agent.pending()
                for round_id in evaluations:
                    agent.evaluate(round_id)
                for round_id in rounds:
                    agent.answer(round_id)
            except Exception as exc:  # noqa: BLE001 - a benchmark silo logs and goes on
                print(f"[instant {agent.client_id}] {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.stop_event.wait(self.poll_seconds)

    def start(self) -> "InstantSilos":
        for agent in self.agents:
            agent.log = lambda message: None  # quiet
            thread = threading.Thread(target=self._loop, args=(agent,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=10)


# --- round overhead -------------------------------------------------------------------------

def _benchmark_federation(folder: Path, source: Path) -> Path:
    """The federation file the overhead rounds run: the repository's banks.yaml (five silos,
    signatures, federated evaluation, drift), without its schedule (manual runs only)."""
    import yaml

    doc = yaml.safe_load(source.read_text())
    for key in ("schedule", "start_date", "end_date"):
        doc.pop(key, None)
    doc["federation"] = "scale"
    doc["coordinator"] = {"bucket": "scale-coordinator"}
    doc["clients"] = [{**c, "bucket": f"s3://scale-{c['id']}"} for c in doc["clients"]]
    doc["mlflow"] = {"model_name": "scale-model"}
    doc["simulation"] = {"source": "synthetic", "rows": 2000, "seed": 0}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scale.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _task_durations(rows) -> dict:
    """task_id -> seconds from the task instances' (task_id, start_date, end_date) rows."""
    from datetime import datetime

    def moment(value):
        if value is None or isinstance(value, datetime):
            return value
        return datetime.fromisoformat(str(value))

    out = {}
    for task_id, start, end in rows:
        start, end = moment(start), moment(end)
        if start is not None and end is not None:
            out[task_id] = round((end - start).total_seconds(), 3)
    return out


def _run_figures(conn, dag_id: str, run_id: str | None = None) -> dict:
    """The run's start-to-end and its tasks' durations, from the metadata DB (a DB-API connection)."""
    from datetime import datetime

    cur = conn.cursor()
    param = "?" if conn.__class__.__module__.startswith("sqlite3") else "%s"
    if run_id is None:
        cur.execute(f"SELECT run_id FROM dag_run WHERE dag_id = {param} ORDER BY id DESC LIMIT 1", (dag_id,))
        run_id = cur.fetchone()[0]
    cur.execute(f"SELECT state, start_date, end_date, queued_at FROM dag_run WHERE dag_id = {param} AND run_id = {param}",
                (dag_id, run_id))
    state, start, end, queued = cur.fetchone()
    cur.execute(f"SELECT task_id, start_date, end_date, state FROM task_instance WHERE dag_id = {param} "
                f"AND run_id = {param}", (dag_id, run_id))
    found = cur.fetchall()
    tasks = _task_durations([row[:3] for row in found])
    decision = sorted(row[0] for row in found if row[0] in ("promote", "rollback") and str(row[3]) == "success")
    ran = {row[0] for row in found if str(row[3]) != "skipped"}

    def moment(value):
        return value if value is None or isinstance(value, datetime) else datetime.fromisoformat(str(value))

    start, end, queued = moment(start), moment(end), moment(queued)
    return {"run_id": run_id, "state": str(state), "decision": decision, "run_seconds": (end - start).total_seconds() if end and start else None,
            "queued_to_end_seconds": (end - queued).total_seconds() if end and queued else None,
            "tasks": {t: tasks[t] for t in ROUND_TASKS if t in tasks and t in ran}, "task_seconds_sum": round(sum(v for t, v in tasks.items() if t in ran), 3)}


def _overhead_dags_test(rounds: int, state: Path, poll_seconds: float, profile: Path | None = None) -> list[dict]:
    import sqlite3

    from devstack.embedded import S3Server, airflow, create_buckets, service_env
    from fl_tasks.config import load_federation
    from fl_tasks.protocol import signing
    from fl_tasks.protocol.storage import ObjectStore

    federations = state / "federations"
    path = _benchmark_federation(federations, REPO / "federations" / "banks.yaml")
    spec = load_federation(path)
    s3 = S3Server(state / "logs" / "s3.log").start()
    silos = None
    try:
        env = service_env(state, s3.endpoint_url, federations)
        keys = signing.generate_keys(c.id for c in spec.clients)
        env.update(signing.coordinator_env(spec, keys))
        os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
        create_buckets(spec, ObjectStore(s3.endpoint_url))
        migrated = airflow(["db", "migrate"], env, log_path=state / "logs" / "airflow-db.log")
        if migrated.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed; see {state / 'logs' / 'airflow-db.log'}")
        silos = InstantSilos(spec, s3.endpoint_url, keys, poll_seconds).start()
        results = []
        for number in range(1, rounds + 1):
            log = state / "logs" / f"round-{number}.log"
            started = time.monotonic()
            if profile is None:
                done = airflow(["dags", "test", spec.dag_id], env, log_path=log)
            else:  # cProfile of the whole `airflow dags test` process, one file per round
                profile.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as out:
                    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile / f"round-{number}.prof"),
                                           str(Path(sys.executable).with_name("airflow")), "dags", "test", spec.dag_id],
                                          env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, timeout=900)
            wall = time.monotonic() - started
            with sqlite3.connect(state / "airflow" / "airflow.db") as conn:
                figures = _run_figures(conn, spec.dag_id)
            figures.update({"round": number, "wall_seconds": round(wall, 3), "returncode": done.returncode})
            print(f"  dags test round {number}: {wall:.1f}s wall, run {figures['run_seconds']:.1f}s, "
                  f"{figures['state']}: {figures['tasks']}", flush=True)
            results.append(figures)
        return results
    finally:
        if silos is not None:
            silos.stop()
        s3.stop()


def _overhead_scheduler(rounds: int, state: Path, poll_seconds: float) -> list[dict]:
    import urllib.request

    import psycopg2

    from devstack.localstack import LocalStack
    from fl_tasks.config import load_federation

    federations = state.parent / "scheduler-federations"
    path = _benchmark_federation(federations, REPO / "federations" / "banks.yaml")
    spec = load_federation(path)
    stack = LocalStack(state, federations, no_silos=(spec.federation,))
    from devstack.embedded import free_port

    stack.ports = {name: free_port() for name in stack.ports}
    results = []
    try:
        started = time.monotonic()
        stack.up()
        print(f"  stack up in {time.monotonic() - started:.0f}s", flush=True)
        keys = {c.id: stack.signing_keys()[spec.security.conn_id(spec.federation, c.id)] for c in spec.clients}
        silos = InstantSilos(spec, stack.s3_url, keys, poll_seconds).start()

        def call(method: str, route: str, body: dict | None = None, token: str | None = None):
            request = urllib.request.Request(f"{stack.airflow_url}{route}", method=method,
                                             data=None if body is None else json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            if token:
                request.add_header("Authorization", f"Bearer {token}")
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")

        token = call("POST", "/auth/token", {"username": "admin", "password": stack.password()})["access_token"]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # the dag-processor's first parse
            try:
                call("GET", f"/api/v2/dags/{spec.dag_id}", token=token)
                break
            except urllib.error.HTTPError:
                time.sleep(1)
        call("PATCH", f"/api/v2/dags/{spec.dag_id}", {"is_paused": False}, token=token)
        conn = psycopg2.connect(stack.postgres.url("airflow").replace("postgresql+psycopg2", "postgresql"))
        conn.autocommit = True
        try:
            for number in range(1, rounds + 1):
                t0 = time.monotonic()
                run = call("POST", f"/api/v2/dags/{spec.dag_id}/dagRuns", {"logical_date": None}, token=token)
                while True:
                    got = call("GET", f"/api/v2/dags/{spec.dag_id}/dagRuns/{run['dag_run_id']}", token=token)
                    if got["state"] in ("success", "failed"):
                        break
                    time.sleep(0.25)
                wall = time.monotonic() - t0
                figures = _run_figures(conn, spec.dag_id, run["dag_run_id"])
                figures.update({"round": number, "trigger_to_end_seconds": round(wall, 3)})
                print(f"  scheduler round {number}: {wall:.1f}s trigger to end, run {figures['run_seconds']:.1f}s, "
                      f"{figures['state']}: {figures['tasks']}", flush=True)
                results.append(figures)
        finally:
            conn.close()
            silos.stop()
    finally:
        stack.down()
    return results


_FLOOR_DAG = '''
from datetime import datetime
from airflow.sdk import chain, dag, task


@dag(dag_id="floor", schedule=None, start_date=datetime(2024, 1, 1), catchup=False)
def floor():
    @task
    def step():
        return "x"

    @task.branch
    def branch():
        return "promote"

    @task(task_id="promote")
    def promote():
        return "x"

    @task(task_id="rollback")
    def rollback():
        return "x"

    chain(*[step.override(task_id=f"step_{i}")() for i in range(10)], branch(), [promote(), rollback()],
          step.override(task_id="summary", trigger_rule="all_done")())


floor()
'''


def _airflow_floor_dags_test(rounds: int, state: Path) -> list[dict]:
    """Airflow's own cost of a round's shape under `airflow dags test`: 13 no-op tasks (ten in
    a chain, a branch, two branches, a last task), no S3, no MLflow, no imports of ours."""
    import sqlite3

    from devstack.embedded import airflow, service_env

    dags = state / "dags"
    dags.mkdir(parents=True)
    (dags / "floor.py").write_text(_FLOOR_DAG)
    env = {**service_env(state, "http://127.0.0.1:1", state / "no-federations"),
           "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    (state / "logs").mkdir(parents=True, exist_ok=True)
    if airflow(["db", "migrate"], env, log_path=state / "logs" / "airflow-db.log").returncode != 0:
        raise RuntimeError(f"airflow db migrate failed; see {state / 'logs'}")
    results = []
    for number in range(1, rounds + 1):
        started = time.monotonic()
        airflow(["dags", "test", "floor"], env, log_path=state / "logs" / f"floor-{number}.log")
        wall = time.monotonic() - started
        with sqlite3.connect(state / "airflow" / "airflow.db") as conn:
            figures = _run_figures(conn, "floor")
        figures.update({"round": number, "wall_seconds": round(wall, 3)})
        print(f"  airflow floor (13 no-op tasks) run {number}: {wall:.1f}s wall, run {figures['run_seconds']:.1f}s",
              flush=True)
        results.append(figures)
    return results


def _summarise(runs: list[dict], key: str, target: float | None) -> dict:
    later = runs[1:] or runs
    tasks = sorted({t for r in later for t in r["tasks"]}, key=lambda t: (t not in ROUND_TASKS, ROUND_TASKS.index(t)
                                                                           if t in ROUND_TASKS else 0, t))
    return {"rounds": runs, "first_round_seconds": runs[0][key],
            "later_rounds_median_seconds": statistics.median(r[key] for r in later),
            # The DAG run alone (its first task's start to its last task's end, from the metadata
            # DB): under `dags test`, without the CLI's own start-up and DAG parse.
            "later_rounds_run_median_seconds": statistics.median(r["run_seconds"] for r in later),
            "later_rounds_task_median_seconds": {t: statistics.median(r["tasks"].get(t, 0.0) for r in later)
                                                 for t in tasks},
            "all_succeeded": all(r["state"] == "success" for r in runs),
            "target_at_most": target,
            "met": None if target is None else statistics.median(r[key] for r in later) <= target}


def round_overhead(rounds: int = 3, modes: tuple[str, ...] = ("dags_test", "floor", "scheduler"),
                   poll_seconds: float = 0.2, profile: Path | None = None, state_dir: Path | None = None) -> dict:
    """One round's orchestration time with instant clients, per mode; the first round (which
    also creates the MLflow store's tables and the registered model) apart from the median of
    the later ones."""
    out = {}
    root = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="fl-scale-overhead-"))
    if state_dir and root.exists():
        shutil.rmtree(root)
    try:
        if "dags_test" in modes:
            runs = _overhead_dags_test(rounds, root / "dags-test", poll_seconds, profile)
            out["dags_test"] = _summarise(runs, "wall_seconds", TARGETS["round_overhead_dags_test_seconds_at_most"])
        if "floor" in modes:
            runs = _airflow_floor_dags_test(rounds, root / "floor")
            out["airflow_floor_dags_test"] = _summarise(runs, "wall_seconds", None)
            if "dags_test" in out:  # measured side by side: the ratio holds across machines, the seconds do not
                out["dags_test"]["run_over_airflow_floor"] = round(
                    out["dags_test"]["later_rounds_run_median_seconds"]
                    / out["airflow_floor_dags_test"]["later_rounds_run_median_seconds"], 2)
        if "scheduler" in modes:
            runs = _overhead_scheduler(rounds, root / "stack", poll_seconds)
            out["scheduler"] = _summarise(runs, "trigger_to_end_seconds",
                                          TARGETS["round_overhead_scheduler_seconds_at_most"])
    finally:
        if not state_dir:
            shutil.rmtree(root, ignore_errors=True)
    return out


# --- main -----------------------------------------------------------------------------------

def rss_mb() -> float:
    """This process's resident memory now (MB), from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRss:
    """The highest RSS sampled (every 20 ms) while a block runs."""

    def __init__(self) -> None:
        self.value, self.stop = 0.0, threading.Event()

    def __enter__(self) -> "PeakRss":
        self.value = rss_mb()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop.wait(0.02):
            self.value = max(self.value, rss_mb())

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.value = max(self.value, rss_mb())


class StepClock:
    """Each step's wall time, its peak RSS and that peak's growth over the RSS it started with."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.seconds: dict[str, float] = {}
        self.peak_rss: dict[str, float] = {}
        self.growth: dict[str, float] = {}

    def step(self, name: str, work):
        with PeakRss() as peak:
            before = peak.value
            started = time.perf_counter()
            result = work()
            self.seconds[name] = round(time.perf_counter() - started, 3)
        self.peak_rss[name], self.growth[name] = round(peak.value, 1), round(peak.value - before, 1)
        print(f"[scale] {self.part}: {name} {self.seconds[name]} s, peak RSS {self.peak_rss[name]} MB "
              f"(+{self.growth[name]})", flush=True)
        return result


@contextmanager
def loopback_s3(state_dir: Path | None, prefix: str) -> Iterator[Path]:
    """A moto S3 server on loopback (objects over 1 MiB kept on disk) and a SQLite MLflow
    store in a work folder (`state_dir`, kept; else a temporary one, removed), with this
    process's S3 and MLflow settings pointing at them until the block ends."""
    from devstack.embedded import S3Server

    folder = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix=prefix))
    folder.mkdir(parents=True, exist_ok=True)
    names = ("FL_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
             "MLFLOW_TRACKING_URI", "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 20)
    try:
        with S3Server(folder / "moto.log") as server:
            os.environ.update({"FL_S3_ENDPOINT_URL": server.endpoint_url, "AWS_ACCESS_KEY_ID": "bench",
                               "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                               "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"})
            yield folder
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if not state_dir:
            shutil.rmtree(folder, ignore_errors=True)


def bench_federation(folder: Path, name: str, clients: list[tuple[str, str]], parameters: int, aggregation,
                     quorum: dict) -> tuple[Any, int]:
    """A federation file in `folder` for the fraud model widened to about `parameters`
    parameters (hidden width h: h^2 + 32h + 1), with these (client id, bucket URI) pairs: the
    federation it loads as, and the model's exact parameter count."""
    import yaml

    from fl_tasks.config import load_federation
    from tests.conftest import federation_doc

    width = int((-32 + math.sqrt(32 ** 2 + 4 * max(parameters - 1, 1))) / 2)
    doc = federation_doc(len(clients), federation=name, aggregation=aggregation, quorum=quorum,
                         task={"entrypoint": "fl_tasks.tasks.fraud:FraudTask",
                               "params": {"hidden": [width, width], "batch_norm": False}, "seed": 3})
    doc["coordinator"] = {"bucket": f"{name}-coordinator"}
    doc["clients"] = [{"id": client_id, "bucket": bucket} for client_id, bucket in clients]
    doc["evaluation"]["coordinator_data"] = f"s3://{name}-coordinator/{name}/holdout/validation.parquet"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_federation(path), (width + 32) * width + 1


def many_silos(silos: int = 1000, parameters: int = 1_000_000, shared_bucket: bool = True,
               state_dir: Path | None = None) -> dict:
    """One round's dispatch -> quorum polls -> close -> screening and FedAvg for `silos` fake
    silos of a model of about `parameters` float32 parameters, against a loopback moto S3
    server, through the real code: `Coordinator.dispatch`, the quorum trigger's
    `AnswerWatcher` (S3 requests counted as they are sent, per poll: before any answer, the
    first poll with every answer in, a poll with nothing new) and `QuorumTrigger.run` to its
    event, `check_quorum` + `close_round`, `aggregate`. The silos' updates (base + noise,
    fp32 safetensors) and manifests are written straight through the protocol functions,
    concurrently. With `shared_bucket` every silo holds a prefix of one bucket (the trigger
    lists it); otherwise each has its own (HEADs). Returns the wall time of each step, the
    requests per poll and this process's peak RSS during each step (sampled from
    /proc/self/status) and overall (getrusage). Moto keeps objects over 1 MiB on disk
    (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE): the full size writes about 3 x silos x model bytes.
    """
    import asyncio
    import resource
    from collections import Counter

    from devstack.embedded import create_buckets

    clock = StepClock("many_silos")
    seconds, peak_rss, growth, requests = clock.seconds, clock.peak_rss, clock.growth, {}
    step = clock.step

    with loopback_s3(state_dir, "fl-many-silos-") as folder:
        if str(REPO / "plugins") not in sys.path:  # as Airflow puts its plugins folder on the path
            sys.path.insert(0, str(REPO / "plugins"))
        from fl_airflow import answers as watcher
        from fl_airflow.triggers import QuorumTrigger

        from fl_tasks import protocol
        from fl_tasks.coordinator import Coordinator, RunContext, pools
        from tests.fl_tasks.coordinator.test_many_silos import fake_updates

        buckets = [(f"silo-{i:04d}", f"s3://many-silos/silo-{i:04d}" if shared_bucket else f"s3://many-{i:04d}")
                   for i in range(silos)]
        spec, count = bench_federation(folder, "many", buckets, parameters, "fedavg",
                                       {"min_clients": 2, "round_timeout_minutes": 60, "poll_interval_seconds": 1})
        coordinator = Coordinator(spec)
        step("create_buckets", lambda: create_buckets(spec, coordinator.store))
        round_id = step("prepare", lambda: coordinator.prepare(RunContext(run_id="many-silos")))
        model_bytes = coordinator.load_plan(round_id).base_bytes
        step("dispatch", lambda: coordinator.dispatch(round_id))

        kind = protocol.ANSWER_KINDS["update"]
        clients = {c.id: {"bucket": c.bucket_name,  # as QuorumSensor.execute defers
                          "answer_key": kind.answer_key(c.prefix, spec.federation, round_id),
                          "decline_key": kind.decline_key(c.prefix, spec.federation, round_id),
                          "aws_conn_id": None, "endpoint_url": None,
                          "federation_endpoint_url": spec.endpoint_url,
                          "signing_conn_id": spec.security.conn_id(spec.federation, c.id)} for c in spec.clients}
        awaited = coordinator.awaited(round_id, "update")
        trigger = QuorumTrigger(round_id=round_id, federation=spec.federation, clients=clients,
                                deadline=awaited.deadline, required=awaited.required, poll_interval=1.0)

        async def polls(names: list[str], between=None) -> dict:
            out = {}
            async with watcher.AnswerWatcher(trigger) as answers:
                sent = Counter()

                def count(event_name: str, **kwargs) -> None:
                    sent[event_name.rsplit(".", 1)[-1]] += 1

                for s3 in answers.stores.values():
                    s3._client.meta.events.register("before-send.s3", count)
                for name in names:
                    if between and name in between:
                        await asyncio.to_thread(between[name])
                    sent.clear()
                    started = time.perf_counter()
                    poll = await answers.poll()
                    out[name] = {"seconds": round(time.perf_counter() - started, 3), "requests": sum(sent.values()),
                                 **dict(sent), "committed": len(poll.committed), "problems": len(poll.problems)}
            return out

        publish = lambda: fake_updates(coordinator, spec, round_id)  # noqa: E731
        # The fake silos answer between the first and the second poll (the step's time is theirs).
        requests.update(step("quorum_polls_and_silos", lambda: asyncio.run(polls(
            ["poll_before_answers", "poll_all_answered", "poll_nothing_new"],
            between={"poll_all_answered": lambda: step("silos_publish_updates", publish)}))))

        async def first_event():
            async for event in trigger.run():
                return event.payload

        event = step("quorum_trigger_to_event", lambda: asyncio.run(first_event()))
        decision = step("check_quorum", lambda: coordinator.check_quorum(round_id))
        step("close_round", lambda: coordinator.close_round(round_id, decision))
        summary = step("aggregate", lambda: coordinator.aggregate(round_id))
        return {"silos": silos, "parameters": count, "model_mb": round(model_bytes / 2 ** 20, 2),
                "bucket_layout": "shared bucket, one prefix per silo" if shared_bucket else "one bucket per silo",
                "aggregator": "fedavg", "seconds": seconds, "requests_per_poll": requests,
                "trigger_event": {"state": event["state"], "committed": len(event["committed"])},
                "accepted": len(summary["accepted"]), "rejected": len(summary["rejected"]),
                "candidate_sha256": summary["candidate_sha256"], "peak_rss_mb": peak_rss,
                "peak_rss_growth_mb": growth,  # the step's peak over the RSS it started with
                "peak_rss_mb_overall": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "settings": {"silo_workers": pools.SILO_WORKERS, "read_ahead": pools.READ_AHEAD,
                             "trigger_concurrent_reads": watcher.CONCURRENT_READS,
                             "list_saving": watcher.LIST_SAVING}}


def large_model(silos: int = 10, parameters: int = 100_000_000, shards: int = 4, strategy: str = "weighted_median",
                state_dir: Path | None = None) -> dict:
    """One round of `silos` updates of a model of about `parameters` float32 parameters
    against a loopback moto S3 server, aggregated in `shards` shards and unsharded, through
    the real coordinator code. Sharded: the aggregate step (fetch each update from its silo,
    keep the snapshot, screen, one at a time), then shard_statistics and aggregate_shard for
    each shard one after another, as the mapped tasks would run, each reading its byte ranges
    of every snapshot, then assemble_candidate. Unsharded: the same screening and aggregation
    as the unsharded aggregate step (`CandidateBuilder.build`), over the snapshots the round
    kept (their fetch from the silos is in the sharded figures). Returns each step's wall time
    and peak RSS (and its growth over the step's start, also in models), and whether the two
    candidates are the same bytes."""
    from devstack.embedded import create_buckets

    clock = StepClock("large")
    step = clock.step
    with loopback_s3(state_dir, "fl-large-") as folder:
        from fl_tasks.coordinator import Coordinator, RunContext
        from tests.fl_tasks.coordinator.test_many_silos import fake_updates

        buckets = [(f"silo-{i:02d}", f"s3://large-silos/silo-{i:02d}") for i in range(silos)]
        spec, count = bench_federation(folder, "large", buckets, parameters, {"strategy": strategy, "shards": shards},
                                       {"min_clients": 2, "round_timeout_minutes": 60})
        coordinator = Coordinator(spec)
        step("create_buckets", lambda: create_buckets(spec, coordinator.store))
        round_id = step("prepare", lambda: coordinator.prepare(RunContext(run_id="large")))
        step("dispatch", lambda: coordinator.dispatch(round_id))
        step("silos_publish_updates", lambda: fake_updates(coordinator, spec, round_id, workers=2))
        decision = coordinator.check_quorum(round_id)
        closed = step("close_round", lambda: coordinator.close_round(round_id, decision))
        step("sharded.aggregate_screens", lambda: coordinator.aggregate(round_id))
        for k in range(shards):
            step(f"sharded.shard_statistics.{k}", lambda: coordinator.shard_statistics(round_id, k))
        for k in range(shards):
            step(f"sharded.aggregate_shard.{k}", lambda: coordinator.aggregate_shard(round_id, k))
        sharded = step("sharded.assemble_candidate", lambda: coordinator.assemble_candidate(round_id))
        plan = coordinator.load_plan(round_id)
        committed = {c: closed["answers"][c] for c in closed["committed"]}
        unsharded = step("unsharded.aggregate_from_snapshots", lambda: coordinator._builder(
            plan, closed["history"]).build(committed, None)).summary
        model_mb = plan.base_bytes / 2 ** 20
        return {"silos": silos, "parameters": count, "model_mb": round(model_mb, 1),
                "strategy": strategy, "shards": shards, "seconds": clock.seconds, "peak_rss_mb": clock.peak_rss,
                "peak_rss_growth_mb": clock.growth,
                "peak_rss_growth_in_models": {k: round(v / model_mb, 2) for k, v in clock.growth.items()},
                "accepted": len(sharded["accepted"]),
                "candidate_sha256": {"sharded": sharded["candidate_sha256"],
                                     "unsharded": unsharded["candidate_sha256"]},
                "same_candidate": sharded["candidate_sha256"] == unsharded["candidate_sha256"]}

PARTS = ("parse", "overhead", "many_silos", "large")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="parse,overhead", help=f"comma-separated parts of {','.join(PARTS)}")
    parser.add_argument("--rounds", type=int, default=3, help="overhead: rounds per mode")
    parser.add_argument("--modes", default="dags_test,floor,scheduler",
                        help="overhead: dags_test, floor (Airflow's own cost of 13 no-op tasks under dags test), "
                             "scheduler")
    parser.add_argument("--parse-repeats", type=int, default=7)
    parser.add_argument("--silos", type=int, default=1000, help="many_silos: how many silos")
    parser.add_argument("--parameters", type=int, default=1_000_000,
                        help="many_silos: float32 parameters of the model")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--state-dir", help="overhead: keep the rounds' state (logs, stores) in this folder")
    parser.add_argument("--profile", help="overhead, dags_test: write a cProfile of each round into this folder")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    output = Path(args.output)
    results = json.loads(output.read_text()) if output.exists() else {"benchmark": "scale"}
    results["targets"] = TARGETS
    runners = {"parse": lambda: dag_parse(args.parse_repeats),
               "overhead": lambda: round_overhead(args.rounds, tuple(m.strip() for m in args.modes.split(",")),
                                                  profile=Path(args.profile) if args.profile else None,
                                                  state_dir=Path(args.state_dir) if args.state_dir else None),
               "many_silos": lambda: many_silos(args.silos, args.parameters), "large": large_model}
    written = []
    for part in parts:
        runner = runners[part]
        print(f"[scale] {part}", flush=True)
        measured_on = results["machine"] = machine()  # the file's machine: that of its latest part
        figures = runner()
        if part == "overhead":
            for mode in figures.values():
                mode["machine"] = measured_on
            if isinstance(results.get("overhead"), dict):
                figures = {**results["overhead"], **figures}  # one mode run now keeps the other's figures
        else:
            figures["machine"] = measured_on
        key = part
        if part == "many_silos" and (args.silos, args.parameters) != (1000, 1_000_000):
            key = f"many_silos_{args.silos}x{args.parameters}"  # the default size's figures stay
        results[key] = figures
        written.append(key)
    output.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    print(json.dumps({key: results[key] for key in written}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
