"""fl_airflow.connections.s3_access: S3 credentials from an Airflow AWS connection."""

from __future__ import annotations

import json

import pytest
from fl_airflow.connections import s3_access

from fl_tasks.protocol.storage import ObjectStore, S3Access


@pytest.fixture(autouse=True)
def no_cached_connections():
    from airflow.sdk.execution_time.cache import SecretCache

    SecretCache.reset()
    yield
    SecretCache.reset()


def test_no_connection_means_the_processes_own_aws_chain():
    assert s3_access(None) == S3Access()


def test_an_aws_connection_gives_its_keys_region_and_endpoint(monkeypatch, s3_server):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_BANK_A", json.dumps({
        "conn_type": "aws", "login": "AKIABANKA", "password": "secret-of-bank-a",
        "extra": {"region_name": "us-east-1", "endpoint_url": s3_server.endpoint_url}}))
    access = s3_access("aws_bank_a")
    assert (access.access_key_id, access.secret_access_key, access.region) == \
        ("AKIABANKA", "secret-of-bank-a", "us-east-1")
    assert access.endpoint_url == s3_server.endpoint_url
    store = ObjectStore(access=access)  # the store really talks to that endpoint with those keys
    store.ensure_bucket("conn-bank-a")
    store.put_bytes("conn-bank-a", "k", b"v")
    assert store.get_bytes("conn-bank-a", "k") == b"v"


def test_a_missing_connection_names_itself_and_the_fix():
    with pytest.raises(ValueError, match="Airflow connection 'aws_nowhere'.*does not exist; create it"):
        s3_access("aws_nowhere")
