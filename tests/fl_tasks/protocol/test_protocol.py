"""fl_tasks/protocol: object keys, round ids and manifests with a strict schema."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from datetime import datetime

import pytest

from fl_tasks import protocol
from fl_tasks.protocol import (MAX_MANIFEST_BYTES, PROTOCOL_VERSION, DeclineManifest, GlobalManifest, ManifestError,
                               UpdateManifest, decline_key, global_manifest_key, global_model_key,
                               round_id_for_interval, round_id_for_number, round_prefix, rounds_listing_prefix,
                               sha256_hex, update_manifest_key, update_payload_key, validate_round_id)
from fl_tasks.protocol.drift import MAX_COLUMNS, DriftReport, DriftSettings

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()


# --- keys ------------------------------------------------------------------------------------


def test_key_layout_without_prefix():
    assert global_model_key("", "banks", "000001") == "banks/rounds/000001/global/model.safetensors"
    assert global_manifest_key("", "banks", "000001") == "banks/rounds/000001/global/manifest.json"
    assert update_payload_key("", "banks", "000001") == "banks/rounds/000001/update/update.safetensors"
    assert update_manifest_key("", "banks", "000001") == "banks/rounds/000001/update/manifest.json"
    assert decline_key("", "banks", "000001") == "banks/rounds/000001/update/decline.json"
    assert round_prefix("", "banks", "000001") == "banks/rounds/000001"
    assert rounds_listing_prefix("", "banks") == "banks/rounds/"


def test_key_layout_with_client_prefix():
    for prefix in ("silos/bank-a", "/silos/bank-a/"):
        assert global_model_key(prefix, "banks", "r1") == "silos/bank-a/banks/rounds/r1/global/model.safetensors"
        assert global_manifest_key(prefix, "banks", "r1") == "silos/bank-a/banks/rounds/r1/global/manifest.json"
        assert update_payload_key(prefix, "banks", "r1") == "silos/bank-a/banks/rounds/r1/update/update.safetensors"
        assert update_manifest_key(prefix, "banks", "r1") == "silos/bank-a/banks/rounds/r1/update/manifest.json"
        assert decline_key(prefix, "banks", "r1") == "silos/bank-a/banks/rounds/r1/update/decline.json"
        assert rounds_listing_prefix(prefix, "banks") == "silos/bank-a/banks/rounds/"


def test_keys_validate_the_round_id():
    with pytest.raises(ValueError):
        global_model_key("", "banks", "../../etc")
    with pytest.raises(ValueError):
        update_manifest_key("p", "banks", "a/b")
    with pytest.raises(ValueError):
        decline_key("p", "banks", "../000001")


# --- round ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("good", ["000001", "20240101T000000", "r", "manual-1", "a.b_c-d", "x" * 64])
def test_valid_round_ids(good):
    assert validate_round_id(good) == good


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "x" * 65, ".hidden", "-x", "a b", "abc\n", "a\\b", None, 1])
def test_invalid_round_ids(bad):
    with pytest.raises(ValueError, match="round id"):
        validate_round_id(bad)


def test_round_id_helpers():
    assert round_id_for_interval(datetime(2024, 3, 5, 7, 8, 9)) == "20240305T070809"
    assert round_id_for_number(7) == "000007"
    assert round_id_for_number(123456) == "123456"
    # Zero padding keeps lexical order equal to numeric order.
    assert sorted(round_id_for_number(n) for n in (10, 9, 100)) == ["000009", "000010", "000100"]


def test_sha256_hex():
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# --- manifests ---------------------------------------------------------------------------------


# The global manifest names the task (entrypoint, version, params and their hash) and the data
# contract, where it used to carry a `model` spec.
TASK = {"entrypoint": "fl_tasks.tasks.fraud:FraudTask", "version": "2", "params": {"hidden": [64, 32]},
        "params_sha256": SHA_B}
CONTRACT = {"label": {"name": "Class", "type": "boolean", "categories": [], "max_missing_share": 0.0,
                      "max_unknown_share": 0.0},
            "features": [{"name": "Amount", "type": "numeric", "categories": [], "max_missing_share": 0.0,
                          "max_unknown_share": 0.0}],
            "event_time": "event_time", "allow_extra_columns": False, "min_rows": 2}


def global_manifest(**changes) -> GlobalManifest:
    values = dict(federation="banks", round_id="000001", model_name="banks-fraud-mlp", model_version="seed",
                  task=TASK, contract=CONTRACT, payload_sha256=SHA_A,
                  payload_bytes=1234, training={"local_epochs": 1, "learning_rate": 0.001},
                  data_window={"start": None, "end": "2013-09-02T00:00:00"},
                  deadline="2024-01-01T00:10:00+00:00", created_at="2024-01-01T00:00:00+00:00")
    values.update(changes)
    return GlobalManifest(**values)


# What a silo sends (fl_tasks.protocol.drift.DriftReport): scores and evidently's verdicts, no rows.
DRIFT_REPORT = {"reference": "first window (round 000001, 4120 rows)", "reference_rows": 4120, "current_rows": 3980,
                "drifted_share": 0.5, "dataset_drifted": True,
                "columns": {"Amount": {"score": 0.31, "drifted": True, "method": "Wasserstein distance (normed)"},
                            "V1": {"score": 0.62, "drifted": False, "method": "K-S p_value"}}}
# What the coordinator asks (fl_tasks.protocol.drift.DriftSettings).
DRIFT_SETTINGS = {"reference": "first", "reference_window": {}, "columns": ["Amount", "V1"], "drift_share": 0.5,
                  "method": None, "threshold": None}


def update_manifest(**changes) -> UpdateManifest:
    values = dict(client_id="bank-a", federation="banks", round_id="000001", base_model_version="3",
                  base_sha256=SHA_A, num_examples=5000, codec="fp32", payload_sha256=SHA_B, payload_bytes=99,
                  metrics={"train_loss": 0.25, "train_rows": 5000}, drift=DRIFT_REPORT, timings={"train": 1.5},
                  signature="", created_at="2024-01-01T00:05:00+00:00")
    values.update(changes)
    return UpdateManifest(**values)


def body_of(manifest) -> dict:
    return json.loads(manifest.to_json())


def encode(body: dict) -> bytes:
    return json.dumps(body).encode()


def test_global_manifest_round_trip():
    m = global_manifest()
    data = m.to_json()
    body = json.loads(data)
    assert body["kind"] == "global"
    assert body["protocol"] == PROTOCOL_VERSION
    assert body["payload_sha256"] == SHA_A
    assert GlobalManifest.from_json(data) == m
    # Canonical bytes: sorted keys, no spaces, so the same manifest always hashes the same.
    assert data == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def test_update_manifest_round_trip():
    m = update_manifest()
    assert UpdateManifest.from_json(m.to_json()) == m
    assert body_of(m)["kind"] == "update"


def test_update_manifest_defaults_fill_optional_fields():
    body = body_of(update_manifest())
    for name in ("metrics", "drift", "timings", "signature", "created_at"):
        del body[name]
    m = UpdateManifest.from_json(encode(body))
    assert m.metrics == {} and m.drift == {} and m.timings == {} and m.signature == "" and m.created_at == ""


def expect_error(cls, body_or_bytes, *fragments: str) -> ManifestError:
    data = body_or_bytes if isinstance(body_or_bytes, bytes) else encode(body_or_bytes)
    with pytest.raises(ManifestError) as info:
        cls.from_json(data)
    for fragment in fragments:
        assert fragment in str(info.value)
    return info.value


@pytest.mark.parametrize("name", ["client_id", "round_id", "num_examples", "codec", "payload_sha256",
                                  "payload_bytes", "base_sha256", "base_model_version", "federation"])
def test_update_missing_required_field(name):
    body = body_of(update_manifest())
    del body[name]
    expect_error(UpdateManifest, body, f"missing field '{name}'")


@pytest.mark.parametrize("name", ["deadline", "task", "contract", "payload_sha256", "data_window"])
def test_global_missing_required_field(name):
    body = body_of(global_manifest())
    del body[name]
    expect_error(GlobalManifest, body, f"missing field '{name}'")


def test_unknown_field_rejected():
    body = body_of(update_manifest())
    body["pickle_payload"] = "gASV..."
    expect_error(UpdateManifest, body, "unknown fields ['pickle_payload']")
    body = body_of(global_manifest())
    body["extra"] = 1
    expect_error(GlobalManifest, body, "unknown fields ['extra']")


@pytest.mark.parametrize("name, value, got", [
    ("num_examples", "5000", "str"),
    ("num_examples", 5000.0, "float"),
    ("num_examples", None, "NoneType"),
    ("payload_bytes", [99], "list"),
    ("client_id", 7, "int"),
    ("metrics", [], "list"),
    ("codec", {"name": "fp32"}, "dict"),
])
def test_wrong_type_rejected(name, value, got):
    body = body_of(update_manifest())
    body[name] = value
    expect_error(UpdateManifest, body, f"field '{name}' has type {got}")


def test_bool_where_int_expected_rejected():
    body = body_of(update_manifest())
    body["num_examples"] = True  # bool is an int subclass in Python: must still be refused
    expect_error(UpdateManifest, body, "field 'num_examples' has type bool, expected int")
    body = body_of(global_manifest())
    body["payload_bytes"] = True
    expect_error(GlobalManifest, body, "field 'payload_bytes' has type bool")


@pytest.mark.parametrize("value", ["", "abc", SHA_A.upper(), SHA_A[:-1], SHA_A + "0", SHA_A + "\n",
                                   "g" * 64])
def test_bad_sha256_rejected(value):
    expect_error(UpdateManifest, body_of(update_manifest(payload_sha256=value)), "'payload_sha256' is not a sha256")
    expect_error(UpdateManifest, body_of(update_manifest(base_sha256=value)), "'base_sha256' is not a sha256")
    expect_error(GlobalManifest, body_of(global_manifest(payload_sha256=value)), "'payload_sha256' is not a sha256")


@pytest.mark.parametrize("value", [0, -1, -5000, UpdateManifest.MAX_EXAMPLES, 10**30])
def test_num_examples_out_of_range_rejected(value):
    expect_error(UpdateManifest, body_of(update_manifest(num_examples=value)), "'num_examples' must be in 1..")


def test_num_examples_bounds_inclusive():
    assert UpdateManifest.from_json(update_manifest(num_examples=1).to_json()).num_examples == 1
    top = UpdateManifest.MAX_EXAMPLES - 1
    assert UpdateManifest.from_json(update_manifest(num_examples=top).to_json()).num_examples == top


def test_unknown_codec_rejected():
    expect_error(UpdateManifest, body_of(update_manifest(codec="pickle")), "field 'codec' is unknown: 'pickle'")


@pytest.mark.parametrize("bad", ["bank/a", "../a", "Bank-A", "bank-a\n", ""])
def test_bad_client_id_rejected(bad):
    expect_error(UpdateManifest, body_of(update_manifest(client_id=bad)), "field 'client_id'")


def test_payload_bytes_must_be_positive():
    expect_error(UpdateManifest, body_of(update_manifest(payload_bytes=0)), "'payload_bytes' must be positive")
    expect_error(GlobalManifest, body_of(global_manifest(payload_bytes=-1)), "'payload_bytes' must be positive")


@pytest.mark.parametrize("name", ["metrics", "timings"])
@pytest.mark.parametrize("value", [{"loss": "low"}, {"loss": True}, {"loss": None}, {"loss": [1.0]}])
def test_metric_maps_must_hold_numbers(name, value):
    expect_error(UpdateManifest, body_of(update_manifest(**{name: value})), f"field '{name}' must map names to numbers")


# --- drift blocks: the coordinator's settings in the global manifest, the silo's scores in its update ---


def test_drift_blocks_round_trip():
    update = UpdateManifest.from_json(update_manifest().to_json())
    assert update.drift == DRIFT_REPORT
    assert DriftReport.from_dict(update.drift).columns["Amount"].drifted is True
    fixed = {**DRIFT_SETTINGS, "reference": "fixed", "reference_window": {"start": "2013-09-01", "end": None}}
    for settings in (DRIFT_SETTINGS, fixed):
        manifest = GlobalManifest.from_json(global_manifest(drift=settings).to_json())
        assert manifest.drift == settings and DriftSettings.from_dict(manifest.drift).as_dict() == settings


def test_drift_blocks_may_be_empty_or_absent():
    assert UpdateManifest.from_json(update_manifest(drift={}).to_json()).drift == {}  # no scores this round
    body = body_of(global_manifest(drift=DRIFT_SETTINGS))
    del body["drift"]  # a coordinator from before drift: the silos compute none
    assert GlobalManifest.from_json(encode(body)).drift == {}
    assert body_of(global_manifest())["drift"] == {}


REMOVE = object()


def bad_report(path: str, value) -> dict:
    """DRIFT_REPORT with the field at `path` (dotted; `columns.V1.score`) set to `value`, or
    removed when `value` is REMOVE."""
    report = json.loads(json.dumps(DRIFT_REPORT))
    *parents, last = path.split(".")
    target = report
    for name in parents:
        target = target[name]
    if value is REMOVE:
        del target[last]
    else:
        target[last] = value
    return report


@pytest.mark.parametrize("path, value, fragment", [
    ("reference", 7, "'drift'.reference must be text"),
    ("reference", "", "'drift'.reference must be text"),
    ("reference", "x" * 201, "'drift'.reference must be text"),
    ("reference_rows", 1.5, "'drift'.reference_rows must be a row count"),
    ("reference_rows", True, "'drift'.reference_rows must be a row count"),
    ("current_rows", -1, "'drift'.current_rows must be a row count"),
    ("drifted_share", "half", "'drift'.drifted_share must be in [0, 1]"),
    ("drifted_share", 1.5, "'drift'.drifted_share must be in [0, 1]"),
    ("dataset_drifted", 1, "'drift'.dataset_drifted must be true or false"),
    ("columns", [], "'drift'.columns must map"),
    ("columns.V1.score", "0.6", "'drift'.columns.V1.score must be a finite number"),
    ("columns.V1.score", None, "'drift'.columns.V1.score must be a finite number"),
    ("columns.V1.drifted", "no", "'drift'.columns.V1.drifted must be true or false"),
    ("columns.V1.method", "", "'drift'.columns.V1.method must name the method"),
    ("columns.V1.rows", [1.0, 2.0], "'drift'.columns.V1 must hold exactly score, drifted and method"),
    ("columns.V1.method", REMOVE, "'drift'.columns.V1 must hold exactly score, drifted and method"),
    ("columns.V1", 0.62, "'drift'.columns.V1 must hold exactly score, drifted and method"),
    ("raw_rows", [[1.0, 2.0]], "field 'drift' must hold exactly"),
    ("columns", REMOVE, "field 'drift' must hold exactly"),
])
def test_malformed_drift_scores_are_rejected_naming_the_field(path, value, fragment):
    error = expect_error(UpdateManifest, body_of(update_manifest(drift=bad_report(path, value))), fragment)
    assert "update manifest field 'drift'" in str(error)


def test_drift_scores_of_too_many_columns_are_rejected():
    cell = {"score": 0.1, "drifted": False, "method": "PSI"}
    report = {**DRIFT_REPORT, "columns": {f"c{i}": cell for i in range(MAX_COLUMNS + 1)}}
    manifest = update_manifest(drift=report)
    with pytest.raises(ManifestError, match=f"'drift'.columns must map at most {MAX_COLUMNS} column names"):
        manifest.validate()


def test_non_finite_drift_scores_are_rejected():
    for value in (math.nan, math.inf):
        # Written by a JSON encoder that allows them: the strict reader refuses the bytes...
        body = body_of(update_manifest()) | {"drift": bad_report("columns.V1.score", value)}
        expect_error(UpdateManifest, encode(body), "not valid JSON")
        # ...and the schema refuses the value in a manifest built in Python.
        with pytest.raises(ManifestError, match="'drift'.columns.V1.score must be a finite number"):
            update_manifest(drift=bad_report("columns.V1.score", value)).validate()
    with pytest.raises(ManifestError, match="'drift'.drifted_share must be in"):
        update_manifest(drift=bad_report("drifted_share", math.nan)).validate()


def test_drift_column_names_must_be_text():
    report = {**DRIFT_REPORT, "columns": {1: {"score": 0.1, "drifted": False, "method": "PSI"}}}
    with pytest.raises(ManifestError, match="column names must be text"):
        update_manifest(drift=report).validate()


@pytest.mark.parametrize("change, fragment", [
    ({"reference": "last"}, "'drift'.reference must be one of ['first', 'previous', 'fixed']"),
    ({"reference": "fixed"}, "'drift'.reference_window needs start or end when reference is 'fixed'"),
    ({"reference": "fixed", "reference_window": {"start": "yesterday"}}, "'drift'.reference_window allows start"),
    ({"reference_window": {"from": "2013-09-01"}}, "'drift'.reference_window allows start and end"),
    ({"columns": []}, "'drift'.columns must name 1..512 columns"),
    ({"columns": "Amount"}, "'drift'.columns must name"),
    ({"columns": ["Amount", 3]}, "'drift'.columns must name"),
    ({"columns": [f"c{i}" for i in range(MAX_COLUMNS + 1)]}, "'drift'.columns must name 1..512 columns"),
    ({"columns": ["Amount", "Amount"]}, "'drift'.columns names a column more than once"),
    ({"drift_share": 0}, "'drift'.drift_share must be in (0, 1]"),
    ({"drift_share": True}, "'drift'.drift_share must be in (0, 1]"),
    ({"drift_share": 1.5}, "'drift'.drift_share must be in (0, 1]"),
    ({"method": 3}, "'drift'.method must be null or a method name"),
    ({"threshold": "0.1"}, "'drift'.threshold must be null or a number"),
    ({"action": "block"}, "field 'drift' must hold exactly"),
])
def test_malformed_drift_settings_are_rejected_naming_the_field(change, fragment):
    error = expect_error(GlobalManifest, body_of(global_manifest(drift={**DRIFT_SETTINGS, **change})), fragment)
    assert "global manifest field 'drift'" in str(error)


def test_a_drift_block_must_be_an_object():
    body = body_of(global_manifest())
    body["drift"] = ["Amount"]
    expect_error(GlobalManifest, body, "field 'drift' has type list, expected dict")


def test_global_deadline_and_window_checked():
    expect_error(GlobalManifest, body_of(global_manifest(deadline="tomorrow")), "field 'deadline'")
    expect_error(GlobalManifest, body_of(global_manifest(data_window={"start": None, "stop": None})),
                 "field 'data_window'")


def test_bad_round_id_in_manifest_rejected():
    body = body_of(update_manifest())
    body["round_id"] = "../000001"
    with pytest.raises(ValueError, match="round id"):
        UpdateManifest.from_json(encode(body))


@pytest.mark.parametrize("data", [b"\xff\xfe\x00garbage", b"not json", b"{\"kind\": \"update\"", b""])
def test_non_json_bytes_rejected(data):
    expect_error(UpdateManifest, data, "update manifest is not valid JSON")


@pytest.mark.parametrize("body", [[], [1, 2], "update", 5, None])
def test_non_object_json_rejected(body):
    expect_error(UpdateManifest, json.dumps(body).encode(), "must be a JSON object")


def test_oversized_manifest_rejected_before_parsing():
    body = body_of(update_manifest())
    body["signature"] = "x" * MAX_MANIFEST_BYTES
    data = encode(body)
    assert len(data) > MAX_MANIFEST_BYTES
    expect_error(UpdateManifest, data, f"{len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    # Not valid JSON either: the size check comes first.
    expect_error(UpdateManifest, b"[" * (MAX_MANIFEST_BYTES + 1), "over the")


def test_manifest_at_the_size_limit_is_read():
    body = body_of(update_manifest(created_at=""))  # a free-form string field as filler
    base = len(encode(body))
    body["created_at"] = "s" * (MAX_MANIFEST_BYTES - base)
    data = encode(body)
    assert len(data) == MAX_MANIFEST_BYTES
    assert UpdateManifest.from_json(data).created_at == body["created_at"]


def test_wrong_kind_rejected():
    expect_error(UpdateManifest, global_manifest().to_json(), "field 'kind' must be 'update'")
    expect_error(GlobalManifest, update_manifest().to_json(), "field 'kind' must be 'global'")
    body = body_of(update_manifest())
    del body["kind"]
    expect_error(UpdateManifest, body, "field 'kind'")


def test_wrong_protocol_version_rejected():
    body = body_of(update_manifest())
    body["protocol"] = PROTOCOL_VERSION + 1
    expect_error(UpdateManifest, body, "field 'protocol' must be 1")


def test_manifest_error_is_a_value_error():
    assert issubclass(ManifestError, ValueError)


def test_manifests_are_frozen():
    m = update_manifest()
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.num_examples = 1  # type: ignore[misc]


def test_name_pattern_limits():
    assert protocol.NAME_PATTERN.fullmatch("a" * 40)
    assert not protocol.NAME_PATTERN.fullmatch("a" * 41)
    assert protocol.NAME_PATTERN.fullmatch("bank-north")


@pytest.mark.parametrize("data, fragment", [
    (b'{"num_examples": NaN}', "NaN is not a JSON number"),
    (b'{"num_examples": Infinity}', "Infinity is not a JSON number"),
    (b'{"num_examples": -Infinity}', "-Infinity is not a JSON number"),
    (b'{"x": 1e999}', "out of range"),
    (b'{"kind": "update", "kind": "update"}', "duplicate keys ['kind']"),
    (b"[" * 30000 + b"]" * 30000, "nested too deeply"),  # under the size limit, over Python's recursion limit
], ids=["nan", "inf", "-inf", "overflow", "duplicate-key", "deep"])
def test_only_strict_json_is_read(data, fragment):
    expect_error(UpdateManifest, data, "update manifest is not valid JSON", fragment)


def test_metric_values_must_be_finite():
    body = body_of(update_manifest())
    data = encode(body).replace(b'"train_loss": 0.25', b'"train_loss": 1e999')
    expect_error(UpdateManifest, data, "out of range")
    # Constructed in code (not parsed), a non-finite value is still refused by validate().
    with pytest.raises(ManifestError, match="not a finite number"):
        update_manifest(metrics={"train_loss": float("nan")}).validate()


@pytest.mark.parametrize("signature", ["abc", "A" * 64, "g" * 64, "0" * 63, "0" * 65])
def test_signature_is_empty_or_64_hex_digits(signature):
    body = body_of(update_manifest())
    body["signature"] = signature
    expect_error(UpdateManifest, body, "field 'signature' must be empty or a hex HMAC-SHA256")
    body["signature"] = "0" * 64
    assert UpdateManifest.from_json(encode(body)).signature == "0" * 64


def test_global_manifest_task_must_name_entrypoint_version_params_and_hash():
    for missing in ("entrypoint", "version", "params", "params_sha256"):
        task = {k: v for k, v in TASK.items() if k != missing}
        expect_error(GlobalManifest, body_of(global_manifest(task=task)),
                     "field 'task' needs entrypoint, version, params and params_sha256")
    expect_error(GlobalManifest, body_of(global_manifest(contract=[])), "field 'contract' has type list, expected dict")


# --- encodings and the protocol number ------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_manifests_in_other_unicode_encodings_are_refused(encoding):
    # json.loads would happily decode these (it sniffs UTF-16 and UTF-32): the protocol says UTF-8.
    text = update_manifest().to_json().decode()
    assert json.loads(text.encode(encoding)) == json.loads(text)  # what a lax reader would accept
    expect_error(UpdateManifest, text.encode(encoding), "update manifest is not valid JSON")
    expect_error(GlobalManifest, global_manifest().to_json().decode().encode(encoding), "global manifest is not valid JSON")


def test_a_utf8_byte_order_mark_is_refused():
    data = b"\xef\xbb\xbf" + update_manifest().to_json()
    expect_error(UpdateManifest, data, "update manifest is not valid JSON", "byte-order mark")
    expect_error(GlobalManifest, b"\xef\xbb\xbf" + global_manifest().to_json(), "byte-order mark")
    expect_error(DeclineManifest, b"\xef\xbb\xbf" + decline_manifest().to_json(), "byte-order mark")


def test_non_ascii_utf8_text_is_read():
    m = update_manifest(created_at="2024-01-01T00:05:00+00:00 \u00e9\u00e8")
    data = json.dumps(body_of(m), ensure_ascii=False).encode("utf-8")
    assert b"\xc3\xa9" in data
    assert UpdateManifest.from_json(data) == m


@pytest.mark.parametrize("value", [True, 1.0, "1", None, 0, 2])
@pytest.mark.parametrize("cls", ["update", "global", "decline"])
def test_protocol_must_be_the_integer_one(cls, value):
    # `true == 1` and `1.0 == 1` in Python: a loose check would take both for protocol 1.
    manifest = {"update": update_manifest, "global": global_manifest, "decline": decline_manifest}[cls]()
    body = body_of(manifest)
    body["protocol"] = value
    expect_error(type(manifest), body, "field 'protocol' must be 1")
    body["protocol"] = 1
    assert type(manifest).from_json(encode(body)) == manifest


def test_protocol_field_is_required():
    body = body_of(update_manifest())
    del body["protocol"]
    expect_error(UpdateManifest, body, "field 'protocol' must be 1")


# --- decline manifests ----------------------------------------------------------------------------


def decline_manifest(**changes) -> DeclineManifest:
    values = dict(client_id="bank-a", federation="banks", round_id="000001",
                  reason="column 'Amount' missing", signature="", created_at="2024-01-01T00:05:00+00:00")
    values.update(changes)
    return DeclineManifest(**values)


def test_decline_manifest_round_trip():
    m = decline_manifest()
    data = m.to_json()
    body = json.loads(data)
    assert body == {"kind": "decline", "protocol": PROTOCOL_VERSION, "client_id": "bank-a", "federation": "banks",
                    "round_id": "000001", "reason": "column 'Amount' missing", "signature": "",
                    "created_at": "2024-01-01T00:05:00+00:00"}
    assert data == json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert DeclineManifest.from_json(data) == m


def test_decline_defaults_fill_optional_fields():
    body = body_of(decline_manifest())
    del body["signature"], body["created_at"]
    m = DeclineManifest.from_json(encode(body))
    assert m.signature == "" and m.created_at == ""


@pytest.mark.parametrize("name", ["client_id", "federation", "round_id", "reason"])
def test_decline_missing_required_field(name):
    body = body_of(decline_manifest())
    del body[name]
    expect_error(DeclineManifest, body, f"decline manifest is missing field '{name}'")


def test_decline_unknown_field_rejected():
    body = body_of(decline_manifest())
    body["num_examples"] = 5  # a decline carries no update fields
    expect_error(DeclineManifest, body, "decline manifest has unknown fields ['num_examples']")


@pytest.mark.parametrize("name, value, got", [("reason", 7, "int"), ("reason", None, "NoneType"),
                                              ("client_id", ["bank-a"], "list"), ("signature", True, "bool")])
def test_decline_wrong_type_rejected(name, value, got):
    body = body_of(decline_manifest())
    body[name] = value
    expect_error(DeclineManifest, body, f"decline manifest field '{name}' has type {got}")


def test_decline_reason_must_be_one_to_max_characters():
    expect_error(DeclineManifest, body_of(decline_manifest(reason="")),
                 f"field 'reason' must be 1..{DeclineManifest.MAX_REASON_CHARS} characters")
    expect_error(DeclineManifest, body_of(decline_manifest(reason="x" * (DeclineManifest.MAX_REASON_CHARS + 1))),
                 "field 'reason' must be 1..")
    longest = "x" * DeclineManifest.MAX_REASON_CHARS
    assert DeclineManifest.from_json(decline_manifest(reason=longest).to_json()).reason == longest


@pytest.mark.parametrize("bad", ["bank/a", "../a", "Bank-A", ""])
def test_decline_bad_client_id_rejected(bad):
    expect_error(DeclineManifest, body_of(decline_manifest(client_id=bad)), "decline manifest field 'client_id'")


def test_decline_bad_round_id_rejected():
    expect_error(DeclineManifest, body_of(decline_manifest(round_id="../000001")),
                 "decline manifest field 'round_id' is not a valid round id")


@pytest.mark.parametrize("signature", ["abc", "A" * 64, "0" * 63])
def test_decline_signature_is_empty_or_64_hex_digits(signature):
    expect_error(DeclineManifest, body_of(decline_manifest(signature=signature)),
                 "decline manifest field 'signature' must be empty or a hex HMAC-SHA256")
    assert DeclineManifest.from_json(decline_manifest(signature="f" * 64).to_json()).signature == "f" * 64


def test_a_decline_is_not_an_update_and_an_update_is_not_a_decline():
    expect_error(UpdateManifest, decline_manifest().to_json(), "field 'kind' must be 'update'")
    expect_error(DeclineManifest, update_manifest().to_json(), "field 'kind' must be 'decline'")
    expect_error(GlobalManifest, decline_manifest().to_json(), "field 'kind' must be 'global'")


def test_decline_size_limit_and_strict_json_apply():
    body = body_of(decline_manifest())
    body["created_at"] = "x" * MAX_MANIFEST_BYTES
    expect_error(DeclineManifest, encode(body), "over the")
    expect_error(DeclineManifest, b'{"kind": "decline", "kind": "decline"}', "duplicate keys ['kind']")
