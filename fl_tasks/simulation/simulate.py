"""`fl-simulate`: N silos as separate agent processes over a partitioned data set.

The data set is the federation task's example data (`Task.example_data`, chosen by the
federation file's `simulation` section). A share is held out first: half stands in for the
coordinator's own rows (written where `evaluation.coordinator_data` points, when a federation
has any), half a referee test set no gate sees. The rest is split non-IID across the federation's clients (Dirichlet
over labels), one Parquet file per silo with exactly the data contract's columns, and each
silo runs as its own process, with its own state directory (drift reference windows and
reports) under <state_dir>/silo-state/<client>.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dataclasses import dataclass

from fl_tasks.config import ConfigError, FederationSpec, load_federation
from fl_tasks.protocol import signing
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.simulation.attacks import BEHAVIOURS
from fl_tasks.simulation.datasets import dirichlet_partition, holdout_split, label_codes


@dataclass(frozen=True)
class SimulatedData:
    silos: dict[str, Path]  # client id -> its rows (Parquet)
    validation: Path  # the coordinator's own rows for the gates
    test: Path  # the referee's rows: seen by no gate, for the demo's closing comparison


def prepare_silos(spec: FederationSpec, state_dir: Path, alpha: float = 0.5,
                  size_alpha: float | None = 5.0) -> SimulatedData:
    """Write each client's rows to <state_dir>/silos/<client>.parquet, and the hold-out rows
    next to them; print one line per silo (rows, label rate)."""
    task = spec.load_task()
    sim = spec.simulation
    frame = task.example_data(sim.source, sim.rows, sim.seed)
    frame = frame[spec.contract.columns].reset_index(drop=True)
    labels = label_codes(frame, spec.contract)
    pool, validation, test = holdout_split(labels, seed=sim.seed)
    parts = dirichlet_partition(labels[pool], len(spec.clients), alpha=alpha, seed=sim.seed,
                                min_rows=min(500, len(pool) // (4 * len(spec.clients))), majority_alpha=size_alpha)
    folder = state_dir / "silos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for client, index in zip(spec.clients, parts):
        paths[client.id] = write_rows(frame.iloc[pool[index]], folder / f"{client.id}.parquet")
        rate = float((labels[pool[index]] == 1).mean())
        print(f"silo {client.id}: {len(index)} rows, label 1 in {rate:.3%}", flush=True)
    return SimulatedData(paths, write_rows(frame.iloc[validation], state_dir / "validation.parquet"),
                         write_rows(frame.iloc[test], state_dir / "test.parquet"))


def write_rows(rows, path: Path) -> Path:
    """Parquet written whole or not at all."""
    tmp = path.with_suffix(".tmp.parquet")
    rows.reset_index(drop=True).to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def publish_validation(spec: FederationSpec, data: SimulatedData, store: ObjectStore) -> None:
    """Stand in for the coordinator's own rows: put the simulated hold-out where the
    federation's `evaluation.coordinator_data` points (when that is in S3; a local path is
    written by prepare_silos' caller). Nothing when the federation has no coordinator data."""
    uri = spec.evaluation.coordinator_data
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        store.put_bytes(bucket, key, data.validation.read_bytes())


class SiloProcesses:
    """Start one `fl-client` process per silo; stop them all on exit (also on Ctrl-C)."""

    def __init__(self, spec: FederationSpec, silo_paths: dict[str, Path], log_dir: Path,
                 behaviours: dict[str, str] | None = None, delay_seconds: float = 0.0, poll_seconds: float = 1.0,
                 extra_args: list[str] | None = None, signing_keys: dict[str, str] | None = None,
                 data_args: dict[str, list[str]] | None = None, state_dir: Path | None = None):
        """`signing_keys`: client id -> its key (FL_SIGNING_KEY of that silo's process);
        default: the FL_SIGNING_KEY_<CLIENT_ID> variables that are set. `data_args`: client id
        -> the data source arguments of that silo (e.g. a database URL and --sql-table)
        instead of its file in `silo_paths`. `state_dir`: each silo keeps its drift state in
        <state_dir>/<client> (default: silo-state next to `log_dir`), never in the home
        directory every simulated silo would share."""
        self.spec, self.paths, self.log_dir = spec, silo_paths, log_dir
        self.state_dir = Path(state_dir) if state_dir is not None else Path(log_dir).parent / "silo-state"
        self.signing_keys = signing_keys if signing_keys is not None else env_signing_keys(spec)
        self.behaviours = dict(behaviours or {})
        self.delay_seconds, self.poll_seconds = delay_seconds, poll_seconds
        self.extra_args = extra_args or []
        self.data_args = data_args or {}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> "SiloProcesses":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for client in self.spec.clients:
            self._start(client.id)
        return self

    def restart(self, client_id: str, behaviour: str) -> None:
        """Stop one silo's process and start it again with another behaviour."""
        proc = self.procs.pop(client_id)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.behaviours[client_id] = behaviour
        self._start(client_id)

    def _start(self, client_id: str) -> None:
        client = self.spec.client(client_id)
        behaviour = self.behaviours.get(client.id, "honest")
        # Honest silos run the production agent; simulated behaviours wrap it.
        module = ["fl_tasks.silo.agent"] if behaviour == "honest" else \
            ["fl_tasks.simulation.attacks", "--behaviour", behaviour, "--delay-seconds", str(self.delay_seconds)]
        cmd = [sys.executable, "-m", *module, "--client-id", client.id,
               "--federation", self.spec.federation, "--bucket", client.bucket,
               *self.data_args.get(client.id, ["--data", str(self.paths.get(client.id))]),
               "--poll-seconds", str(self.poll_seconds), "--state-dir", str(self.state_dir / client.id),
               *self.extra_args]
        if self.spec.endpoint_url:
            cmd += ["--endpoint-url", self.spec.endpoint_url]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("FL_SIGNING_KEY", None)  # never one key for every silo
        if self.signing_keys.get(client.id):
            env["FL_SIGNING_KEY"] = self.signing_keys[client.id]
        log = open(self.log_dir / f"{client.id}.log", "ab")
        self.procs[client.id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> "SiloProcesses":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def env_signing_keys(spec: FederationSpec) -> dict[str, str]:
    """The clients' keys found in FL_SIGNING_KEY_<CLIENT_ID> variables."""
    return {c.id: os.environ[signing.env_var_for(c.id)] for c in spec.clients
            if os.environ.get(signing.env_var_for(c.id))}


def simulation_keys(spec: FederationSpec, state_dir: Path) -> dict[str, str]:
    """Keys from the environment; when the federation requires signatures, missing ones are
    generated and written, with the matching Airflow connections, to <state_dir>/signing-keys.env
    for the coordinator (`set -a; . signing-keys.env`)."""
    keys = env_signing_keys(spec)
    missing = [c.id for c in spec.clients if c.id not in keys]
    if not spec.security.require_signatures or not missing:
        return keys
    keys.update(signing.generate_keys(missing))
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "signing-keys.env"
    signing.write_private(path, "".join(f"{name}='{value}'\n"
                                        for name, value in signing.coordinator_env(spec, keys).items()))
    print(f"generated signing keys for {', '.join(missing)}; the coordinator's copy is in {path}", flush=True)
    return keys


def _parse_behaviours(items: list[str], spec: FederationSpec) -> dict[str, str]:
    behaviours = {}
    for item in items:
        client_id, _, behaviour = item.partition("=")
        if client_id not in {c.id for c in spec.clients} or behaviour not in BEHAVIOURS:
            raise ValueError(f"--behaviour {item!r}: expected CLIENT=BEHAVIOUR with a client of "
                             f"{spec.federation} and one of {', '.join(BEHAVIOURS)}")
        behaviours[client_id] = behaviour
    return behaviours


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-simulate", description=__doc__.splitlines()[0])
    parser.add_argument("federation_file", help="federation YAML, e.g. federations/banks.yaml")
    parser.add_argument("--state-dir", default=".state/simulate", help="where silo data and logs go")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="Dirichlet concentration of the label split (smaller = more skew)")
    parser.add_argument("--size-alpha", type=float, default=5.0,
                        help="Dirichlet concentration of the silo sizes (majority class)")
    parser.add_argument("--behaviour", action="append", default=[], metavar="CLIENT=BEHAVIOUR",
                        help=f"per-silo behaviour, one of {', '.join(BEHAVIOURS)}")
    parser.add_argument("--delay-seconds", type=float, default=30.0, help="how long stragglers wait")
    args = parser.parse_args(argv)
    try:
        spec = load_federation(args.federation_file)
        behaviours = _parse_behaviours(args.behaviour, spec)
    except (ConfigError, ValueError) as exc:
        print(f"fl-simulate: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir)
    data = prepare_silos(spec, state_dir, args.alpha, args.size_alpha)
    publish_validation(spec, data, ObjectStore(spec.endpoint_url))
    keys = simulation_keys(spec, state_dir)
    silos = SiloProcesses(spec, data.silos, state_dir / "logs", behaviours, args.delay_seconds,
                          signing_keys=keys, state_dir=state_dir / "silo-state").start()
    print(f"{len(data.silos)} silos running; logs in {state_dir / 'logs'}; Ctrl-C stops them", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(p.poll() is None for p in silos.procs.values()):
            time.sleep(1)
        failed = {c: p.returncode for c, p in silos.procs.items() if p.poll() is not None}
        print(f"fl-simulate: silo process exited: {failed}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        silos.stop()


if __name__ == "__main__":
    sys.exit(main())
