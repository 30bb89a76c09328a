"""fl_tasks/config.py: federation files load into validated specs; bad files fail with file, field and fix."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from fl_tasks.config import (ClientSpec, ConfigError, FederationSpec, load_federation, load_federations,
                             parse_federation)

REPO = Path(__file__).resolve().parents[2]
SOURCE = "federations/test.yaml"

BASE = {
    "federation": "unit-fed",
    "coordinator": {"bucket": "unit-coordinator"},
    "clients": [
        {"id": "bank-a", "bucket": "s3://bank-a"},
        {"id": "bank-b", "bucket": "s3://shared-bucket/silos/bank-b/"},
    ],
    "quorum": {"min_clients": 2},
}


def doc(**changes) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(changes)
    return raw


def config_error(raw, field: str) -> ConfigError:
    """Parse `raw`, expect a ConfigError for `field`, and check the message's three parts."""
    with pytest.raises(ConfigError) as info:
        parse_federation(raw, SOURCE)
    err = info.value
    message = str(err)
    assert err.field_path == field
    assert err.source == SOURCE
    assert message.startswith(f"{SOURCE}: field '{field}': ")
    assert "Fix: " in message
    assert message.endswith(err.fix)
    return err


# --- the shipped federation file ----------------------------------------------------------


def test_banks_yaml_loads_with_five_clients():
    spec = load_federation(REPO / "federations" / "banks.yaml")
    assert isinstance(spec, FederationSpec)
    assert spec.federation == "banks"
    assert spec.dag_id == "fl_round__banks"
    assert [c.id for c in spec.clients] == ["bank-north", "bank-south", "bank-east", "bank-west", "bank-central"]
    assert all(c.bucket == f"s3://{c.id}" and c.bucket_name == c.id and c.prefix == "" for c in spec.clients)
    assert spec.coordinator_bucket == "fl-coordinator"
    assert spec.quorum.min_clients == 3
    # YAML integers become floats where the field is a float.
    assert spec.quorum.round_timeout_minutes == 10.0 and isinstance(spec.quorum.round_timeout_minutes, float)
    assert spec.model.hidden == (64, 32) and spec.model.batch_norm is False and spec.model.seed == 7
    assert spec.training.local_epochs == 3
    assert spec.gates.min_roc_auc == 0.90 and spec.gates.max_regression == 0.02
    assert spec.model_name == "banks-fraud-mlp"
    assert spec.experiment_name == "fl/banks"
    assert spec.data.dataset == "creditcard" and spec.data.seed == 42
    # Backfillable over the two days the public data covers; nothing runs on its own.
    assert (spec.schedule, spec.start_date, spec.end_date) == ("0 */8 * * *", "2013-09-01", "2013-09-03")
    assert spec.source.endswith("banks.yaml")


def test_load_federations_reads_the_shipped_folder():
    specs = load_federations(REPO / "federations")
    assert "banks" in [s.federation for s in specs]


# --- derived values -----------------------------------------------------------------------


def test_defaults_and_derived_names():
    spec = parse_federation(doc(federation="banks-eu"), SOURCE)
    assert spec.dag_id == "fl_round__banks_eu"
    assert spec.model_name == "banks-eu-global"
    assert spec.experiment_name == "fl/banks-eu"
    assert spec.aggregation == "fedavg"
    assert spec.training.codec == "fp32"
    # A trailing slash is dropped; the prefix is the path below the bucket.
    b = spec.client("bank-b")
    assert b == ClientSpec(id="bank-b", bucket="s3://shared-bucket/silos/bank-b")
    assert b.bucket_name == "shared-bucket"
    assert b.prefix == "silos/bank-b"
    with pytest.raises(KeyError, match="bank-z"):
        spec.client("bank-z")


def test_env_endpoint_overrides_file(monkeypatch):
    spec = parse_federation(doc(storage={"endpoint_url": "http://minio:9000"}), SOURCE)
    monkeypatch.delenv("FL_S3_ENDPOINT_URL", raising=False)
    assert spec.endpoint_url == "http://minio:9000"
    monkeypatch.setenv("FL_S3_ENDPOINT_URL", "http://127.0.0.1:5555")
    assert spec.endpoint_url == "http://127.0.0.1:5555"


def test_no_endpoint_anywhere_means_aws(monkeypatch):
    monkeypatch.delenv("FL_S3_ENDPOINT_URL", raising=False)
    assert parse_federation(doc(), SOURCE).endpoint_url is None


# --- errors name the file, the dotted field and the fix --------------------------------------


def test_unknown_section_field_suggests_close_name():
    err = config_error(doc(quorum={"min_client": 2}), "quorum.min_client")
    assert err.problem == "unknown field"
    assert "did you mean 'min_clients'?" in str(err)


def test_unknown_top_level_field_suggests_close_name():
    err = config_error(doc(clinets=[]), "clinets")
    assert "did you mean 'clients'?" in str(err)


def test_unknown_field_without_close_name_lists_allowed():
    err = config_error(doc(training={"zzz": 1}), "training.zzz")
    assert "allowed fields: local_epochs, learning_rate, batch_size, proximal_mu, codec" in str(err)


@pytest.mark.parametrize("bad_id", ["bank/a", "..", "../bank-a", "bank.a", "Bank-A", "-bank", "bank-a\n", ""])
def test_client_id_with_path_characters_rejected(bad_id):
    raw = doc()
    raw["clients"][0]["id"] = bad_id
    err = config_error(raw, "clients[0].id")
    assert repr(bad_id) in str(err)
    assert "no slashes or dots" in err.fix


@pytest.mark.parametrize("bucket", ["bank-a", "http://bank-a", "s3:/bank-a", "s3://", "s3://Bank_A", "s3://bank-a\n"])
def test_client_bucket_must_be_s3_uri(bucket):
    raw = doc()
    raw["clients"][1]["bucket"] = bucket
    err = config_error(raw, "clients[1].bucket")
    assert "is not an S3 URI" in str(err)
    assert "s3://bucket[/prefix]" in err.fix


def test_client_needs_exactly_id_and_bucket():
    raw = doc()
    raw["clients"][0]["region"] = "eu"
    config_error(raw, "clients[0]")


def test_duplicate_client_ids_rejected():
    raw = doc()
    raw["clients"].append({"id": "bank-a", "bucket": "s3://bank-a-copy"})
    err = config_error(raw, "clients")
    assert "duplicate client ids ['bank-a']" in str(err)


def test_no_clients_rejected():
    config_error(doc(clients=[]), "clients")


def test_min_clients_above_number_of_clients():
    err = config_error(doc(quorum={"min_clients": 3}), "quorum.min_clients")
    assert "3 is outside 1..2" in str(err)
    assert "between 1 and 2" in err.fix


def test_min_clients_zero_rejected():
    config_error(doc(quorum={"min_clients": 0}), "quorum.min_clients")


@pytest.mark.parametrize("section, key, value, expected", [
    ("quorum", "min_clients", "3", "a whole number"),
    ("quorum", "min_clients", 2.5, "a whole number"),
    ("quorum", "min_clients", True, "a whole number"),
    ("training", "learning_rate", "fast", "a number"),
    ("model", "batch_norm", "yes", "true or false"),
    ("model", "hidden", [64, "32"], "a list of whole numbers"),
    ("mlflow", "model_name", 5, "a string"),
])
def test_wrong_type_rejected(section, key, value, expected):
    raw = doc(**{section: {**BASE.get(section, {}), key: value}})
    err = config_error(raw, f"{section}.{key}")
    assert f"expected {expected}, got {value!r}" in str(err)


@pytest.mark.parametrize("section, values, field", [
    ("training", {"learning_rate": 1.5}, "training.learning_rate"),
    ("training", {"local_epochs": 0}, "training.local_epochs"),
    ("training", {"proximal_mu": -0.1}, "training.proximal_mu"),
    ("training", {"codec": "int8"}, "training.codec"),
    ("gates", {"min_roc_auc": 1.2}, "gates.min_roc_auc"),
    ("quorum", {"min_clients": 1, "round_timeout_minutes": 0}, "quorum.round_timeout_minutes"),
    ("model", {"factory": "resnet"}, "model.factory"),
    ("data", {"dataset": "mnist"}, "data.dataset"),
    ("quorum", {"min_clients": 1, "min_fraction": 0}, "quorum.min_fraction"),
    ("quorum", {"min_clients": 1, "min_fraction": 1.5}, "quorum.min_fraction"),
    ("quorum", {"min_clients": 1, "grace_period_minutes": -1}, "quorum.grace_period_minutes"),
    ("staleness", {"policy": "discount"}, "staleness.policy"),
    ("staleness", {"exponent": -1}, "staleness.exponent"),
    ("staleness", {"max_staleness": 0}, "staleness.max_staleness"),
])
def test_out_of_range_values_rejected(section, values, field):
    config_error(doc(**{section: values}), field)


def test_bad_federation_name_and_coordinator_bucket():
    config_error(doc(federation="Banks_EU"), "federation")
    config_error(doc(coordinator={}), "coordinator.bucket")
    config_error(doc(coordinator={"bucket": "s3://x"}), "coordinator.bucket")


def test_unknown_aggregation_lists_choices():
    err = config_error(doc(aggregation="fedmedian"), "aggregation")
    assert "fedavg" in err.fix


def test_section_must_be_a_mapping():
    err = config_error(doc(quorum=[1, 2]), "quorum")
    assert "expected a mapping, got list" in str(err)


def test_root_must_be_a_mapping():
    config_error(["federation", "x"], "<root>")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("federation: broken\nclients:\n\t- {id: a, bucket: s3://a}\n")
    with pytest.raises(ConfigError) as info:
        load_federation(path)
    assert info.value.source == str(path)
    assert info.value.field_path == "line 3"
    assert str(info.value).startswith(f"{path}: field 'line 3': is not valid YAML")
    assert "Fix:" in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'missing.yaml'}: field '<file>'")):
        load_federation(tmp_path / "missing.yaml")


def test_load_federation_from_file_records_source(tmp_path):
    path = tmp_path / "unit.yaml"
    path.write_text(yaml.safe_dump(doc()))
    spec = load_federation(path)
    assert spec.source == str(path)
    assert spec.federation == "unit-fed"
    # The spec round-trips through a plain dict.
    assert spec.to_dict()["clients"][0] == {"id": "bank-a", "bucket": "s3://bank-a"}


def test_errors_from_files_name_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(doc(gates={"min_roc_aucc": 0.9})))
    with pytest.raises(ConfigError) as info:
        load_federation(path)
    assert str(info.value).startswith(f"{path}: field 'gates.min_roc_aucc': unknown field. Fix: did you mean 'min_roc_auc'?")


def test_load_federations_rejects_duplicate_names(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(doc(federation="same")))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc(federation="same")))
    (tmp_path / "notes.txt").write_text("ignored: not yaml")
    with pytest.raises(ConfigError) as info:
        load_federations(tmp_path)
    err = info.value
    assert err.source == str(tmp_path / "b.yaml")
    assert err.field_path == "federation"
    assert str(tmp_path / "a.yaml") in str(err)
    assert "Fix:" in str(err)


def test_load_federations_sorted_by_file_name(tmp_path):
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc(federation="zeta")))
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(doc(federation="alpha")))
    assert [s.federation for s in load_federations(tmp_path)] == ["alpha", "zeta"]


def test_quorum_fraction_grace_and_staleness_load_with_defaults_off():
    spec = parse_federation(doc(), SOURCE)
    assert spec.quorum.min_fraction is None and spec.quorum.grace_period_minutes is None
    assert spec.staleness.policy == "reject"
    spec = parse_federation(doc(quorum={"min_clients": 1, "min_fraction": 0.5, "grace_period_minutes": 2},
                                staleness={"policy": "polynomial", "exponent": 1, "max_staleness": 2}), SOURCE)
    assert (spec.quorum.min_fraction, spec.quorum.grace_period_minutes) == (0.5, 2.0)
    assert (spec.staleness.policy, spec.staleness.exponent, spec.staleness.max_staleness) == ("polynomial", 1.0, 2)


# --- security: update signatures ----------------------------------------------------------


def test_security_defaults_and_connection_ids():
    spec = parse_federation(doc(federation="banks-eu"), SOURCE)
    assert spec.security.require_signatures is False
    assert spec.security.signing_key_conn_id == "fl_signing_{client}"
    # '-' becomes '_': the id doubles as the AIRFLOW_CONN_<ID> variable name.
    assert spec.security.conn_id(spec.federation, "bank-a") == "fl_signing_bank_a"
    custom = parse_federation(doc(federation="banks-eu", security={
        "require_signatures": True, "signing_key_conn_id": "fl_{federation}_key_{client}"}), SOURCE)
    assert custom.security.require_signatures is True
    assert custom.security.conn_id(custom.federation, "bank-b") == "fl_banks_eu_key_bank_b"


def test_banks_yaml_requires_signatures():
    assert load_federation(REPO / "federations" / "banks.yaml").security.require_signatures is True


@pytest.mark.parametrize("key, value, expected", [
    ("require_signatures", "yes", "true or false"),
    ("require_signatures", 1, "true or false"),
    ("signing_key_conn_id", 5, "a string"),
])
def test_security_wrong_types_rejected(key, value, expected):
    err = config_error(doc(security={key: value}), f"security.{key}")
    assert f"expected {expected}, got {value!r}" in str(err)


@pytest.mark.parametrize("template, problem", [
    ("fl_signing", "does not contain '{client}' exactly once"),
    ("fl_{client}_{client}", "does not contain '{client}' exactly once"),
    ("fl-signing-{client}", "is not a usable Airflow connection id"),
    ("fl/{client}", "is not a usable Airflow connection id"),
    ("fl_{clients}_{client}", "is not a usable Airflow connection id"),
    ("fl_{region}_{client}", "is not a usable Airflow connection id"),
])
def test_bad_signing_key_conn_id_rejected(template, problem):
    err = config_error(doc(security={"signing_key_conn_id": template}), "security.signing_key_conn_id")
    assert problem in str(err)


def test_unknown_security_field_suggests_close_name():
    err = config_error(doc(security={"require_signature": True}), "security.require_signature")
    assert "did you mean 'require_signatures'?" in str(err)
