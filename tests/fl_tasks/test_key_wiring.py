"""Signing keys handed out by fl-simulate and the local stack: each silo its own key, the
coordinator all of them as Airflow connections."""

from __future__ import annotations

import json
import stat

import pytest
import yaml

from fl_tasks.protocol import signing
from fl_tasks.config import load_federation, parse_federation
from devstack.localstack import LocalStack
from fl_tasks.simulation.simulate import simulation_keys

from tests.conftest import federation_doc


def spec(require: bool):
    return parse_federation(federation_doc(federation="keys-fed", security={"require_signatures": require}))


def test_simulation_generates_missing_keys_only_when_signatures_are_required(tmp_path, monkeypatch, capsys):
    for i in range(3):
        monkeypatch.delenv(f"FL_SIGNING_KEY_SILO_{i}", raising=False)
    monkeypatch.setenv("FL_SIGNING_KEY_SILO_0", "silo-0-key-from-env")
    assert simulation_keys(spec(False), tmp_path) == {"silo-0": "silo-0-key-from-env"}
    assert not (tmp_path / "signing-keys.env").exists()

    keys = simulation_keys(spec(True), tmp_path)
    assert keys["silo-0"] == "silo-0-key-from-env" and set(keys) == {"silo-0", "silo-1", "silo-2"}
    path = tmp_path / "signing-keys.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = dict(line.split("=", 1) for line in path.read_text().splitlines())
    assert json.loads(lines["AIRFLOW_CONN_FL_SIGNING_SILO_1"].strip("'")) == {"conn_type": "generic",
                                                                               "password": keys["silo-1"]}
    assert lines["FL_SIGNING_KEY_SILO_2"].strip("'") == keys["silo-2"]
    assert "signing-keys.env" in capsys.readouterr().out


def test_local_stack_gives_airflow_one_connection_per_key(tmp_path):
    folder = tmp_path / "federations"
    folder.mkdir()
    for name, template in (("one", "fl_signing_{client}"), ("two", "fl_signing_{client}"),
                           ("three", "fl_{federation}_{client}")):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(federation_doc(
            federation=name, security={"signing_key_conn_id": template})))
    specs = [load_federation(p) for p in sorted(folder.glob("*.yaml"))]
    stack = LocalStack(tmp_path / "state", folder)
    (stack.state_dir / "airflow").mkdir(parents=True)
    assert not any(k.startswith("AIRFLOW_CONN_") for k in stack.env())  # before `up`: no keys
    stack._write_signing_keys(specs)
    keys = stack.signing_keys()
    # Federations sharing the default template share a client's key; a per-federation template does not.
    assert set(keys) == {f"fl_signing_silo_{i}" for i in range(3)} | {f"fl_three_silo_{i}" for i in range(3)}
    assert len(set(keys.values())) == len(keys)
    assert stat.S_IMODE(stack.signing_keys_file.stat().st_mode) == 0o600
    env = stack.env()
    for conn_id, key in keys.items():
        assert json.loads(env[signing.airflow_conn_env_var(conn_id)])["password"] == key


def test_a_decline_signed_with_a_simulated_silos_key_verifies_with_the_coordinators_copy(tmp_path, monkeypatch):
    """fl-simulate hands each silo its key and the coordinator the same keys: what a silo signs
    (an update or a decline) verifies with the coordinator's key for that silo, and only that one."""
    from fl_tasks.protocol import DeclineManifest

    for i in range(3):
        monkeypatch.delenv(f"FL_SIGNING_KEY_SILO_{i}", raising=False)
    keys = simulation_keys(spec(True), tmp_path)
    environ = {name: value.strip("'") for name, value in
               (line.split("=", 1) for line in (tmp_path / "signing-keys.env").read_text().splitlines())}
    coordinator_keys = signing.EnvKeys(environ)
    decline = signing.sign_manifest(DeclineManifest(client_id="silo-1", federation="keys-fed", round_id="000001",
                                                    reason="column 'Amount' missing"), keys["silo-1"])
    signing.verify_manifest(decline, coordinator_keys("silo-1"))
    with pytest.raises(signing.SignatureError):
        signing.verify_manifest(decline, coordinator_keys("silo-2"))
