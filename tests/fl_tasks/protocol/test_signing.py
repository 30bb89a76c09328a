"""fl_tasks/protocol/signing.py: HMAC-SHA256 over the canonical update or decline manifest, per-client keys."""

from __future__ import annotations

import dataclasses
import hmac
import json

import pytest

from fl_tasks.config import parse_federation
from fl_tasks.protocol import DeclineManifest, ManifestError, UpdateManifest, signing
from fl_tasks.protocol.signing import SignatureError, sign_manifest, verify_manifest

from tests.conftest import FRAUD_CONTRACT

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def manifest(**changes) -> UpdateManifest:
    values = dict(client_id="bank-a", federation="banks", round_id="000001", base_model_version="3",
                  base_sha256="a" * 64, num_examples=5000, codec="fp32", payload_sha256="b" * 64, payload_bytes=99,
                  metrics={"train_loss": 0.25}, drift={}, timings={"train": 1.5},
                  created_at="2024-01-01T00:05:00+00:00")
    values.update(changes)
    return UpdateManifest(**values)


def test_sign_then_verify_round_trips_through_json():
    signed = sign_manifest(manifest(), KEY)
    assert len(signed.signature) == 64 and int(signed.signature, 16) >= 0
    assert dataclasses.replace(signed, signature="") == manifest()  # only the signature was added
    verify_manifest(signed, KEY)
    verify_manifest(UpdateManifest.from_json(signed.to_json()), KEY)  # what the coordinator reads back


def test_signature_is_hmac_sha256_of_the_canonical_manifest():
    signed = sign_manifest(manifest(), KEY)
    canonical = signing.canonical_bytes(signed)
    body = json.loads(canonical)
    assert body["signature"] == "" and body["payload_sha256"] == "b" * 64  # the payload hash is covered
    assert canonical == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    import hashlib

    assert signed.signature == hmac.new(KEY, canonical, hashlib.sha256).hexdigest()


CHANGES = {
    "client_id": "bank-b", "federation": "other", "round_id": "000002", "base_model_version": "4",
    "base_sha256": "c" * 64, "num_examples": 5001, "codec": "fp16", "payload_sha256": "d" * 64,
    "payload_bytes": 100, "metrics": {"train_loss": 0.26}, "drift": {
        "reference": "first window", "reference_rows": 10, "current_rows": 10, "drifted_share": 0.0,
        "dataset_drifted": False, "columns": {"amount": {"score": 0.9, "drifted": False, "method": "K-S p_value"}}},
    "timings": {"train": 1.6},
    "created_at": "2024-01-01T00:05:01+00:00",
}


def test_every_field_but_the_signature_is_covered():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(UpdateManifest)} - {"signature"}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_tampering_with_any_field_breaks_the_signature(name):
    signed = sign_manifest(manifest(), KEY)
    tampered = dataclasses.replace(signed, **{name: CHANGES[name]})
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_manifest(tampered, KEY)


def test_another_key_fails():
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_manifest(sign_manifest(manifest(), OTHER_KEY), KEY)


def test_a_forged_signature_fails():
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_manifest(manifest(signature="0" * 64), KEY)


def test_unsigned_fails_with_its_own_reason():
    with pytest.raises(SignatureError, match="unsigned update"):
        verify_manifest(manifest(), KEY)


def test_signature_error_is_a_value_error():
    assert issubclass(SignatureError, ValueError)


def test_comparison_is_constant_time(monkeypatch):
    calls, compare = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(signing.hmac, "compare_digest", spy)
    signed = sign_manifest(manifest(), KEY)
    verify_manifest(signed, KEY)
    with pytest.raises(SignatureError):
        verify_manifest(signed, OTHER_KEY)
    assert len(calls) == 2 and calls[0][1] == signed.signature.encode()


@pytest.mark.parametrize("key", [b"", b"short", "fifteen-chars!!"])
def test_short_keys_are_refused(key):
    with pytest.raises(SignatureError, match="at least 16"):
        sign_manifest(manifest(), key)
    with pytest.raises(SignatureError, match="at least 16"):
        verify_manifest(manifest(signature="0" * 64), key)


def test_text_and_bytes_keys_are_the_same_key():
    assert sign_manifest(manifest(), "k" * 32) == sign_manifest(manifest(), KEY)


def test_env_keys_read_one_variable_per_client(monkeypatch):
    monkeypatch.setenv("FL_SIGNING_KEY_BANK_NORTH", "north-key-north-key")
    monkeypatch.delenv("FL_SIGNING_KEY_BANK_SOUTH", raising=False)
    keys = signing.EnvKeys()
    assert keys("bank-north") == b"north-key-north-key"
    assert keys("bank-south") is None
    assert keys.source("bank-south") == "environment variable FL_SIGNING_KEY_BANK_SOUTH"
    assert signing.env_var_for("a-b-c") == "FL_SIGNING_KEY_A_B_C"


def test_generated_keys_are_random_and_long():
    first, second = signing.generate_keys(["a", "b"]), signing.generate_keys(["a", "b"])
    assert set(first) == {"a", "b"} and first["a"] != first["b"] and first != second
    assert all(len(signing.as_key(k)) == 64 for k in first.values())


def test_coordinator_env_holds_a_connection_and_a_variable_per_client():
    # A federation file now has to declare its data contract.
    spec = parse_federation({"federation": "unit", "coordinator": {"bucket": "coord"},
                             "clients": [{"id": "bank-a", "bucket": "s3://bank-a"}],
                             "data": {"contract": FRAUD_CONTRACT}})
    env = signing.coordinator_env(spec, {"bank-a": "x" * 20})
    assert env == {"AIRFLOW_CONN_FL_SIGNING_BANK_A": json.dumps({"conn_type": "generic", "password": "x" * 20}),
                   "FL_SIGNING_KEY_BANK_A": "x" * 20}


# --- declines ------------------------------------------------------------------------------------


def decline(**changes) -> DeclineManifest:
    values = dict(client_id="bank-a", federation="banks", round_id="000001", reason="column 'Amount' missing",
                  created_at="2024-01-01T00:05:00+00:00")
    values.update(changes)
    return DeclineManifest(**values)


DECLINE_CHANGES = {"client_id": "bank-b", "federation": "other", "round_id": "000002",
                   "reason": "column 'Amount' missing; column 'Class' missing", "created_at": "2024-01-01T00:05:01+00:00"}


def test_a_decline_is_signed_and_verified_like_an_update():
    signed = sign_manifest(decline(), KEY)
    assert isinstance(signed, DeclineManifest) and dataclasses.replace(signed, signature="") == decline()
    verify_manifest(signed, KEY)
    verify_manifest(DeclineManifest.from_json(signed.to_json()), KEY)
    assert json.loads(signing.canonical_bytes(signed))["kind"] == "decline"
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_manifest(signed, OTHER_KEY)
    with pytest.raises(SignatureError, match="unsigned decline: the manifest has no signature"):
        verify_manifest(decline(), KEY)


def test_every_decline_field_but_the_signature_is_covered():
    assert set(DECLINE_CHANGES) == {f.name for f in dataclasses.fields(DeclineManifest)} - {"signature"}


@pytest.mark.parametrize("name", sorted(DECLINE_CHANGES))
def test_tampering_with_any_decline_field_breaks_the_signature(name):
    tampered = dataclasses.replace(sign_manifest(decline(), KEY), **{name: DECLINE_CHANGES[name]})
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_manifest(tampered, KEY)


def test_a_declines_signature_never_passes_for_an_update():
    """The kind is signed: a silo's signed "not this round" cannot be replayed as an update
    (nor the other way round), even where every shared field is equal."""
    signed_decline = sign_manifest(decline(), KEY)
    update = manifest(signature=signed_decline.signature)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_manifest(update, KEY)
    signed_update = sign_manifest(manifest(), KEY)
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_manifest(decline(signature=signed_update.signature), KEY)
    # Nor does relabelling the signed bytes help: a decline's JSON read as an update is refused outright.
    with pytest.raises(ManifestError, match="field 'kind' must be 'update'"):
        UpdateManifest.from_json(signed_decline.to_json())
    # The two kinds' canonical bytes differ even in the fields they share.
    assert json.loads(signing.canonical_bytes(signed_decline))["kind"] != \
        json.loads(signing.canonical_bytes(signed_update))["kind"]
