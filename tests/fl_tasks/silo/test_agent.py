"""The silo runtime against a moto server: it answers committed rounds, in protocol order."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from fl_tasks import protocol
from fl_tasks.silo.agent import ClientRuntime, main
from fl_tasks.protocol.codec import decode_state, encode_state
from fl_tasks.config import ModelSpec
from fl_tasks.simulation.datasets import make_synthetic
from fl_tasks.tasks.models import build_model, state_to_numpy
from fl_tasks.protocol import GlobalManifest, UpdateManifest, sha256_hex
from fl_tasks.protocol.storage import ObjectStore

MODEL = ModelSpec(hidden=(8,), seed=1)


def publish(store, bucket, round_id, deadline=None, window=None, corrupt=False):
    payload = encode_state(state_to_numpy(build_model(MODEL, seed=1)))
    manifest = GlobalManifest(
        federation="fed", round_id=round_id, model_name="m", model_version="seed",
        model={"factory": "fraud_mlp", "input_dim": 30, "hidden": [8], "batch_norm": True, "seed": 1},
        payload_sha256=sha256_hex(payload), payload_bytes=len(payload),
        training={"local_epochs": 1, "learning_rate": 0.01, "batch_size": 64, "proximal_mu": 0.0, "codec": "fp32"},
        data_window=window or {"start": None, "end": None},
        deadline=(deadline or datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat(),
        created_at=datetime.now(timezone.utc).isoformat(),
    )
    store.put_bytes(bucket, protocol.global_model_key("", "fed", round_id), payload[:-1] if corrupt else payload)
    store.put_bytes(bucket, protocol.global_manifest_key("", "fed", round_id), manifest.to_json())
    return manifest


@pytest.fixture
def runtime(s3_server):
    store = ObjectStore(s3_server.endpoint_url)
    bucket = f"client-test-{datetime.now().strftime('%H%M%S%f')}"
    store.ensure_bucket(bucket)
    return ClientRuntime("bank-a", "fed", f"s3://{bucket}", make_synthetic(800, seed=2), store)


def read_update(runtime, round_id):
    raw = runtime.store.get_bytes(runtime.bucket, protocol.update_manifest_key("", "fed", round_id))
    return None if raw is None else UpdateManifest.from_json(raw)


def test_answers_a_committed_round_with_a_verifiable_update(runtime):
    manifest = publish(runtime.store, runtime.bucket, "000001")
    assert runtime.pending_rounds() == ["000001"]
    assert runtime.run(poll_seconds=0.01, max_rounds=1) == 1
    update = read_update(runtime, "000001")
    assert update.client_id == "bank-a" and update.num_examples == 800
    assert update.base_sha256 == manifest.payload_sha256 and update.base_model_version == "seed"
    payload = runtime.store.get_bytes(runtime.bucket, protocol.update_payload_key("", "fed", "000001"))
    assert sha256_hex(payload) == update.payload_sha256
    state = decode_state(payload)
    base = state_to_numpy(build_model(MODEL, seed=1))
    assert set(state) == set(base)
    assert any(not (state[k] == base[k]).all() for k in base)  # it actually trained
    assert runtime.pending_rounds() == []


def test_a_round_without_a_committed_manifest_is_not_answered(runtime):
    payload = encode_state(state_to_numpy(build_model(MODEL, seed=1)))
    runtime.store.put_bytes(runtime.bucket, protocol.global_model_key("", "fed", "000002"), payload)
    assert runtime.pending_rounds() == []


def test_past_deadline_and_corrupt_payload_are_skipped(runtime):
    publish(runtime.store, runtime.bucket, "000003", deadline=datetime.now(timezone.utc) - timedelta(seconds=1))
    publish(runtime.store, runtime.bucket, "000004", corrupt=True)
    assert runtime.answer("000003") is False
    assert runtime.answer("000004") is False
    assert read_update(runtime, "000003") is None and read_update(runtime, "000004") is None


def test_trains_only_on_rows_inside_the_data_window(runtime):
    times = runtime.data.time
    start, end = times[200], times[500]
    publish(runtime.store, runtime.bucket, "000005", window={"start": str(start) + "+00:00", "end": str(end) + "+00:00"})
    assert runtime.answer("000005") is True
    assert read_update(runtime, "000005").num_examples == int(((times >= start) & (times < end)).sum())


def test_dropout_behaviour_never_answers(runtime):
    publish(runtime.store, runtime.bucket, "000006")
    dropout = replace(runtime, behaviour="dropout")
    assert dropout.answer("000006") is False and read_update(runtime, "000006") is None


def test_cli_rejects_a_bad_client_id_without_a_traceback(tmp_path, capsys, s3_server):
    data = tmp_path / "silo.npz"
    make_synthetic(100).save(data)
    code = main(["--client-id", "../etc", "--federation", "fed", "--bucket", "s3://b", "--data", str(data),
                 "--endpoint-url", s3_server.endpoint_url])
    assert code == 2
    assert "client id '../etc' must match" in capsys.readouterr().err


def test_a_signing_key_signs_the_committed_manifest(runtime):
    from fl_tasks.protocol.signing import SignatureError, verify_manifest

    signer = replace(runtime, signing_key="silo-key-" * 4)
    publish(runtime.store, runtime.bucket, "000007")
    assert signer.answer("000007") is True
    update = read_update(runtime, "000007")
    verify_manifest(update, "silo-key-" * 4)
    with pytest.raises(SignatureError):
        verify_manifest(update, "another-key-" * 4)
    # Without a key the manifest goes unsigned, as before.
    publish(runtime.store, runtime.bucket, "000008")
    assert runtime.answer("000008") is True and read_update(runtime, "000008").signature == ""


def test_cli_takes_the_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from fl_tasks.silo.agent import read_signing_key

    monkeypatch.delenv("FL_SIGNING_KEY", raising=False)
    assert read_signing_key(None) is None
    monkeypatch.setenv("FL_SIGNING_KEY", "from-the-environment")
    assert read_signing_key(None) == "from-the-environment"
    path = tmp_path / "key"
    path.write_text("from-the-file-0123456789\n")
    assert read_signing_key(str(path)) == "from-the-file-0123456789"  # the file wins, newline stripped
    assert build_parser_flags() >= {"--signing-key-file"}


def build_parser_flags() -> set[str]:
    from fl_tasks.silo.agent import build_parser

    return {opt for action in build_parser()._actions for opt in action.option_strings}


def test_cli_refuses_a_short_key_without_a_traceback(tmp_path, capsys, s3_server, monkeypatch):
    data = tmp_path / "silo.npz"
    make_synthetic(100).save(data)
    monkeypatch.setenv("FL_SIGNING_KEY", "short")
    code = main(["--client-id", "bank-a", "--federation", "fed", "--bucket", "s3://b", "--data", str(data),
                 "--endpoint-url", s3_server.endpoint_url])
    assert code == 2
    assert "at least 16" in capsys.readouterr().err
