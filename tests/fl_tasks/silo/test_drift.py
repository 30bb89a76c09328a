"""fl_tasks/silo/drift: a silo's drift scores, measured by evidently (real runs, no mocks), with
evidently's own verdicts, and the reference windows the silo keeps in its state directory.

The agent's use of them over several rounds (first, previous and fixed references) is in
test_agent.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fl_tasks.contract import Column, DataContract
from fl_tasks.protocol.drift import DriftReport, DriftSettings
from fl_tasks.silo.drift import (DriftError, ReferenceStore, column_kinds, default_state_dir, measure_drift,
                                 read_verdicts)
from fl_tasks.simulation.datasets import shift_rows, synthetic_fraud_frame
from fl_tasks.tasks.fraud import COMPONENTS

FEATURES = [*COMPONENTS, "Amount"]
CONTRACT = DataContract(label=Column("Class", "boolean"), features=tuple(Column(c, "numeric") for c in FEATURES),
                        event_time="event_time")
SHIFTED = ["Amount", "V1", "V2", "V3", "V4", "V5"]


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return synthetic_fraud_frame(1500, seed=4)


def settings(**changes) -> DriftSettings:
    values = dict(reference="first", reference_window={}, columns=tuple(FEATURES), drift_share=0.5, method=None,
                  threshold=None)
    values.update(changes)
    return DriftSettings(**values)


def test_identical_windows_drift_nowhere(rows, tmp_path):
    report = measure_drift(rows, rows.copy(), settings(), "first window (round 000001, 1500 rows)",
                           tmp_path / "r.html", CONTRACT)
    assert set(report.columns) == set(FEATURES)
    assert not any(c.drifted for c in report.columns.values())
    assert report.drifted_share == 0.0 and report.dataset_drifted is False
    assert (report.reference_rows, report.current_rows) == (1500, 1500)
    assert report.reference == "first window (round 000001, 1500 rows)"
    # evidently's choice for 1500 numeric rows, under the name it shows.
    assert {c.method for c in report.columns.values()} == {"Wasserstein distance (normed)"}
    assert DriftReport.from_dict(json.loads(json.dumps(report.as_dict()))) == report  # what the coordinator reads


@pytest.mark.parametrize("drift_share, dataset_drifted", [(0.2, True), (6 / 29, True), (0.5, False)])
def test_exactly_the_shifted_columns_drift(rows, drift_share, dataset_drifted):
    current = shift_rows(rows, SHIFTED, scale=3.0, offset=2.0)
    report = measure_drift(rows, current, settings(drift_share=drift_share), "first window", None, CONTRACT)
    assert sorted(n for n, c in report.columns.items() if c.drifted) == sorted(SHIFTED)
    assert report.drifted_share == pytest.approx(6 / 29)
    # evidently's dataset verdict: the share of drifted columns reached drift_share.
    assert report.dataset_drifted is dataset_drifted


def test_verdicts_are_evidentlys_whichever_way_the_score_points(rows):
    """K-S gives a p-value (drifted when LOW), Wasserstein a distance (drifted when HIGH): the
    scores point opposite ways, the verdicts agree, because both are evidently's."""
    current = shift_rows(rows, SHIFTED, scale=3.0, offset=2.0)
    ks = measure_drift(rows, current, settings(method="ks"), "first window", None, CONTRACT)
    wasserstein = measure_drift(rows, current, settings(method="wasserstein"), "first window", None, CONTRACT)
    assert {c.method for c in ks.columns.values()} == {"K-S p_value"}
    assert {c.method for c in wasserstein.columns.values()} == {"Wasserstein distance (normed)"}
    for name in FEATURES:
        assert ks.columns[name].drifted is wasserstein.columns[name].drifted is (name in SHIFTED), name
    for name in SHIFTED:
        assert ks.columns[name].score < 0.05  # a p-value: small is drifted
        assert wasserstein.columns[name].score > 0.1  # a distance: large is drifted
    assert ks.columns["V10"].score == pytest.approx(1.0)  # same values: p-value 1, not drifted
    assert wasserstein.columns["V10"].score == pytest.approx(0.0)  # same values: distance 0, not drifted
    # A verdict read as "score above threshold" would call every K-S column the other way round.
    assert all((c.score > 0.05) != c.drifted for c in ks.columns.values())
    assert ks.dataset_drifted is wasserstein.dataset_drifted is False  # 6 of 29 columns, drift_share 0.5


@pytest.mark.parametrize("method, shown", [("psi", "PSI"), ("jensenshannon", "Jensen-Shannon distance"),
                                           ("ks", "K-S p_value")])
def test_a_named_method_is_reported_under_evidentlys_name_for_it(rows, method, shown):
    report = measure_drift(rows, rows, settings(method=method, columns=("V1", "V2")), "first", None, CONTRACT)
    assert {c.method for c in report.columns.values()} == {shown}
    assert not any(c.drifted for c in report.columns.values())


def test_a_threshold_is_evidentlys_to_apply(rows):
    """The same distance is drifted or not by the threshold the settings pass to evidently."""
    current = shift_rows(rows, ["V1"], scale=1.0, offset=0.3)  # a small shift: about 0.3 standard deviations
    loose = measure_drift(rows, current, settings(method="wasserstein", threshold=1.0), "first", None, CONTRACT)
    strict = measure_drift(rows, current, settings(method="wasserstein", threshold=0.1), "first", None, CONTRACT)
    assert loose.columns["V1"].score == strict.columns["V1"].score == pytest.approx(0.3, abs=0.05)
    assert loose.columns["V1"].drifted is False and strict.columns["V1"].drifted is True


def test_categorical_and_boolean_columns_are_declared_from_the_contract():
    rng = np.random.default_rng(1)
    n = 800
    frame = pd.DataFrame({"amount": rng.lognormal(3, 1, n), "branch": rng.integers(0, 8, n),  # categories coded 0..7
                          "online": rng.random(n) > 0.5, "channel": rng.choice(["web", "pos", "atm"], n)})
    contract = DataContract(Column("label", "boolean"), (
        Column("amount", "numeric"), Column("branch", "categorical", categories=tuple(str(i) for i in range(8))),
        Column("online", "boolean"), Column("channel", "categorical", categories=("web", "pos", "atm"))))
    columns = ["amount", "branch", "online", "channel"]
    assert column_kinds(frame, columns, contract) == (["amount"], ["branch", "online", "channel"])
    # Without a contract the dtype decides: integer codes look like numbers.
    assert column_kinds(frame, columns) == (["amount", "branch"], ["online", "channel"])
    report = measure_drift(frame, frame.copy(), settings(columns=tuple(columns)), "first", None, contract)
    assert report.columns["branch"].method == "chi-square p_value"  # a categorical test, not K-S
    assert report.columns["online"].method == "Z-test p_value"
    assert report.columns["amount"].method == "K-S p_value"
    assert not any(c.drifted for c in report.columns.values())
    guessed = measure_drift(frame, frame.copy(), settings(columns=tuple(columns)), "first", None)
    assert guessed.columns["branch"].method == "K-S p_value"


def test_the_html_report_is_written_where_asked(rows, tmp_path):
    path = tmp_path / "fed" / "drift" / "000002.html"
    measure_drift(rows, shift_rows(rows, SHIFTED, 3.0, 2.0), settings(), "first", path, CONTRACT)
    assert path.stat().st_size > 10_000 and path.read_text()[:200].lower().lstrip().startswith("<")
    assert [p.name for p in path.parent.iterdir()] == ["000002.html"]  # nothing half-written left beside it


def test_evidently_failures_are_drift_errors(rows):
    empty = rows.assign(Amount=np.nan)  # evidently refuses a column with no values
    with pytest.raises(DriftError, match="evidently could not compare the windows: .*empty column 'Amount'"):
        measure_drift(empty, rows, settings(), "first", None, CONTRACT)
    mixed = rows.assign(channel=np.where(np.arange(len(rows)) % 2, "web", "pos"))
    with pytest.raises(DriftError, match="evidently could not compare the windows: .*wasserstein"):
        measure_drift(mixed, mixed, settings(columns=("Amount", "channel"), method="wasserstein"), "first", None)


def test_windows_without_the_columns_or_rows_are_drift_errors(rows):
    with pytest.raises(DriftError, match=r"the reference window has no column\(s\) \['V1'\]"):
        measure_drift(rows.drop(columns="V1"), rows, settings(), "first", None, CONTRACT)
    with pytest.raises(DriftError, match="the current window has no rows"):
        measure_drift(rows, rows.iloc[:0], settings(), "first", None, CONTRACT)


def test_a_status_that_is_no_verdict_is_a_drift_error(rows):
    """The verdicts are read from a real snapshot's tests; a status other than SUCCESS/FAIL
    (e.g. ERROR) gives no verdict, and the silo sends no scores rather than guess."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=["Amount", "V1"])
    snapshot = Report([DataDriftPreset(columns=["Amount", "V1"], drift_share=0.5)], include_tests=True).run(
        Dataset.from_pandas(rows[["Amount", "V1"]], data_definition=definition),
        Dataset.from_pandas(rows[["Amount", "V1"]], data_definition=definition))
    body = snapshot.dict()
    share, drifted, scores = read_verdicts(body, ["Amount", "V1"])
    assert (share, drifted, sorted(scores)) == (0.0, False, ["Amount", "V1"])
    body["tests"][-1]["status"] = "ERROR"
    with pytest.raises(DriftError, match="ended with status ERROR"):
        read_verdicts(body, ["Amount", "V1"])
    body["tests"] = []  # a report run without include_tests
    with pytest.raises(DriftError, match="no drift test for column"):
        read_verdicts(body, ["Amount", "V1"])


# --- reference windows ---------------------------------------------------------------------------


def test_the_first_reference_is_kept_once(rows, tmp_path):
    store = ReferenceStore(tmp_path / "refs")
    assert store.first() is None
    assert store.keep_first("000001", rows[FEATURES]) is True
    assert store.keep_first("000002", rows[FEATURES].iloc[:10]) is False  # never replaced
    first = store.first()
    assert (first.kind, first.round_id, first.rows, first.columns) == ("first", "000001", 1500, tuple(FEATURES))
    assert first.label == "first window (round 000001, 1500 rows)"
    pd.testing.assert_frame_equal(first.frame(), rows[FEATURES].reset_index(drop=True))


def test_the_previous_reference_is_the_last_other_round(rows, tmp_path):
    store = ReferenceStore(tmp_path / "refs")
    assert store.previous("000001") is None
    store.keep_previous("000001", rows[FEATURES].iloc[:100])
    assert store.previous("000001") is None  # its own window is no reference
    assert store.previous("000002").round_id == "000001"
    store.keep_previous("000002", rows[FEATURES].iloc[:200])
    assert store.previous("000003").round_id == "000002"
    assert store.previous("000002").round_id == "000001"  # round 2 run again compares with round 1
    # By when they were kept, not by id: a manual round after scheduled ones is the latest.
    store.keep_previous("20130901T000000", rows[FEATURES].iloc[:300])
    store.keep_previous("000003", rows[FEATURES].iloc[:400])
    assert store.previous("000004").rows == 400
    kept = sorted(p.name for p in (tmp_path / "refs").iterdir())
    assert kept == ["previous-000003.json", "previous-000003.parquet", "previous-20130901T000000.json",
                    "previous-20130901T000000.parquet"]


def test_a_snapshot_without_its_record_is_no_reference(rows, tmp_path):
    store = ReferenceStore(tmp_path / "refs")
    store.keep_first("000001", rows[FEATURES])
    (tmp_path / "refs" / "first.json").unlink()  # a crash between the Parquet file and its record
    assert store.first() is None
    (tmp_path / "refs" / "first.json").write_text("{not json")
    with pytest.raises(DriftError, match="first.json is unreadable.*delete it and first.parquet"):
        store.first()


def test_the_default_state_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("FL_CLIENT_STATE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_state_dir("bank-a") == tmp_path / ".fl-client" / "bank-a"
    monkeypatch.setenv("FL_CLIENT_STATE_DIR", str(tmp_path / "state"))
    assert default_state_dir("bank-a") == tmp_path / "state"


def test_importing_the_module_imports_neither_evidently_nor_pandas():
    code = ("import sys, fl_tasks.silo.drift, fl_tasks.silo.agent; "
            "print(sorted(m for m in ('evidently', 'pandas', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- shift_rows ------------------------------------------------------------------------------------


def test_shift_rows_shifts_only_the_named_columns(rows):
    before = rows.copy()
    shifted = shift_rows(rows, ["Amount", "V1"], scale=3.0, offset=2.0)
    pd.testing.assert_frame_equal(rows, before)  # pure: the input is untouched
    np.testing.assert_allclose(shifted["Amount"], rows["Amount"] * 3 + 2)
    np.testing.assert_allclose(shifted["V1"], rows["V1"] * 3 + 2)
    pd.testing.assert_frame_equal(shifted.drop(columns=["Amount", "V1"]), rows.drop(columns=["Amount", "V1"]))
    with pytest.raises(KeyError, match=r"columns \['amount'\] are not in the frame"):
        shift_rows(rows, ["amount"], 1.0, 0.0)
    with pytest.raises(ValueError, match=r"columns \['Class'\] are not numeric"):
        shift_rows(rows, ["Class"], 1.0, 0.0)


def test_only_the_newest_html_reports_stay(tmp_path):
    from fl_tasks.silo.drift import prune_reports

    for n in range(5):
        path = tmp_path / f"00000{n}.html"
        path.write_text("report")
        os.utime(path, (1_000_000 + n, 1_000_000 + n))
    (tmp_path / "references").mkdir()
    deleted = prune_reports(tmp_path, 3)
    assert sorted(p.name for p in deleted) == ["000000.html", "000001.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000002.html", "000003.html", "000004.html", "references"]
    assert prune_reports(tmp_path, 3) == []
