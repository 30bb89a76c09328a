"""`fl-simulate`: N silos as separate `fl-client` processes over a partitioned real dataset.

The coordinator's validation/test share is held out first; the rest is split non-IID across
the federation's clients (Dirichlet over labels: the fraud data has no natural region
column), one .npz per silo, and each silo runs as its own process.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fl_tasks import signing
from fl_tasks.behaviours import BEHAVIOURS
from fl_tasks.config import ConfigError, FederationSpec, load_federation
from fl_tasks.datasets import dirichlet_partition, holdout_split, load_dataset


def prepare_silos(spec: FederationSpec, state_dir: Path, alpha: float = 0.5,
                  size_alpha: float | None = 5.0) -> dict[str, Path]:
    """Write each client's rows to <state_dir>/silos/<client>.npz; returns the paths."""
    table = load_dataset(spec.data.dataset, seed=spec.data.seed, synthetic_rows=spec.data.synthetic_rows)
    pool, _, _ = holdout_split(table, seed=spec.data.seed)
    parts = dirichlet_partition(pool.y, len(spec.clients), alpha=alpha, seed=spec.data.seed,
                                min_rows=min(500, len(pool) // (4 * len(spec.clients))), majority_alpha=size_alpha)
    folder = state_dir / "silos"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for client, index in zip(spec.clients, parts):
        path = folder / f"{client.id}.npz"
        silo = pool.take(index)
        silo.save(path)
        paths[client.id] = path
        print(f"silo {client.id}: {len(silo)} rows, {int(silo.y.sum())} frauds ({silo.y.mean():.3%})", flush=True)
    return paths


class SiloProcesses:
    """Start one `fl-client` process per silo; stop them all on exit (also on Ctrl-C)."""

    def __init__(self, spec: FederationSpec, silo_paths: dict[str, Path], log_dir: Path,
                 behaviours: dict[str, str] | None = None, delay_seconds: float = 0.0, poll_seconds: float = 1.0,
                 extra_args: list[str] | None = None, signing_keys: dict[str, str] | None = None):
        """`signing_keys`: client id -> its key (FL_SIGNING_KEY of that silo's process);
        default: the FL_SIGNING_KEY_<CLIENT_ID> variables that are set."""
        self.spec, self.paths, self.log_dir = spec, silo_paths, log_dir
        self.signing_keys = signing_keys if signing_keys is not None else env_signing_keys(spec)
        self.behaviours = behaviours or {}
        self.delay_seconds, self.poll_seconds = delay_seconds, poll_seconds
        self.extra_args = extra_args or []
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self) -> "SiloProcesses":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for client in self.spec.clients:
            cmd = [sys.executable, "-m", "fl_tasks.client", "--client-id", client.id,
                   "--federation", self.spec.federation, "--bucket", client.bucket,
                   "--data", str(self.paths[client.id]), "--poll-seconds", str(self.poll_seconds),
                   "--behaviour", self.behaviours.get(client.id, "honest"),
                   "--delay-seconds", str(self.delay_seconds), *self.extra_args]
            if self.spec.endpoint_url:
                cmd += ["--endpoint-url", self.spec.endpoint_url]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            env.pop("FL_SIGNING_KEY", None)  # never one key for every silo
            if self.signing_keys.get(client.id):
                env["FL_SIGNING_KEY"] = self.signing_keys[client.id]
            log = open(self.log_dir / f"{client.id}.log", "ab")
            self.procs[client.id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            log.close()
        return self

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
    paths = prepare_silos(spec, state_dir, args.alpha, args.size_alpha)
    keys = simulation_keys(spec, state_dir)
    silos = SiloProcesses(spec, paths, state_dir / "logs", behaviours, args.delay_seconds,
                          signing_keys=keys).start()
    print(f"{len(paths)} silos running; logs in {state_dir / 'logs'}; Ctrl-C stops them", flush=True)
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
