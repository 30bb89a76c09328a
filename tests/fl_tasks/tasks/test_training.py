"""fl_tasks/tasks/training.py: the generic training loop (`fit`, FedProx included) and `predict`,
through the built-in fraud task and on their own.

(`train_local(model, table, ...)` became `fit(model, inputs, target, loss_fn, settings,
global_state)`: it no longer knows the fraud data, and the row count is the task's
`TrainResult.num_examples` instead of a `train_rows` metric.)
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from fl_tasks.aggregation.flat import Layout
from fl_tasks.contract import Column, DataContract
from fl_tasks.simulation.datasets import holdout_split, label_codes, synthetic_fraud_frame
from fl_tasks.tasks.api import TrainingSettings, model_state
from fl_tasks.tasks.fraud import COMPONENTS, FraudTask
from fl_tasks.tasks.training import fit, learning_rate_at, predict, restore_optimizer

CONTRACT = DataContract(label=Column("Class", "boolean"),
                        features=tuple(Column(name, "numeric") for name in [*COMPONENTS, "Amount"]),
                        event_time="event_time")
TASK = FraudTask(CONTRACT, hidden=[32, 16], batch_norm=True)


def settings(epochs=1, lr=0.01, batch_size=128, mu=0.0, seed=0) -> TrainingSettings:
    return TrainingSettings(local_epochs=epochs, learning_rate=lr, batch_size=batch_size, proximal_mu=mu, seed=seed)


def flat(state) -> np.ndarray:
    return Layout(state).flatten(state).astype(np.float64)


def tensors(rows):
    """The fraud task's inputs and targets for `fit`."""
    return [torch.from_numpy(TASK.features(rows))], torch.from_numpy(CONTRACT.labels(rows).astype(np.float32))


@pytest.fixture(scope="module")
def splits():
    rows = synthetic_fraud_frame(4000, seed=0)
    pool, validation, test = holdout_split(label_codes(rows, CONTRACT), seed=0, fraction=0.3)
    return rows.iloc[pool].reset_index(drop=True), rows.iloc[validation].reset_index(drop=True), \
        rows.iloc[test].reset_index(drop=True)


# --- training through the task ----------------------------------------------------------------


def test_training_learns(splits):
    pool, _, test = splits
    model = TASK.seeded_model(0)
    before = TASK.evaluate(model, test)
    result = TASK.train(model, pool, settings(epochs=5), model.state_dict())
    after = TASK.evaluate(model, test)
    assert after["roc_auc"] > 0.85
    assert after["roc_auc"] > before["roc_auc"] + 0.1
    assert after["pr_auc"] > before["pr_auc"]
    assert result.num_examples == len(pool)
    assert 0 < result.metrics["train_loss"] < 1.0
    assert result.metrics["train_seconds"] > 0


def test_training_is_reproducible(splits):
    pool = splits[0].iloc[:600]
    states = []
    for _ in range(2):
        model = TASK.seeded_model(3)
        TASK.train(model, pool, settings(batch_size=64, seed=5), model.state_dict())
        states.append(flat(model_state(model)))
    np.testing.assert_array_equal(states[0], states[1])
    other = TASK.seeded_model(3)
    TASK.train(other, pool, settings(batch_size=64, seed=6), other.state_dict())
    assert not np.array_equal(states[0], flat(model_state(other)))  # the seed orders the batches


# --- FedProx -----------------------------------------------------------------------------------------


def parameters(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().numpy().ravel().astype(np.float64) for p in model.parameters()])


def distance_from_start(mu: float, pool, global_state=None) -> float:
    model = TASK.seeded_model(1)
    start = parameters(model)
    inputs, target = tensors(pool)
    fit(model, inputs, target, nn.BCEWithLogitsLoss(), settings(epochs=2, mu=mu), global_state)
    return float(np.linalg.norm(parameters(model) - start))


def test_proximal_term_keeps_parameters_near_the_start(splits):
    pool = splits[0]
    free = distance_from_start(0.0, pool)
    held = distance_from_start(10.0, pool)  # no global state given: the model's own start is the anchor
    assert free > 0
    assert held < 0.25 * free, (held, free)


def test_proximal_term_pulls_toward_the_given_global_state(splits):
    pool = splits[0]
    # The anchor is the round's base passed in, not the model's own starting weights.
    base = TASK.seeded_model(1).state_dict()
    shifted = {k: (v + 0.5 if v.is_floating_point() else v) for k, v in base.items()}
    model = TASK.seeded_model(1)
    inputs, target = tensors(pool)
    fit(model, inputs, target, nn.BCEWithLogitsLoss(), settings(epochs=2, mu=10.0), shifted)
    params = dict(model.named_parameters())
    to_shift = np.mean([(params[n] - base[n]).mean().item() for n in params])
    assert to_shift > 0.1  # pulled up toward base + 0.5


def test_zero_mu_ignores_the_global_state(splits):
    pool = splits[0].iloc[:500]
    inputs, target = tensors(pool)
    far = {k: (v + 100.0 if v.is_floating_point() else v) for k, v in TASK.seeded_model(1).state_dict().items()}
    a, b = TASK.seeded_model(1), TASK.seeded_model(1)
    fit(a, inputs, target, nn.BCEWithLogitsLoss(), settings(mu=0.0), None)
    fit(b, inputs, target, nn.BCEWithLogitsLoss(), settings(mu=0.0), far)
    np.testing.assert_array_equal(parameters(a), parameters(b))


# --- the loop on its own ---------------------------------------------------------------------------


def test_empty_rows_raise():
    with pytest.raises(ValueError, match="no local rows"):
        fit(TASK.seeded_model(0), [torch.zeros(0, 30)], torch.zeros(0), nn.BCEWithLogitsLoss(), settings())
    with pytest.raises(ValueError, match="no local rows"):
        TASK.train(TASK.seeded_model(0), synthetic_fraud_frame(10, seed=0).iloc[:0], settings(), {})


def test_single_row_batches_are_skipped():
    # 3 rows with batch size 2: the last one-row batch would break batch norm, so it is skipped.
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 30)).astype(np.float32))
    model = TASK.seeded_model(0)
    report = fit(model, [x], torch.tensor([0.0, 1.0, 0.0]), nn.BCEWithLogitsLoss(), settings(batch_size=2))
    assert int(model.state_dict()["1.num_batches_tracked"]) == 1  # one two-row batch only
    assert report.metrics["train_loss"] > 0


def test_training_leaves_the_global_rng_alone():
    inputs, target = tensors(synthetic_fraud_frame(200, seed=0))
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    fit(TASK.seeded_model(0), inputs, target, nn.BCEWithLogitsLoss(), settings(batch_size=64))
    np.testing.assert_array_equal(torch.rand(2).numpy(), expected.numpy())


class TwoInputs(nn.Module):
    """A model of two inputs (e.g. numbers and category codes), as another task may have."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(4, 2)
        self.linear = nn.Linear(3, 1)

    def forward(self, numbers, codes):
        return self.linear(torch.cat([numbers, self.embedding(codes)], dim=1)).squeeze(-1)


def test_fit_is_generic_over_inputs_and_loss():
    rng = np.random.default_rng(0)
    numbers = torch.from_numpy(rng.standard_normal((400, 1)).astype(np.float32))
    codes = torch.from_numpy(rng.integers(0, 4, 400))
    target = 2.0 * numbers[:, 0] + codes.float()  # a regression: the loss is the task's choice
    model = TwoInputs()
    loss = nn.MSELoss()
    before = loss(predict(model, [numbers, codes]), target).item()
    report = fit(model, [numbers, codes], target, loss, settings(epochs=30, lr=0.05, batch_size=32))
    after = loss(predict(model, [numbers, codes]), target).item()
    assert after < 0.1 * before
    assert set(report.metrics) == {"train_loss", "train_seconds"}


def test_predict_is_batched_in_eval_mode_without_gradients():
    model = TASK.seeded_model(0)
    x = torch.from_numpy(TASK.features(synthetic_fraud_frame(300, seed=0)))
    model.train()
    whole = predict(model, [x])
    batched = predict(model, [x], batch_size=7)
    assert whole.shape == (300,) and whole.dtype == torch.float32 and not whole.requires_grad
    assert not model.training  # batch norm uses its running statistics
    torch.testing.assert_close(batched, whole, rtol=1e-5, atol=1e-6)
    assert predict(model, [x[:0]]).shape == (0,)


def test_carried_adam_state_makes_two_rounds_one_long_run():
    """Two one-epoch fits that carry the optimiser state are exactly one two-epoch fit (full
    batches, so the data order cannot differ; no batch norm, whose float noise Adam's first
    steps would amplify); restarting Adam is not."""
    task = FraudTask(CONTRACT, hidden=[32, 16], batch_norm=False)
    rows = synthetic_fraud_frame(200, seed=3)
    inputs = [torch.from_numpy(task.features(rows))]
    target = torch.from_numpy(task.contract.labels(rows).astype(np.float32))
    loss = nn.BCEWithLogitsLoss()
    once = task.seeded_model(0)
    fit(once, inputs, target, loss, settings(epochs=2, lr=0.01, batch_size=1000))
    carried, restarted = task.seeded_model(0), task.seeded_model(0)
    first = fit(carried, inputs, target, loss, settings(epochs=1, lr=0.01, batch_size=1000))
    fit(restarted, inputs, target, loss, settings(epochs=1, lr=0.01, batch_size=1000))
    fit(carried, inputs, target, loss, replace(settings(epochs=1, lr=0.01, batch_size=1000),
                                               optimizer_state=first.optimizer_state))
    fit(restarted, inputs, target, loss, settings(epochs=1, lr=0.01, batch_size=1000))
    for (name, a), b, c in zip(once.state_dict().items(), carried.state_dict().values(),
                               restarted.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert any(not torch.allclose(a, c, atol=1e-4) for a, c in zip(once.parameters(), restarted.parameters()))


def test_a_kept_state_for_other_shapes_is_not_loaded():
    other = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(other.parameters())
    assert not restore_optimizer(optimizer, {"state": {}, "shapes": [[7, 7]]})
    assert optimizer.state_dict()["state"] == {}


@pytest.mark.parametrize("step, expected", [(0, 0.1), (5, 0.05), (10, 0.0), (2, 0.1 * 0.5 * (1 + math.cos(math.pi / 5)))])
def test_cosine_schedule_follows_the_formula(step, expected):
    assert learning_rate_at(step, 10, 0.1, "cosine") == pytest.approx(expected, abs=1e-12)
    assert learning_rate_at(step, 10, 0.1, "constant") == 0.1


def test_fit_applies_the_schedule_and_trains_only_unfrozen_parameters():
    rows = synthetic_fraud_frame(300, seed=4)
    inputs = [torch.from_numpy(TASK.features(rows))]
    target = torch.from_numpy(TASK.contract.labels(rows).astype(np.float32))
    model = TASK.seeded_model(0)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    *body, head = [m for m in model if any(True for _ in m.parameters(recurse=False))]
    for module in body:
        module.requires_grad_(False)
    report = fit(model, inputs, target, nn.BCEWithLogitsLoss(), replace(settings(epochs=2, lr=0.01, batch_size=64),
                                                                         lr_schedule="cosine"))
    head_names = {f"{i}.{n}" for i, m in enumerate(model) if m is head for n, _ in m.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(p, frozen[name]) != (name in head_names), name
    assert len(report.optimizer_state["shapes"]) == 2  # the head's weight and bias only
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        learning_rate_at(0, 10, 0.1, "linear")
