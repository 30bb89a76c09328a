"""Manifest signatures (updates, evaluations and declines): HMAC-SHA256 with a key per client.

The signed bytes are the canonical manifest: the manifest's JSON with `signature` empty and
keys sorted (`to_json`); its `kind` is part of it, so an update's signature never passes for
a decline. It carries the client id, federation, round, base
model and the payload's sha256 and size, so one signature covers the manifest and, through
its hash, the payload.

A key is any secret string of at least MIN_KEY_BYTES bytes (e.g. `openssl rand -hex 32`),
used as its UTF-8 bytes. The client gets its own key (`fl-client --signing-key-file` or
`FL_SIGNING_KEY`); the coordinator looks keys up through a key provider, a callable
`client_id -> bytes | None`:

- in Airflow, from one connection per client whose password is the key
  (`fl_airflow.keys.ConnectionKeys`; connection id from the federation's
  `security.signing_key_conn_id`, default `fl_signing_{client}`), so any Airflow secrets
  backend or an `AIRFLOW_CONN_<ID>` variable can hold it;
- outside Airflow (`run_round`, simulations, tests), from `FL_SIGNING_KEY_<CLIENT_ID>`
  variables (`EnvKeys`).

This module never imports Airflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from typing import TypeVar

from fl_tasks.protocol import DeclineManifest, EvaluationManifest, UpdateManifest

SignedManifest = TypeVar("SignedManifest", UpdateManifest, DeclineManifest, EvaluationManifest)

MIN_KEY_BYTES = 16

KeyProvider = Callable[[str], "bytes | None"]


class SignatureError(ValueError):
    """A manifest's signature is missing, malformed or does not match; the message says which."""


def as_key(key: bytes | str, who: str = "signing key") -> bytes:
    """Key bytes from a key given as bytes or text; too-short keys are refused."""
    data = key.encode() if isinstance(key, str) else bytes(key)
    if len(data) < MIN_KEY_BYTES:
        raise SignatureError(f"{who} is {len(data)} bytes; at least {MIN_KEY_BYTES} are needed "
                             "(generate one with `openssl rand -hex 32`)")
    return data


def canonical_bytes(manifest: SignedManifest) -> bytes:
    """What is signed: the manifest JSON with `signature` empty, sorted keys, no spaces."""
    return dataclasses.replace(manifest, signature="").to_json()


def compute_signature(manifest: SignedManifest, key: bytes | str) -> str:
    return hmac.new(as_key(key), canonical_bytes(manifest), hashlib.sha256).hexdigest()


def sign_manifest(manifest: SignedManifest, key: bytes | str) -> SignedManifest:
    """A copy of the manifest with `signature` set (hex HMAC-SHA256)."""
    return dataclasses.replace(manifest, signature=compute_signature(manifest, key))


def verify_manifest(manifest: SignedManifest, key: bytes | str) -> None:
    """Raise SignatureError unless the manifest carries a valid signature made with `key`."""
    if not manifest.signature:
        raise SignatureError(f"unsigned {manifest.kind}: the manifest has no signature")
    expected = compute_signature(manifest, key)
    # Constant time: the comparison must not tell an attacker how many characters matched.
    if not hmac.compare_digest(expected.encode(), manifest.signature.encode()):
        raise SignatureError("signature does not match the manifest (forged, altered after signing, "
                             "or signed with another key)")


# --- where keys live -------------------------------------------------------------------

def env_var_for(client_id: str) -> str:
    """`FL_SIGNING_KEY_<CLIENT_ID>`: upper case, '-' as '_' (client ids have no '_')."""
    return "FL_SIGNING_KEY_" + client_id.upper().replace("-", "_")


class EnvKeys:
    """Keys from `FL_SIGNING_KEY_<CLIENT_ID>` environment variables (outside Airflow)."""

    def __init__(self, environ: dict[str, str] | None = None):
        self.environ = os.environ if environ is None else environ

    def source(self, client_id: str) -> str:
        return f"environment variable {env_var_for(client_id)}"

    def __call__(self, client_id: str) -> bytes | None:
        value = self.environ.get(env_var_for(client_id))
        return value.encode() if value else None


class StaticKeys:
    """Keys from a mapping client id -> key (tests, embedded stacks)."""

    def __init__(self, keys: dict[str, bytes | str]):
        self.keys = {c: k.encode() if isinstance(k, str) else k for c, k in keys.items()}

    def source(self, client_id: str) -> str:
        return f"a key for {client_id!r} in the coordinator's key map"

    def __call__(self, client_id: str) -> bytes | None:
        return self.keys.get(client_id)


def airflow_conn_env_var(conn_id: str) -> str:
    """The variable Airflow's environment secrets backend reads for a connection id."""
    return "AIRFLOW_CONN_" + conn_id.upper()


def airflow_conn_value(key: str) -> str:
    """An `AIRFLOW_CONN_*` value (JSON form) holding a signing key as the password."""
    return json.dumps({"conn_type": "generic", "password": key})


def write_private(path: Path, text: str) -> None:
    """Write key material to a file only its owner can read (mode 0600 before the keys go in)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def generate_keys(client_ids: Iterable[str]) -> dict[str, str]:
    """A fresh random key per client (256 bits, hex)."""
    return {client_id: secrets.token_hex(32) for client_id in client_ids}


def coordinator_env(spec, keys: dict[str, str]) -> dict[str, str]:
    """Environment that hands `keys` to a coordinator: one Airflow connection per client
    (for DAG runs) and the matching `FL_SIGNING_KEY_<CLIENT>` (for `run_round`)."""
    env = {}
    for client_id, key in keys.items():
        env[airflow_conn_env_var(spec.security.conn_id(spec.federation, client_id))] = airflow_conn_value(key)
        env[env_var_for(client_id)] = key
    return env
