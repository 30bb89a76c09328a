"""The claims-triage example task (examples/claims_triage) against its federation file."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from fl_tasks.contract import DataContract
from fl_tasks.tasks.api import TaskError, TrainingSettings, load_task

REPO = Path(__file__).resolve().parents[2]
FEDERATION = yaml.safe_load((REPO / "federations" / "claims.yaml").read_text())
ENTRYPOINT = FEDERATION["task"]["entrypoint"]
PARAMS = FEDERATION["task"]["params"]
SETTINGS = TrainingSettings(local_epochs=3, learning_rate=0.01, batch_size=256, seed=1)


def contract_from(section: dict[str, Any]) -> DataContract:
    """The federation file's `data.contract`, with `{names: [...]}` entries written out one per column."""
    features = []
    for entry in section["features"]:
        if "names" in entry:
            shared = {key: value for key, value in entry.items() if key != "names"}
            features += [{**shared, "name": name} for name in entry["names"]]
        else:
            features.append(entry)
    return DataContract.from_dict({**section, "features": features})


CONTRACT = contract_from(FEDERATION["data"]["contract"])


@pytest.fixture(scope="module")
def task():
    return load_task(ENTRYPOINT, PARAMS, CONTRACT)


@pytest.fixture(scope="module")
def train_rows(task) -> pd.DataFrame:
    return task.example_data("synthetic", 4000, 11)


@pytest.fixture(scope="module")
def held_out(task) -> pd.DataFrame:
    return task.example_data("synthetic", 3000, 12)


@pytest.fixture(scope="module")
def trained(task, train_rows):
    model = task.seeded_model(FEDERATION["task"]["seed"])
    result = task.train(model, train_rows, SETTINGS, model.state_dict())
    return model, result


def without_feature(name: str) -> dict[str, Any]:
    section = FEDERATION["data"]["contract"]
    features = []
    for entry in section["features"]:
        if entry.get("name") == name:
            continue
        if name in entry.get("names", ()):
            entry = {**entry, "names": [n for n in entry["names"] if n != name]}
        features.append(entry)
    return {**section, "features": features}


def test_the_federation_file_names_a_loadable_task(task):
    assert type(task).__name__ == "ClaimsTriageTask"
    assert task.version == "1"
    assert [m.name for m in task.metrics] == ["log_loss", "accuracy", "macro_f1"]
    assert task.primary.name == "log_loss" and not task.primary.higher_is_better
    assert (task.embedding_dim, task.hidden) == (4, (32, 16))
    assert [c.name for c in CONTRACT.features] == ["region", "channel", "product", "police_report", "claim_amount",
                                                   "policy_age_days", "prior_claims"]


def test_example_data_satisfies_the_contract(task):
    simulation = FEDERATION["simulation"]
    rows = task.example_data(simulation["source"], simulation["rows"], simulation["seed"])
    assert len(rows) == simulation["rows"]
    assert CONTRACT.check(rows) == []
    assert rows["police_report"].dtype == bool
    assert all(rows[name].dtype == np.float64 for name in ("claim_amount", "policy_age_days", "prior_claims"))
    assert all(rows[name].map(type).eq(str).all() for name in ("region", "channel", "product", "triage"))
    times = rows["submitted_at"]
    assert str(times.dt.tz) == "UTC"
    assert times.min() >= pd.Timestamp("2013-09-01", tz="UTC") and times.max() < pd.Timestamp("2013-09-03", tz="UTC")
    assert (times < pd.Timestamp("2013-09-02", tz="UTC")).mean() == pytest.approx(0.5, abs=0.05)  # uniform
    assert set(rows["triage"]) == {"fast_track", "standard", "investigate"}
    assert rows["triage"].value_counts(normalize=True).max() < 0.45  # no class dominates


def test_example_data_is_reproducible_and_knows_its_sources(task):
    pd.testing.assert_frame_equal(task.example_data("synthetic", 500, 4), task.example_data("synthetic", 500, 4))
    assert not task.example_data("synthetic", 500, 4).equals(task.example_data("synthetic", 500, 5))
    with pytest.raises(ValueError, match="'claims_csv'.*synthetic"):
        task.example_data("claims_csv", 10, 0)


def test_a_seeded_model_is_the_same_on_every_machine(task):
    first, second = task.seeded_model(3).state_dict(), task.seeded_model(3).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = task.seeded_model(4).state_dict()
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_training_beats_the_untrained_model_and_the_class_prior(task, train_rows, held_out, trained):
    model, result = trained
    before = task.evaluate(task.seeded_model(FEDERATION["task"]["seed"]), held_out)
    after = task.evaluate(model, held_out)
    prior = train_rows["triage"].value_counts(normalize=True)
    prior_log_loss = -float(np.log(held_out["triage"].map(prior)).mean())
    assert result.num_examples == len(train_rows) and result.metrics["train_loss"] > 0
    assert after["log_loss"] < before["log_loss"] - 0.2
    assert after["log_loss"] < prior_log_loss - 0.2
    assert after["accuracy"] > prior.max() + 0.15
    # The federation's gates pass a trained model and stop an untrained one.
    thresholds = FEDERATION["gates"]["thresholds"]
    assert after["log_loss"] <= thresholds["log_loss"] and after["accuracy"] >= thresholds["accuracy"]
    assert before["log_loss"] > thresholds["log_loss"] and before["accuracy"] < thresholds["accuracy"]


def test_evaluate_reports_every_metric_within_its_range(task, held_out, trained):
    model, _ = trained
    for rows in (held_out, held_out[held_out["triage"] != "standard"], held_out.head(1)):
        scores = task.evaluate(model, rows)
        assert scores.keys() == {m.name for m in task.metrics}
        for metric in task.metrics:
            assert metric.low <= scores[metric.name] <= metric.high, metric.name
    with pytest.raises(ValueError, match="no rows"):
        task.evaluate(model, held_out.head(0))


def test_a_model_that_emits_nan_scores_worst(task, held_out):
    model = task.build_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(math.nan)
    scores = task.evaluate(model, held_out)
    assert scores["accuracy"] == 0.0 and scores["macro_f1"] == 0.0
    assert math.isfinite(scores["log_loss"]) and scores["log_loss"] > 30


@pytest.mark.parametrize("params, message", [
    ({"embedding_dim": 0}, "embedding_dim"),
    ({"embedding_dim": True}, "embedding_dim"),
    ({"embedding_dim": 2.5}, "embedding_dim"),
    ({"hidden": []}, "hidden"),
    ({"hidden": [32, 0]}, "hidden"),
    ({"hidden": "32"}, "hidden"),
])
def test_bad_params_are_refused(params, message):
    with pytest.raises(TaskError, match=message):
        load_task(ENTRYPOINT, {**PARAMS, **params}, CONTRACT)


def test_unknown_params_name_the_accepted_ones():
    with pytest.raises(TaskError, match="embedding_dim, hidden"):
        load_task(ENTRYPOINT, {"dropout": 0.1}, CONTRACT)


@pytest.mark.parametrize("name", ["region", "police_report", "prior_claims"])
def test_a_contract_without_a_needed_column_is_refused(task, name):
    contract = contract_from(without_feature(name))
    with pytest.raises(ValueError, match=f"'{name}'.*missing"):
        type(task)(contract=contract, **PARAMS)


def test_a_contract_with_wrong_types_or_label_is_refused(task):
    raw = CONTRACT.as_dict()
    raw["features"] = [{**c, "type": "numeric", "categories": ()} if c["name"] == "channel" else c
                       for c in raw["features"]]
    raw["label"] = {**raw["label"], "categories": ("approve", "reject")}
    raw["event_time"] = None
    with pytest.raises(ValueError) as refused:
        type(task)(contract=DataContract.from_dict(raw), **PARAMS)
    assert "'channel' is numeric, needs categorical" in str(refused.value)
    assert "'triage'" in str(refused.value) and "['approve', 'reject']" in str(refused.value)
    assert "'submitted_at'" in str(refused.value)


def test_unknown_categories_take_the_extra_embedding_slot(task, held_out, trained):
    model, _ = trained
    rows = held_out.head(50).copy()
    rows.loc[rows.index[:10], "region"] = "atlantis"
    rows.loc[rows.index[10:20], "channel"] = None
    assert CONTRACT.check(rows)  # more unknowns than the contract allows, but the task must not crash
    _, codes = task.inputs(rows)
    assert codes[:10, 0].tolist() == [6] * 10 and codes[10:20, 1].tolist() == [4] * 10
    assert [e.num_embeddings for e in task.build_model().embeddings] == [7, 5, 5]
    assert torch.count_nonzero(task.seeded_model(3).embeddings[0].weight[6]) == 0  # unseen values start neutral
    assert np.isfinite(task.probabilities(model, rows)).all()
    retrained = task.seeded_model(3)
    task.train(retrained, rows, SETTINGS, retrained.state_dict())
    assert torch.count_nonzero(retrained.embeddings[0].weight[6]) > 0  # and learn from rows that carry them


def test_labels_outside_the_classes_are_refused(task, held_out, trained):
    model, _ = trained
    rows = held_out.head(20).copy()
    rows.loc[rows.index[:3], "triage"] = "escalate"
    with pytest.raises(ValueError, match="3 rows have a 'triage'"):
        task.evaluate(model, rows)
    with pytest.raises(ValueError, match="3 rows have a 'triage'"):
        task.train(task.build_model(), rows, SETTINGS, {})
