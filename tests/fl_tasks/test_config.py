"""fl_tasks/config.py: federation files load into validated specs; bad files fail with file, field and fix.

(The `model:` section became `task: {entrypoint, params, seed, warm_start}`, `data.dataset`
became `data: {contract: ...}` (now required), the synthetic/real data choice moved to
`simulation:`, `gates.min_roc_auc` became `gates.thresholds: {metric: value}`, and the
per-round settings take their defaults and bounds from fl_tasks.settings.)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from fl_tasks.config import (ClientSpec, ConfigError, FederationSpec, GatesSpec, QuorumSpec, ScreeningSpec,
                             SimulationSpec, TaskSpec, TrainingSpec, EvaluationSpec, FederatedEvaluationSpec, load_federation, load_federations,
                             parse_federation, scan_federations)
from fl_tasks.contract import Column, DataContract
from fl_tasks.settings import CLIENTS, ROUND_SETTINGS

from tests.conftest import FRAUD_CONTRACT

REPO = Path(__file__).resolve().parents[2]
SOURCE = "federations/test.yaml"

CONTRACT = {
    "label": {"name": "is_fraud", "type": "boolean"},
    "event_time": "event_time",
    "features": [{"name": "amount", "type": "numeric"},
                 {"name": "channel", "type": "categorical", "categories": ["web", "pos"], "max_unknown_share": 0.05}],
}
BASE = {
    "federation": "unit-fed",
    "coordinator": {"bucket": "unit-coordinator"},
    "clients": [
        {"id": "bank-a", "bucket": "s3://bank-a"},
        {"id": "bank-b", "bucket": "s3://shared-bucket/silos/bank-b/"},
    ],
    "quorum": {"min_clients": 2},
    "data": {"contract": CONTRACT},
}


def doc(**changes) -> dict:
    raw = copy.deepcopy(BASE)
    raw.update(copy.deepcopy(changes))
    return raw


def with_contract(**changes) -> dict:
    """BASE with data.contract's entries replaced by `changes` (None removes one)."""
    contract = copy.deepcopy(CONTRACT)
    for key, value in changes.items():
        if value is None:
            contract.pop(key, None)
        else:
            contract[key] = value
    return doc(data={"contract": contract})


def config_error(raw, field: str) -> ConfigError:
    """Parse `raw`, expect a ConfigError for `field`, and check the message's three parts."""
    with pytest.raises(ConfigError) as info:
        parse_federation(raw, SOURCE)
    err = info.value
    message = str(err)
    assert err.field_path == field
    assert err.source == SOURCE
    assert message.startswith(f"{SOURCE}: field '{field}': ")
    assert "Fix: " in message and err.fix
    assert message.endswith(err.fix)
    return err


# --- the shipped federation files -----------------------------------------------------------


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
    assert spec.task == TaskSpec(entrypoint="fl_tasks.tasks.fraud:FraudTask",
                                 params={"hidden": [64, 32], "batch_norm": False}, seed=7)
    assert spec.training.local_epochs == 3
    assert spec.gates.thresholds == {"roc_auc": 0.80, "pr_auc": 0.30} and spec.gates.max_regression == 0.02
    # The gates read the banks' own evaluation shares; the coordinator holds no rows.
    assert spec.evaluation == EvaluationSpec(FederatedEvaluationSpec(0.1, 3, 10.0, "mean", None), "")
    assert spec.model_name == "banks-fraud-mlp"
    assert spec.experiment_name == "fl/banks"
    assert (spec.simulation.source, spec.simulation.seed) == ("creditcard", 42)
    # The contract the tests use is the one the shipped file declares.
    assert spec.contract == parse_federation(doc(data={"contract": FRAUD_CONTRACT})).contract
    assert spec.contract.columns == [*(f"V{i}" for i in range(1, 29)), "Amount", "Class", "event_time"]
    # Backfillable over the two days the public data covers; nothing runs on its own.
    assert (spec.schedule, spec.start_date, spec.end_date) == ("0 */8 * * *", "2013-09-01", "2013-09-03")
    assert spec.source.endswith("banks.yaml")


def test_banks_yaml_task_loads():
    from fl_tasks.tasks.fraud import FraudTask

    task = load_federation(REPO / "federations" / "banks.yaml").load_task()
    assert isinstance(task, FraudTask) and task.hidden == (64, 32) and task.batch_norm is False


def test_claims_yaml_loads_with_the_example_task():
    spec = load_federation(REPO / "federations" / "claims.yaml")
    assert spec.task.entrypoint == "claims_triage.task:ClaimsTriageTask"
    assert spec.contract.label == Column("triage", "categorical", ("fast_track", "standard", "investigate"))
    assert spec.contract.feature("channel").max_unknown_share == 0.05
    assert [c.name for c in spec.contract.features if c.type == "numeric"] == ["claim_amount", "policy_age_days",
                                                                              "prior_claims"]
    assert spec.gates.thresholds == {"log_loss": 0.95, "accuracy": 0.5}
    task = spec.load_task()  # examples/ is on the test path, as it is on workers and silos
    assert {m.name for m in task.metrics} >= set(spec.gates.thresholds)


def test_load_federations_reads_the_shipped_folder():
    specs = load_federations(REPO / "federations")
    assert [s.federation for s in specs] == ["banks", "claims"]


# --- derived values -----------------------------------------------------------------------


def test_defaults_and_derived_names():
    spec = parse_federation(doc(federation="banks-eu"), SOURCE)
    assert spec.dag_id == "fl_round__banks_eu"
    assert spec.model_name == "banks-eu-global"
    assert spec.experiment_name == "fl/banks-eu"
    assert spec.aggregation == "weighted_median"  # the default defence (benchmarks/quality.py)
    assert spec.training.codec == "fp32" and spec.training.window == "interval"
    assert spec.task == TaskSpec()  # the built-in fraud task, no params, seed 0, no warm start
    assert spec.simulation == SimulationSpec(source="synthetic", rows=20000, seed=0)
    # The gates read the silos' own data; the coordinator holds none unless the file gives some.
    assert spec.evaluation == EvaluationSpec(FederatedEvaluationSpec(min_silos=2), "")
    assert spec.evaluation.sources == ("federated",)
    assert spec.storage_aws_conn_id is None and spec.max_weight_share == 0.5
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


def test_the_old_model_section_is_refused():
    # `model:` was replaced by `task:`; an old file fails on load and points at the new name.
    err = config_error(doc(model={"hidden": [64, 32]}), "model")
    assert err.problem == "unknown field"
    assert err.fix.startswith("allowed: ") and ", task, " in err.fix


def test_unknown_field_without_close_name_lists_allowed():
    err = config_error(doc(training={"zzz": 1}), "training.zzz")
    assert "allowed fields: local_epochs, learning_rate, batch_size, proximal_mu, codec, lr_schedule, optimizer_state, window" in str(err)


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


def test_client_takes_only_the_known_fields():
    raw = doc()
    raw["clients"][0]["region"] = "eu"
    err = config_error(raw, "clients[0]")
    assert "may set aws_conn_id, endpoint_url, max_examples" in str(err)


def test_client_needs_id_and_bucket():
    raw = doc()
    del raw["clients"][0]["bucket"]
    config_error(raw, "clients[0]")


def test_duplicate_client_ids_rejected():
    raw = doc()
    raw["clients"].append({"id": "bank-a", "bucket": "s3://bank-a-copy"})
    err = config_error(raw, "clients")
    assert "duplicate client ids ['bank-a']" in str(err)


def test_no_clients_rejected():
    config_error(doc(clients=[]), "clients")


def test_min_clients_above_number_of_clients():
    # The bound comes from the settings table (maximum: the number of clients); the fix says
    # which values are allowed.
    err = config_error(doc(quorum={"min_clients": 3}), "quorum.min_clients")
    assert "must be <= 2, got 3" in str(err)
    assert "a whole number >= 1 and <= 2" in err.fix


def test_min_clients_zero_rejected():
    err = config_error(doc(quorum={"min_clients": 0}), "quorum.min_clients")
    assert "must be >= 1, got 0" in str(err)


@pytest.mark.parametrize("section, key, value, expected", [
    ("quorum", "min_clients", "3", "a whole number"),
    ("quorum", "min_clients", 2.5, "a whole number"),
    ("quorum", "min_clients", True, "a whole number"),
    ("training", "learning_rate", "fast", "a number"),
    ("security", "require_signatures", "yes", "true or false"),
    ("task", "params", [64, 32], "a mapping"),
    ("task", "seed", "7", "a whole number"),
    ("task", "entrypoint", 5, "a string"),
    ("mlflow", "model_name", 5, "a string"),
    ("simulation", "rows", 100.5, "a whole number"),
    ("gates", "thresholds", [0.9], "a mapping"),
    ("screening", "max_abs_value", None, "a number"),
])
def test_wrong_type_rejected(section, key, value, expected):
    raw = doc(**{section: {**BASE.get(section, {}), key: value}})
    err = config_error(raw, f"{section}.{key}")
    assert f"expected {expected}, got {value!r}" in str(err)
    assert f"set '{section}.{key}' to {expected}" in err.fix


@pytest.mark.parametrize("section, values, field", [
    ("training", {"learning_rate": 1.5}, "training.learning_rate"),
    ("training", {"learning_rate": 0}, "training.learning_rate"),
    ("training", {"local_epochs": 0}, "training.local_epochs"),
    ("training", {"local_epochs": 101}, "training.local_epochs"),
    ("training", {"proximal_mu": -0.1}, "training.proximal_mu"),
    ("training", {"codec": "int4"}, "training.codec"),
    ("training", {"batch_size": 0}, "training.batch_size"),
    ("training", {"window": "week"}, "training.window"),
    ("gates", {"max_regression": -0.1}, "gates.max_regression"),
    ("quorum", {"min_clients": 1, "round_timeout_minutes": 0}, "quorum.round_timeout_minutes"),
    ("quorum", {"min_clients": 1, "poll_interval_seconds": 0}, "quorum.poll_interval_seconds"),
    ("quorum", {"min_clients": 1, "min_fraction": 0}, "quorum.min_fraction"),
    ("quorum", {"min_clients": 1, "min_fraction": 1.5}, "quorum.min_fraction"),
    ("quorum", {"min_clients": 1, "grace_period_minutes": -1}, "quorum.grace_period_minutes"),
    ("staleness", {"policy": "discount"}, "staleness.policy"),
    ("staleness", {"exponent": -1}, "staleness.exponent"),
    ("staleness", {"max_staleness": 0}, "staleness.max_staleness"),
    ("simulation", {"rows": 5}, "simulation.rows"),
])
def test_out_of_range_values_rejected(section, values, field):
    config_error(doc(**{section: values}), field)


@pytest.mark.parametrize("codec, problem", [
    ("int4", "unknown codec 'int4'"),
    ("gzip", "unknown codec 'gzip'"),
    ("topk", "unknown codec 'topk'"),
    ("topk:2", "codec 'topk:2': the top-k fraction must be a number in (0, 1], e.g. topk:0.01"),
    ("topk:0", "the top-k fraction must be a number in (0, 1]"),
    ("int8:row", "unknown codec 'int8:row'"),
])
def test_bad_training_codec_names_the_problem_and_the_allowed_codecs(codec, problem):
    err = config_error(doc(training={"codec": codec}), "training.codec")
    assert problem in err.problem
    assert err.fix.startswith("use one of fp32, fp16, bf16, int8, int8:channel, topk:<fraction>")


@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "int8", "int8:channel", "topk:0.01", "topk:1"])
def test_every_update_codec_is_accepted(codec):
    assert parse_federation(doc(training={"codec": codec}), SOURCE).training.codec == codec


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
    # The spec round-trips through a plain dict (clients now carry their optional access settings).
    assert spec.to_dict()["clients"][0] == {"id": "bank-a", "bucket": "s3://bank-a", "aws_conn_id": None,
                                            "endpoint_url": None, "max_examples": None}
    assert json.loads(json.dumps(spec.to_dict()))["contract"] == spec.contract.as_dict()


def test_errors_from_files_name_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(doc(gates={"treshold": {"pr_auc": 0.3}})))
    with pytest.raises(ConfigError) as info:
        load_federation(path)
    assert str(info.value).startswith(f"{path}: field 'gates.treshold': unknown field. Fix: did you mean 'thresholds'?")


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


# --- scan_federations: one broken file does not take the others down ---------------------------


def test_scan_keeps_the_good_files_and_reports_the_bad_ones(tmp_path):
    (tmp_path / "a-good.yaml").write_text(yaml.safe_dump(doc(federation="alpha")))
    (tmp_path / "b-typo.yaml").write_text(yaml.safe_dump(doc(federation="beta", quorum={"min_client": 1})))
    (tmp_path / "c-broken.yaml").write_text("federation: gamma\nclients:\n\t- oops\n")
    (tmp_path / "d-good.yaml").write_text(yaml.safe_dump(doc(federation="delta")))
    (tmp_path / "e-copy.yaml").write_text(yaml.safe_dump(doc(federation="alpha")))
    (tmp_path / "notes.txt").write_text("not a federation")
    scan = scan_federations(tmp_path)
    assert [s.federation for s in scan.specs] == ["alpha", "delta"]
    assert [(Path(e.source).name, e.field_path) for e in scan.errors] == [
        ("b-typo.yaml", "quorum.min_client"), ("c-broken.yaml", "line 3"), ("e-copy.yaml", "federation")]
    assert all(isinstance(e, ConfigError) and "Fix: " in str(e) for e in scan.errors)
    assert "did you mean 'min_clients'?" in str(scan.errors[0])
    assert str(tmp_path / "a-good.yaml") in str(scan.errors[2])  # the duplicate names the first file
    # load_federations is the strict form: the first error raises.
    with pytest.raises(ConfigError, match="quorum.min_client"):
        load_federations(tmp_path)


def test_scan_of_an_empty_or_missing_folder_is_empty(tmp_path):
    for folder in (tmp_path, tmp_path / "missing"):
        scan = scan_federations(folder)
        assert scan.specs == [] and scan.errors == []


# --- task -------------------------------------------------------------------------------------------


def test_task_section_loads():
    spec = parse_federation(doc(task={"entrypoint": "fraud_banks.task:FraudTask", "params": {"hidden": [8]},
                                      "seed": 7, "warm_start": "models:/banks-fraud/3"}), SOURCE)
    assert spec.task == TaskSpec("fraud_banks.task:FraudTask", {"hidden": [8]}, 7, "models:/banks-fraud/3")


@pytest.mark.parametrize("warm_start", ["models:/banks-fraud/3", "models:/banks-fraud@champion",
                                        "s3://team-models/fraud/v7/weights.safetensors"])
def test_warm_start_forms(warm_start):
    assert parse_federation(doc(task={"warm_start": warm_start}), SOURCE).task.warm_start == warm_start


@pytest.mark.parametrize("warm_start", ["models:/banks-fraud", "models:/a/b/c", "runs:/abc/model",
                                        "/tmp/weights.safetensors", "s3://Bad_Bucket/w"])
def test_bad_warm_start_rejected(warm_start):
    err = config_error(doc(task={"warm_start": warm_start}), "task.warm_start")
    assert "models:/<name>/<version>" in err.fix and "s3://" in err.fix


@pytest.mark.parametrize("entrypoint", ["fl_tasks.tasks.fraud.FraudTask", "fraud:", ":FraudTask", "a b:C",
                                        "fl_tasks/tasks/fraud.py:FraudTask"])
def test_entrypoint_must_be_module_colon_class(entrypoint):
    err = config_error(doc(task={"entrypoint": entrypoint}), "task.entrypoint")
    assert "is not 'module:Class'" in str(err) and "e.g. 'fraud_banks.task:FraudTask'" in err.fix


def test_unknown_task_field_suggests_close_name():
    err = config_error(doc(task={"param": {}}), "task.param")
    assert "did you mean 'params'?" in err.fix


def test_reading_a_file_does_not_import_its_task():
    # An entrypoint that cannot be imported here is only an error where the task is loaded.
    spec = parse_federation(doc(task={"entrypoint": "not_installed_here.task:Task"}), SOURCE)
    assert spec.task.entrypoint == "not_installed_here.task:Task"


def load_task_error(**task) -> ConfigError:
    spec = parse_federation(with_contract() | {"data": {"contract": FRAUD_CONTRACT}, "task": task}, SOURCE)
    with pytest.raises(ConfigError) as info:
        spec.load_task()
    err = info.value
    assert err.source == SOURCE and str(err).startswith(f"{SOURCE}: field '{err.field_path}': ")
    assert "Fix: " in str(err) and err.fix
    return err


def test_load_task_errors_name_the_entrypoint_or_the_params():
    err = load_task_error(entrypoint="not_installed_here.task:Task")
    assert err.field_path == "task.entrypoint"
    assert "cannot import 'not_installed_here.task'" in err.problem and "PYTHONPATH" in err.fix
    err = load_task_error(entrypoint="fl_tasks.tasks.fraud:Fraud")
    assert err.field_path == "task.entrypoint" and "has no 'Fraud'" in err.problem
    err = load_task_error(entrypoint="fl_tasks.contract:Column")
    assert err.field_path == "task.entrypoint" and "not a subclass" in err.problem
    err = load_task_error(params={"hidden": [8], "depth": 2})
    assert err.field_path == "task.params"
    assert "does not take params ['depth', 'hidden']" in err.problem and "it accepts hidden, batch_norm" in err.fix
    err = load_task_error(params={"hidden": []})
    assert err.field_path == "task.params" and "hidden must be a list of positive layer widths" in err.problem


def test_a_module_whose_name_says_params_is_still_an_entrypoint_error():
    err = load_task_error(entrypoint="team_params.task:Task")
    assert err.field_path == "task.entrypoint" and "cannot import 'team_params.task'" in err.problem


# --- data contract ------------------------------------------------------------------------------------


def test_contract_loads():
    contract = parse_federation(doc(), SOURCE).contract
    assert contract == DataContract(
        label=Column("is_fraud", "boolean"),
        features=(Column("amount", "numeric"),
                  Column("channel", "categorical", ("web", "pos"), max_unknown_share=0.05)),
        event_time="event_time")
    assert contract.allow_extra_columns is False and contract.min_rows == 2


def test_contract_names_and_label_shortcut():
    contract = parse_federation(with_contract(
        label="fraud", features=[{"names": ["v1", "v2"], "type": "numeric", "max_missing_share": 0.1}],
        allow_extra_columns=True, min_rows=50), SOURCE).contract
    assert contract.label == Column("fraud", "boolean")  # a bare name is a boolean label
    assert contract.features == (Column("v1", "numeric", max_missing_share=0.1),
                                 Column("v2", "numeric", max_missing_share=0.1))
    assert contract.allow_extra_columns is True and contract.min_rows == 50


def test_data_must_be_exactly_a_contract():
    for data in (None, {}, {"dataset": "creditcard"}, {"contract": CONTRACT, "dataset": "creditcard"}, "creditcard"):
        raw = doc(data=data) if data is not None else {k: v for k, v in doc().items() if k != "data"}
        err = config_error(raw, "data")
        assert "expected exactly 'contract'" in err.problem and "data: {contract:" in err.fix


@pytest.mark.parametrize("changes, field, fragment", [
    ({"label": None}, "data.contract.label", "needs exactly one of 'name' or 'names'"),
    ({"label": {"name": "is_fraud", "type": "text"}}, "data.contract.label.type", "unknown column type 'text'"),
    ({"features": []}, "data.contract.features", "at least one feature column is required"),
    ({"features": "amount"}, "data.contract.features", "at least one feature column is required"),
    ({"features": ["amount"]}, "data.contract.features[0]", "expected a mapping"),
    ({"features": [{"name": "amount"}]}, "data.contract.features[0].type", "unknown column type None"),
    ({"features": [{"name": "amount", "type": "money"}]}, "data.contract.features[0].type",
     "unknown column type 'money'"),
    ({"features": [{"name": "amount", "names": ["a"], "type": "numeric"}]}, "data.contract.features[0]",
     "needs exactly one of 'name' or 'names'"),
    ({"features": [{"names": [], "type": "numeric"}]}, "data.contract.features[0].names", "expected column names"),
    ({"features": [{"name": "", "type": "numeric"}]}, "data.contract.features[0].name", "expected column names"),
    ({"features": [{"name": "amount", "type": "numeric", "unit": "EUR"}]}, "data.contract.features[0].unit",
     "unknown field"),
    ({"features": [{"name": "channel", "type": "categorical"}]}, "data.contract.features[0].categories",
     "categorical columns need their categories"),
    ({"features": [{"name": "amount", "type": "numeric", "categories": ["a"]}]},
     "data.contract.features[0].categories", "categorical columns need their categories, other types have none"),
    ({"features": [{"name": "channel", "type": "categorical", "categories": [1, 2]}]},
     "data.contract.features[0].categories", "expected a list of strings"),
    ({"features": [{"name": "amount", "type": "numeric", "max_missing_share": 1.5}]},
     "data.contract.features[0].max_missing_share", "1.5 is not a share between 0 and 1"),
    ({"features": [{"name": "amount", "type": "numeric", "max_missing_share": True}]},
     "data.contract.features[0].max_missing_share", "True is not a share"),
    ({"features": [{"name": "is_fraud", "type": "numeric"}]}, "data.contract", "columns ['is_fraud'] are declared twice"),
    ({"event_time": 5}, "data.contract.event_time", "expected a column name"),
    ({"allow_extra_columns": "no"}, "data.contract.allow_extra_columns", "expected true or false"),
    ({"min_rows": 0}, "data.contract.min_rows", "0 is not a positive whole number"),
    ({"min_row": 5}, "data.contract.min_row", "unknown field"),
])
def test_contract_errors_name_the_field(changes, field, fragment):
    err = config_error(with_contract(**changes), field)
    assert fragment in err.problem


def test_an_interval_window_needs_an_event_time():
    err = config_error(with_contract(event_time=None), "training.window")
    assert "needs an event-time column" in err.problem and "data.contract.event_time" in err.fix
    spec = parse_federation(with_contract(event_time=None) | {"training": {"window": "all"}}, SOURCE)
    assert spec.contract.event_time is None and spec.training.window == "all"


# --- simulation, validation, gates, storage, clients, aggregation, screening -------------------------------


def test_simulation_section():
    spec = parse_federation(doc(simulation={"source": "creditcard", "rows": 500, "seed": 9}), SOURCE)
    assert spec.simulation == SimulationSpec("creditcard", 500, 9)
    err = config_error(doc(simulation={"dataset": "creditcard"}), "simulation.dataset")
    assert "allowed fields: source, rows, seed" in err.fix


@pytest.mark.parametrize("uri", ["s3://fl-coordinator/banks/holdout/validation.parquet", "/data/holdout.parquet",
                                 "holdout.csv"])
def test_coordinator_data(uri):
    spec = parse_federation(doc(evaluation={"coordinator_data": uri}), SOURCE)
    assert spec.evaluation.coordinator_data == uri and spec.evaluation.sources == ("federated", "coordinator")
    alone = parse_federation(doc(evaluation={"coordinator_data": uri, "federated": False}), SOURCE)
    assert alone.evaluation.federated is None and alone.evaluation.sources == ("coordinator",)


@pytest.mark.parametrize("uri", ["/data/holdout.npz", "https://example.com/v.parquet", "holdout"])
def test_bad_coordinator_data(uri):
    err = config_error(doc(evaluation={"coordinator_data": uri}), "evaluation.coordinator_data")
    assert "neither an s3:// URI nor a .parquet or .csv file" in err.problem


def test_federated_evaluation_settings():
    spec = parse_federation(doc(evaluation={"federated": {"min_silos": 2, "statistic": "median",
                                                          "max_silo_regression": 0.05, "holdout_fraction": 0.3}}),
                            SOURCE)
    assert spec.evaluation.federated == FederatedEvaluationSpec(0.3, 2, 10.0, "median", 0.05)
    assert parse_federation(doc(evaluation={"federated": True}), SOURCE).evaluation.federated.min_silos == 2


@pytest.mark.parametrize("section, field, words", [
    ({"federated": False}, "evaluation", "no source for the quality gates"),
    ({"federated": {"holdout_fraction": 1.0}}, "evaluation.federated.holdout_fraction", "between 0 and 1"),
    ({"federated": {"min_silos": 99}}, "evaluation.federated.min_silos", "must be <= 2"),
    ({"federated": {"statistic": "mode"}}, "evaluation.federated.statistic", "must be one of mean, median"),
    ({"federated": {"max_silo_regression": -0.1}}, "evaluation.federated.max_silo_regression", "must be >= 0"),
    ({"federated": {"min_silo": 2}}, "evaluation.federated.min_silo", "unknown field"),
    ({"data": "x.parquet"}, "evaluation", "allowed fields: federated, coordinator_data"),
])
def test_bad_evaluation(section, field, words):
    err = config_error(doc(evaluation=section), field)
    assert words in err.problem


def test_the_old_validation_section_says_where_it_went():
    err = config_error(doc(validation={"data": "s3://x/v.parquet"}), "validation")
    assert "evaluation: {coordinator_data:" in err.fix


def test_gates_thresholds():
    spec = parse_federation(doc(gates={"thresholds": {"pr_auc": 0.3, "log_loss": 1}, "max_regression": 0.02}), SOURCE)
    assert spec.gates == GatesSpec({"pr_auc": 0.3, "log_loss": 1}, 0.02)
    err = config_error(doc(gates={"thresholds": {"pr_auc": "high"}}), "gates.thresholds.pr_auc")
    assert "expected a number, got 'high'" in err.problem and "pr_auc: 0.3" in err.fix
    config_error(doc(gates={"thresholds": {"pr_auc": True}}), "gates.thresholds.pr_auc")
    err = config_error(doc(gates={"min_roc_auc": 0.9}), "gates.min_roc_auc")  # the old form
    assert "allowed fields: thresholds, max_regression" in err.fix


def test_storage_section():
    spec = parse_federation(doc(storage={"endpoint_url": "http://minio:9000", "aws_conn_id": "aws_fl"}), SOURCE)
    assert (spec.storage_endpoint_url, spec.storage_aws_conn_id) == ("http://minio:9000", "aws_fl")
    err = config_error(doc(storage={"region": "eu-west-1"}), "storage")
    assert "only 'endpoint_url' and 'aws_conn_id' are allowed" in err.problem
    config_error(doc(storage={"endpoint_url": 9000}), "storage.endpoint_url")
    err = config_error(doc(storage={"aws_conn_id": "aws-fl"}), "storage.aws_conn_id")
    assert "'aws-fl' is not an Airflow connection id" in err.problem and "underscores" in err.fix


def test_per_client_access_and_size():
    raw = doc()
    raw["clients"][0].update(aws_conn_id="aws_bank_a", endpoint_url="https://s3.bank-a.example", max_examples=250000)
    spec = parse_federation(raw, SOURCE)
    assert spec.client("bank-a") == ClientSpec("bank-a", "s3://bank-a", "aws_bank_a", "https://s3.bank-a.example",
                                               250000)
    assert spec.client("bank-b").aws_conn_id is None and spec.client("bank-b").max_examples is None


@pytest.mark.parametrize("key, value, fragment", [
    ("aws_conn_id", "aws bank", "is not an Airflow connection id"),
    ("aws_conn_id", 7, "is not an Airflow connection id"),
    ("endpoint_url", 443, "expected a URL string"),
    ("max_examples", 0, "0 is not a positive whole number"),
    ("max_examples", 2.5, "2.5 is not a positive whole number"),
    ("max_examples", True, "True is not a positive whole number"),
])
def test_bad_per_client_settings(key, value, fragment):
    raw = doc()
    raw["clients"][1][key] = value
    err = config_error(raw, f"clients[1].{key}")
    assert fragment in err.problem


def test_max_weight_share():
    assert parse_federation(doc(aggregation={"strategy": "fedavg", "max_weight_share": 0.3}), SOURCE).max_weight_share \
        == 0.3
    assert parse_federation(doc(aggregation={"strategy": "fedavg", "max_weight_share": None}),
                            SOURCE).max_weight_share is None
    assert parse_federation(doc(aggregation={"max_weight_share": 1}), SOURCE).max_weight_share == 1.0
    for bad in (0, 1.5, -0.1, "half", True):
        err = config_error(doc(aggregation={"strategy": "fedavg", "max_weight_share": bad}),
                           "aggregation.max_weight_share")
        assert "is not a share in (0, 1]" in err.problem and "null" in err.fix


def test_screening_defaults_are_on_and_cheap():
    spec = parse_federation(doc(), SOURCE)
    assert spec.screening == ScreeningSpec(max_update_norm=None, max_norm_ratio=5.0, min_cosine=None,
                                           max_abs_value=1e6, min_norm_ratio=0.01, max_example_growth=10.0)
    off = parse_federation(doc(screening={"min_norm_ratio": None, "max_example_growth": None,
                                          "max_norm_ratio": 3}), SOURCE).screening
    assert (off.min_norm_ratio, off.max_example_growth, off.max_norm_ratio) == (None, None, 3.0)


# --- per-round settings: fl_tasks.settings is the one source of defaults and bounds -------------------------


SPEC_FIELDS = {"quorum": QuorumSpec, "training": TrainingSpec, "gates": GatesSpec,
               "evaluation.federated": FederatedEvaluationSpec}


def test_every_round_setting_is_a_field_of_the_file():
    for setting in ROUND_SETTINGS:
        section, _, name = setting.path.rpartition(".")
        if section == "aggregation":
            continue  # parsed by _parse_aggregation: `aggregation: name` or a mapping
        assert name in {f.name for f in dataclasses.fields(SPEC_FIELDS[section])}, setting.path


@pytest.mark.parametrize("setting", [s for s in ROUND_SETTINGS if s.path.rpartition(".")[0] in SPEC_FIELDS],
                         ids=lambda s: s.path)
def test_section_defaults_come_from_the_settings_table(setting):
    section, _, name = setting.path.rpartition(".")
    field = next(f for f in dataclasses.fields(SPEC_FIELDS[section]) if f.name == name)
    default = field.default if field.default is not dataclasses.MISSING else None
    if setting.type == "object":  # mutable: a factory, and empty means "none"
        assert field.default_factory() == {} and setting.default is None
    else:
        assert default == setting.default


def test_round_defaults_are_the_files_values_by_setting_name():
    spec = parse_federation(doc(aggregation={"strategy": "trimmed_mean", "params": {"beta": 0.2}},
                                gates={"thresholds": {"pr_auc": 0.3}}), SOURCE)
    defaults = spec.round_defaults()
    assert set(defaults) == {s.name for s in ROUND_SETTINGS}
    assert defaults["aggregator"] == "trimmed_mean" and defaults["aggregator_params"] == {"beta": 0.2}
    assert defaults["min_clients"] == 2 and defaults["gate_thresholds"] == {"pr_auc": 0.3}
    plain = parse_federation(doc(quorum={}), SOURCE).round_defaults()
    assert all(plain[s.name] == s.default for s in ROUND_SETTINGS if s.type != "object" and s.name !=
               "min_evaluating_silos")
    assert plain["min_evaluating_silos"] == 2  # the file's default, where the federation has two clients or more


@pytest.mark.parametrize("setting", [s for s in ROUND_SETTINGS if s.type in ("integer", "number")],
                         ids=lambda s: s.path)
def test_file_bounds_are_the_settings_bounds(setting):
    """Each numeric setting's file field is refused exactly where the table's bound says."""
    section, _, name = setting.path.rpartition(".")
    bounds = setting.bounds(len(BASE["clients"]))
    assert bounds, setting.path
    # (value just outside the bound, whether the bound itself is allowed)
    probes = {"minimum": (-1, True), "maximum": (+1, True), "exclusiveMinimum": (0, False),
              "exclusiveMaximum": (0, False)}

    def parsed(value):
        raw = doc()
        *outer, inner = section.split(".")
        parent = raw
        for part in outer:  # evaluation.federated: a section inside a section
            parent = parent.setdefault(part, {})
        parent[inner] = {**parent.get(inner, {}), name: value}
        return parse_federation(raw, SOURCE)

    for key, bound in bounds.items():
        step, bound_allowed = probes[key]
        outside = bound + step
        with pytest.raises(ConfigError) as info:
            parsed(outside)
        assert info.value.field_path == setting.path and f"got {outside!r}" in info.value.problem
        assert setting.allowed(len(BASE["clients"])) in info.value.fix
        if bound_allowed:
            found = parsed(bound)
            for part in setting.path.split("."):
                found = getattr(found, part)
            assert found == bound


def test_min_clients_bound_follows_the_number_of_clients():
    setting = next(s for s in ROUND_SETTINGS if s.name == "min_clients")
    assert setting.maximum == CLIENTS
    raw = doc(quorum={"min_clients": 3})
    raw["clients"].append({"id": "bank-c", "bucket": "s3://bank-c"})
    assert parse_federation(raw, SOURCE).quorum.min_clients == 3
