"""fl_tasks/simulation/simulate.py: simulated silos get disjoint Parquet files of exactly the
contract's columns, the coordinator its hold-out, and each silo its own process: honest ones
the production agent, the others the attacking agent that wraps it."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from fl_tasks.config import parse_federation
from fl_tasks.simulation import simulate
from fl_tasks.simulation.simulate import SiloProcesses, prepare_silos, publish_validation

from tests.conftest import federation_doc


def spec_of(**overrides):
    return parse_federation(federation_doc(**overrides), "<test>")


def test_prepare_silos_partitions_the_example_data(tmp_path, capsys):
    spec = spec_of(simulation={"source": "synthetic", "rows": 3000, "seed": 5})
    data = prepare_silos(spec, tmp_path, alpha=1.0)
    assert set(data.silos) == {c.id for c in spec.clients}
    assert data.silos["silo-0"] == tmp_path / "silos" / "silo-0.parquet"
    frames = {client: pd.read_parquet(path) for client, path in data.silos.items()}
    validation, test = pd.read_parquet(data.validation), pd.read_parquet(data.test)
    for frame in [*frames.values(), validation, test]:
        assert list(frame.columns) == spec.contract.columns  # exactly the contract's columns
        assert spec.contract.check(frame) == []
    # Disjoint and complete: every generated row lands in exactly one place.
    everything = pd.concat([*frames.values(), validation, test])
    assert len(everything) == 3000 and not everything.duplicated().any()
    assert 0.15 < (len(validation) + len(test)) / 3000 < 0.25  # a fifth held out, half each
    assert abs(len(validation) - len(test)) <= 2
    assert set(validation["Class"]) == {False, True} and set(test["Class"]) == {False, True}
    assert [p.name for p in (tmp_path / "silos").iterdir() if "tmp" in p.name] == []
    out = capsys.readouterr().out
    assert all(f"silo {c.id}: {len(frames[c.id])} rows, label 1 in" in out for c in spec.clients)


def test_prepare_silos_is_seeded(tmp_path):
    spec = spec_of(simulation={"source": "synthetic", "rows": 2000, "seed": 1})
    a = prepare_silos(spec, tmp_path / "a", alpha=0.5)
    b = prepare_silos(spec, tmp_path / "b", alpha=0.5)
    for client in a.silos:
        pd.testing.assert_frame_equal(pd.read_parquet(a.silos[client]), pd.read_parquet(b.silos[client]))


def test_prepare_silos_names_unknown_example_data(tmp_path):
    with pytest.raises(ValueError, match="unknown example data 'mnist'"):
        prepare_silos(spec_of(simulation={"source": "mnist"}), tmp_path)


def test_the_validation_rows_go_where_the_federation_file_says(s3_server, tmp_path):
    from devstack.embedded import create_buckets
    from fl_tasks.protocol.storage import ObjectStore

    spec = spec_of(simulation={"source": "synthetic", "rows": 1000, "seed": 2})
    store = ObjectStore(s3_server.endpoint_url)
    create_buckets(spec, store)
    data = prepare_silos(spec, tmp_path)
    publish_validation(spec, data, store)
    key = f"{spec.federation}/holdout/validation.parquet"
    assert spec.evaluation.coordinator_data == f"s3://{spec.coordinator_bucket}/{key}"
    assert store.get_bytes(spec.coordinator_bucket, key) == data.validation.read_bytes()
    # A local validation file is left to the caller, and without coordinator data nothing goes to S3.
    for evaluation in ({"coordinator_data": str(tmp_path / "mine.parquet")},
                       {"coordinator_data": "", "federated": True}):
        other = spec_of(evaluation=evaluation)
        publish_validation(other, data, store)
        assert not store.exists(other.coordinator_bucket, f"{other.federation}/holdout/validation.parquet")


class FakePopen:
    started: list["FakePopen"] = []

    def __init__(self, cmd, stdout=None, stderr=None, env=None):
        self.cmd, self.env, self.returncode = cmd, env, None
        FakePopen.started.append(self)

    def poll(self):
        return self.returncode

    def terminate(self):
        self.returncode = -15

    def wait(self, timeout=None):
        return self.returncode


def test_honest_silos_run_the_agent_and_the_others_the_attacks(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    FakePopen.started = []
    monkeypatch.setenv("FL_SIGNING_KEY", "one-key-for-everyone")
    spec = spec_of()
    paths = {c.id: tmp_path / f"{c.id}.parquet" for c in spec.clients}
    keys = {"silo-0": "silo-0-key-silo-0-key", "silo-2": "silo-2-key-silo-2-key"}
    with SiloProcesses(spec, paths, tmp_path / "logs", behaviours={"silo-1": "sign_flip", "silo-2": "straggler"},
                       delay_seconds=7.0, signing_keys=keys) as silos:
        by_client = {cmd.cmd[cmd.cmd.index("--client-id") + 1]: cmd for cmd in FakePopen.started}
    assert set(by_client) == set(paths) and set(silos.procs) == set(paths)
    honest, flipper, straggler = (by_client[f"silo-{i}"].cmd for i in range(3))
    assert honest[:3] == [sys.executable, "-m", "fl_tasks.silo.agent"]
    assert flipper[:7] == [sys.executable, "-m", "fl_tasks.simulation.attacks", "--behaviour", "sign_flip",
                           "--delay-seconds", "7.0"]
    assert straggler[3:5] == ["--behaviour", "straggler"]
    for client, cmd in by_client.items():
        args = cmd.cmd
        assert args[args.index("--data") + 1] == str(paths[client])
        assert args[args.index("--bucket") + 1] == spec.client(client).bucket
        assert args[args.index("--federation") + 1] == spec.federation
    # Each silo its own key, or none: never the one FL_SIGNING_KEY of this process for all.
    assert by_client["silo-0"].env["FL_SIGNING_KEY"] == keys["silo-0"]
    assert "FL_SIGNING_KEY" not in by_client["silo-1"].env
    assert by_client["silo-2"].env["FL_SIGNING_KEY"] == keys["silo-2"]
    assert all(p.returncode == -15 for p in FakePopen.started)  # stopped on exit


def test_behaviours_must_name_a_client_and_a_known_behaviour():
    spec = spec_of()
    assert simulate._parse_behaviours(["silo-1=noise"], spec) == {"silo-1": "noise"}
    for bad in ("silo-9=noise", "silo-1=evil", "silo-1"):
        with pytest.raises(ValueError, match="expected CLIENT=BEHAVIOUR"):
            simulate._parse_behaviours([bad], spec)


def test_a_silo_may_read_a_database_instead_of_its_file(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    FakePopen.started = []
    spec = spec_of()
    url = "postgresql://reader@127.0.0.1:5432/silo1"
    paths = {c.id: tmp_path / f"{c.id}.parquet" for c in spec.clients if c.id != "silo-1"}
    with SiloProcesses(spec, paths, tmp_path / "logs", signing_keys={},
                       data_args={"silo-1": ["--data", url, "--sql-table", "transactions"]}):
        by_client = {p.cmd[p.cmd.index("--client-id") + 1]: p.cmd for p in FakePopen.started}
    db = by_client["silo-1"]
    assert db[db.index("--data") + 1: db.index("--data") + 4] == [url, "--sql-table", "transactions"]
    assert db.count("--data") == 1
    assert by_client["silo-0"][by_client["silo-0"].index("--data") + 1] == str(paths["silo-0"])
