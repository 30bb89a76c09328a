"""fl_airflow.keys.ConnectionKeys: the coordinator's signing keys, read from Airflow connections."""

from __future__ import annotations

import json

import pytest
from fl_airflow.keys import ConnectionKeys

from fl_tasks.config import parse_federation
from tests.conftest import FRAUD_CONTRACT


def spec(**security):
    raw = {"federation": "banks-eu", "coordinator": {"bucket": "coord"}, "data": {"contract": FRAUD_CONTRACT},
           "clients": [{"id": "bank-north", "bucket": "s3://bank-north"}, {"id": "bank-south", "bucket": "s3://bank-south"}]}
    if security:
        raw["security"] = security
    return parse_federation(raw)


@pytest.fixture(autouse=True)
def no_cached_connections():
    from airflow.sdk.execution_time.cache import SecretCache

    SecretCache.reset()  # a connection cached by another test must not answer
    yield
    SecretCache.reset()


def test_reads_the_key_from_an_airflow_conn_variable(monkeypatch):
    key = "3f" * 32
    monkeypatch.setenv("AIRFLOW_CONN_FL_SIGNING_BANK_NORTH", json.dumps({"conn_type": "generic", "password": key}))
    monkeypatch.delenv("AIRFLOW_CONN_FL_SIGNING_BANK_SOUTH", raising=False)
    keys = ConnectionKeys(spec())
    assert keys.conn_id("bank-north") == "fl_signing_bank_north"
    assert keys("bank-north") == key.encode()
    assert keys("bank-south") is None  # not defined: the coordinator names the connection to create
    assert keys.source("bank-south") == "Airflow connection 'fl_signing_bank_south' (password = the key)"


def test_uri_form_and_a_custom_template(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FL_BANKS_EU_BANK_SOUTH", "generic://:south-secret-key-123@")
    keys = ConnectionKeys(spec(signing_key_conn_id="fl_{federation}_{client}"))
    assert keys.conn_id("bank-south") == "fl_banks_eu_bank_south"
    assert keys("bank-south") == b"south-secret-key-123"


def test_a_connection_without_password_gives_no_key(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_FL_SIGNING_BANK_NORTH", json.dumps({"conn_type": "generic"}))
    assert ConnectionKeys(spec())("bank-north") is None
