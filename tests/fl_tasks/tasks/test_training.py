"""fl_tasks/training.py and fl_tasks/evaluation.py: local training and ROC-AUC / PR-AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fl_tasks.config import ModelSpec
from fl_tasks.simulation.datasets import EPOCH, Table, holdout_split, make_synthetic
from fl_tasks.tasks.evaluation import evaluate, predict_scores, score_metrics
from fl_tasks.tasks.models import build_model, flatten_state, state_to_numpy
from fl_tasks.tasks.training import train_local

SPEC = ModelSpec(input_dim=30, hidden=(32, 16), batch_norm=True)


# --- evaluation --------------------------------------------------------------------------------


def test_score_metrics_hand_computed():
    y = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    m = score_metrics(y, scores)
    # ROC-AUC: of the 4 (positive, negative) pairs, (0.35 vs 0.4) is mis-ordered -> 3/4.
    assert m["roc_auc"] == pytest.approx(0.75)
    # Average precision: ranks 0.8(+), 0.4(-), 0.35(+), 0.1(-): 0.5 * 1 + 0.5 * 2/3.
    assert m["pr_auc"] == pytest.approx(0.5 + 1 / 3)
    assert set(m) == {"roc_auc", "pr_auc"}
    assert all(type(v) is float for v in m.values())


def test_score_metrics_perfect_and_reversed():
    y = np.array([0, 1, 0, 1, 1])
    assert score_metrics(y, np.array([0.1, 0.9, 0.2, 0.8, 0.7])) == {"roc_auc": 1.0, "pr_auc": 1.0}
    assert score_metrics(y, np.array([0.9, 0.1, 0.8, 0.2, 0.3]))["roc_auc"] == 0.0


@pytest.mark.parametrize("y", [np.zeros(5, dtype=np.int8), np.ones(3, dtype=np.int8)])
def test_single_class_raises(y):
    with pytest.raises(ValueError, match="both classes"):
        score_metrics(y, np.linspace(0, 1, len(y)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_give_zeros(bad):
    scores = np.array([0.1, bad, 0.35, 0.8])
    assert score_metrics(np.array([0, 0, 1, 1]), scores) == {"roc_auc": 0.0, "pr_auc": 0.0}


def test_predict_scores_are_probabilities_in_batches():
    model = build_model(SPEC, seed=0)
    x = make_synthetic(300, seed=0).x
    whole = predict_scores(model, x)
    batched = predict_scores(model, x, batch_size=7)
    assert whole.shape == (300,) and whole.dtype == np.float32
    assert np.all((whole > 0) & (whole < 1))
    np.testing.assert_allclose(batched, whole, rtol=1e-5, atol=1e-6)
    assert not model.training  # evaluation switches to eval mode (batch norm uses running stats)
    assert predict_scores(model, x[:0]).shape == (0,)


# --- training ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def splits():
    table = make_synthetic(4000, seed=0)
    pool, validation, test = holdout_split(table, seed=0, fraction=0.3)
    return pool, validation, test


def test_training_learns(splits):
    pool, validation, test = splits
    model = build_model(SPEC, seed=0)
    before = evaluate(model, test)
    metrics = train_local(model, pool, epochs=5, learning_rate=0.01, batch_size=128, seed=0)
    after = evaluate(model, test)
    assert after["roc_auc"] > 0.85
    assert after["roc_auc"] > before["roc_auc"] + 0.1
    assert after["pr_auc"] > before["pr_auc"]
    assert metrics["train_rows"] == float(len(pool))
    assert 0 < metrics["train_loss"] < 1.0
    assert metrics["train_seconds"] > 0


def test_training_is_reproducible(splits):
    pool = splits[0].take(np.arange(600))
    states = []
    for _ in range(2):
        model = build_model(SPEC, seed=3)
        train_local(model, pool, epochs=1, learning_rate=0.01, batch_size=64, seed=5)
        states.append(flatten_state(state_to_numpy(model)))
    np.testing.assert_array_equal(states[0], states[1])


def distance_from_start(mu: float, pool: Table, base_state=None) -> float:
    model = build_model(SPEC, seed=1)
    start = flatten_state({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    train_local(model, pool, epochs=2, learning_rate=0.01, batch_size=128, proximal_mu=mu, seed=0,
                base_state=base_state)
    end = flatten_state({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    return float(np.linalg.norm(end - start))


def test_proximal_term_keeps_parameters_near_the_start(splits):
    pool = splits[0]
    free = distance_from_start(0.0, pool)
    held = distance_from_start(10.0, pool)
    assert free > 0
    assert held < 0.25 * free, (held, free)


def test_proximal_term_pulls_toward_the_given_base_state(splits):
    pool = splits[0]
    # The anchor is the base model passed in, not the model's own starting weights.
    base = build_model(SPEC, seed=1).state_dict()
    shifted = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in base.items()}
    model = build_model(SPEC, seed=1)
    train_local(model, pool, epochs=2, learning_rate=0.01, batch_size=128, proximal_mu=10.0, seed=0,
                base_state=shifted)
    params = dict(model.named_parameters())
    to_shift = np.mean([(params[n] - base[n]).mean().item() for n in params])
    assert to_shift > 0.1  # pulled up toward base + 0.5


def test_empty_table_raises():
    empty = Table(np.zeros((0, 30), dtype=np.float32), np.zeros(0, dtype=np.int8),
                  np.zeros(0, dtype="datetime64[s]"))
    with pytest.raises(ValueError, match="no local rows"):
        train_local(build_model(SPEC, seed=0), empty, epochs=1, learning_rate=0.01, batch_size=8)


def test_single_row_batches_are_skipped():
    # 3 rows with batch size 2: the last one-row batch would break batch norm, so it is skipped.
    table = Table(np.random.default_rng(0).standard_normal((3, 30)).astype(np.float32),
                  np.array([0, 1, 0], dtype=np.int8), EPOCH + np.arange(3).astype("timedelta64[s]"))
    model = build_model(SPEC, seed=0)
    metrics = train_local(model, table, epochs=1, learning_rate=0.01, batch_size=2)
    assert metrics["train_rows"] == 3.0
    assert int(model.state_dict()["net.1.num_batches_tracked"]) == 1  # one two-row batch only


def test_training_leaves_the_global_rng_alone():
    table = make_synthetic(200, seed=0)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    train_local(build_model(SPEC, seed=0), table, epochs=1, learning_rate=0.01, batch_size=64)
    np.testing.assert_array_equal(torch.rand(2).numpy(), expected.numpy())
