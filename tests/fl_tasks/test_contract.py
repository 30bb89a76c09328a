"""fl_tasks/contract.py: each way rows break the data contract gives one sentence naming the
column (a silo's public decline reason: no row values but three unknown categories), and
the encodings tasks train on."""

from __future__ import annotations

import json
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from fl_tasks.contract import Column, DataContract

CONTRACT = DataContract(
    label=Column("is_fraud", "boolean"),
    features=(Column("amount", "numeric", max_missing_share=0.1),
              Column("channel", "categorical", categories=("web", "pos", "atm"), max_unknown_share=0.2)),
    event_time="event_time",
)


def rows(**changes) -> pd.DataFrame:
    """Five rows that satisfy CONTRACT, with columns replaced by `changes`."""
    frame = pd.DataFrame({
        "amount": [12.5, 80.0, 3.2, 45.0, 9.9],
        "channel": ["web", "pos", "atm", "web", "pos"],
        "is_fraud": [False, True, False, False, True],
        "event_time": pd.date_range("2024-01-01", periods=5, freq="D", tz="UTC"),
    })
    for name, values in changes.items():
        frame[name] = values
    return frame


def test_valid_rows_have_no_problem():
    assert CONTRACT.check(rows()) == []
    assert CONTRACT.columns == ["amount", "channel", "is_fraud", "event_time"]


def test_a_missing_column_is_named():
    assert CONTRACT.check(rows().drop(columns="amount")) == ["column 'amount' missing"]
    assert CONTRACT.check(rows().drop(columns="event_time")) == ["column 'event_time' missing"]


def test_an_extra_column_is_named_unless_allowed():
    frame = rows(note=["a"] * 5)
    assert CONTRACT.check(frame) == ["column 'note' is not in the data contract (allow_extra_columns is false)"]
    relaxed = DataContract(CONTRACT.label, CONTRACT.features, "event_time", allow_extra_columns=True)
    assert relaxed.check(frame) == []


def test_a_repeated_column_is_named_instead_of_failing():
    frame = pd.concat([rows(), rows()[["amount"]]], axis=1)
    assert CONTRACT.check(frame) == ["column 'amount' appears 2 times"]


@pytest.mark.parametrize("name, values, problem", [
    ("amount", ["12.5", "80", "3", "45", "9"], "column 'amount' has type object, expected numeric"),
    ("amount", [True, False, True, True, False], "column 'amount' has type bool, expected numeric"),
    ("is_fraud", ["yes", "no", "no", "no", "yes"],
     "column 'is_fraud' has type object, expected boolean (true/false or 0/1)"),
    ("is_fraud", [0, 2, 0, 1, 1], "column 'is_fraud' has type int64, expected boolean (true/false or 0/1)"),
    ("channel", [1, 2, 3, 1, 2], "column 'channel' has type int64, expected categorical (text)"),
    ("event_time", ["2024-01-01"] * 5, "column 'event_time' (event time) has type object, expected a timestamp"),
])
def test_a_wrong_type_is_named(name, values, problem):
    assert CONTRACT.check(rows(**{name: values})) == [problem]


def test_database_shaped_columns_are_accepted():
    """Databases and CSVs with nulls give object columns of booleans and Decimals; 0/1 are booleans."""
    contract = DataContract(Column("is_fraud", "boolean", max_missing_share=0.2), CONTRACT.features, "event_time")
    frame = rows(is_fraud=[True, None, False, True, False],
                 amount=[Decimal("12.50"), Decimal("80.00"), Decimal("3.20"), Decimal("45.00"), Decimal("9.90")])
    assert frame["is_fraud"].dtype == object and frame["amount"].dtype == object
    assert contract.check(frame) == []
    assert contract.check(rows(is_fraud=[0, 1, 0, 0, 1])) == []
    naive = rows(event_time=pd.date_range("2024-01-01", periods=5, freq="D"))
    assert contract.check(naive) == []


def test_unknown_categories_above_their_share_are_named_with_three_short_examples():
    assert CONTRACT.check(rows(channel=["web", "pos", "atm", "web", "crypto"])) == []  # 20%: allowed
    long_value = "customer 4411 2233 0000 1111 at branch 17, Main Street"
    frame = rows(channel=["web", "zelle", long_value, "crypto", "cheque"])
    [problem] = CONTRACT.check(frame)
    assert problem == ("column 'channel' has 80.0% unknown categories (e.g. ['cheque', 'crypto', "
                       f"'{long_value[:32]}']), the contract allows 20.0%")
    assert "zelle" not in problem and long_value not in problem


def test_missing_values_above_their_share_are_counted_not_shown():
    assert CONTRACT.check(rows(amount=[12.5, None, 3.2, None, 9.9])) == [
        "column 'amount' has 2 of 5 values missing (40.0%), the contract allows 10.0%"]
    assert CONTRACT.check(rows(is_fraud=[True, None, False, True, False])) == [
        "column 'is_fraud' has 1 of 5 values missing (20.0%), the contract allows 0.0%"]
    [problem] = CONTRACT.check(rows(channel=["web", None, None, "pos", "atm"]))
    assert problem == "column 'channel' has 2 of 5 values missing (40.0%), the contract allows 0.0%"


def test_too_few_rows_is_the_only_problem_of_an_empty_window():
    assert CONTRACT.check(rows().iloc[:0]) == ["the data window has 0 rows, the contract needs at least 2"]
    assert CONTRACT.check(rows().iloc[:1]) == ["the data window has 1 rows, the contract needs at least 2"]


def test_problems_never_show_row_values():
    frame = rows(amount=["12.5", "80", None, None, "9"], is_fraud=["yes", "no", "no", "no", "yes"], note="x")
    problems = CONTRACT.check(frame)
    assert len(problems) == 4
    assert not any(value in " ".join(problems) for value in ("12.5", "80", "yes", "web", "pos", "2024"))


def test_numeric_encodes_numeric_and_boolean_features_with_nulls_as_zero():
    contract = DataContract(CONTRACT.label, (*CONTRACT.features, Column("card_present", "boolean")))
    frame = rows(amount=[12.5, None, 3.2, 45.0, 9.9], card_present=[True, False, True, None, False])
    matrix = contract.numeric(frame)
    assert matrix.dtype == np.float32 and matrix.shape == (5, 2)
    np.testing.assert_array_equal(matrix[:, 0], np.float32([12.5, 0.0, 3.2, 45.0, 9.9]))
    np.testing.assert_array_equal(matrix[:, 1], [1, 0, 1, 0, 0])
    assert contract.numeric(frame, ["amount"]).shape == (5, 1)
    assert contract.numeric(frame, []).shape == (5, 0)


def test_codes_give_unknown_and_null_values_the_extra_slot():
    frame = rows(channel=["web", "atm", "crypto", None, "pos"])
    np.testing.assert_array_equal(CONTRACT.codes(frame, "channel"), [0, 2, 3, 3, 1])
    with pytest.raises(KeyError, match="no feature 'amount2'"):
        CONTRACT.codes(frame, "amount2")


def test_labels_are_floats_for_booleans_and_codes_for_categories():
    labels = CONTRACT.labels(rows())
    assert labels.dtype == np.float32
    np.testing.assert_array_equal(labels, [0, 1, 0, 0, 1])
    contract = DataContract(Column("outcome", "categorical", categories=("ok", "fraud", "dispute")), CONTRACT.features)
    np.testing.assert_array_equal(contract.labels(rows(outcome=["ok", "fraud", "dispute", "ok", "chargeback"])),
                                  [0, 1, 2, 0, 3])


def test_the_dict_round_trips_through_json():
    raw = json.loads(json.dumps(CONTRACT.as_dict()))
    assert raw == CONTRACT.as_dict()  # plain lists, as a manifest holds them
    assert DataContract.from_dict(raw) == CONTRACT
    assert DataContract.from_dict(raw).sha256 == CONTRACT.sha256


def test_sha256_changes_with_any_column_and_only_then():
    changed = [
        DataContract(CONTRACT.label, (Column("amount", "numeric", max_missing_share=0.2), CONTRACT.features[1]),
                     "event_time"),
        DataContract(CONTRACT.label, (CONTRACT.features[0], Column("channel", "categorical",
                                                                   categories=("web", "pos"), max_unknown_share=0.2)),
                     "event_time"),
        DataContract(Column("is_fraud", "numeric"), CONTRACT.features, "event_time"),
        DataContract(CONTRACT.label, CONTRACT.features, "booked_at"),
    ]
    assert len({CONTRACT.sha256, *(c.sha256 for c in changed)}) == 5
    # The same contract written differently (a list, an integer share) is the same contract.
    same = DataContract(CONTRACT.label, [Column("amount", "numeric", max_missing_share=0.1),
                                         Column("channel", "categorical", ["web", "pos", "atm"], 0, 0.2)], "event_time")
    assert same == CONTRACT and same.sha256 == CONTRACT.sha256


def test_a_column_of_unknown_type_is_refused():
    with pytest.raises(ValueError, match="column 'amount' has type 'float'"):
        Column("amount", "float")
    with pytest.raises(ValueError, match="max_missing_share is 2.0"):
        Column("amount", "numeric", max_missing_share=2)
