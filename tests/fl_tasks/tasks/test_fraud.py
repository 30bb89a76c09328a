"""fl_tasks/tasks/fraud.py and the task API (fl_tasks/tasks/api.py): the built-in FraudTask's
model, features, metrics and params, numpy views of state dicts, and `load_task`, which turns
every way an entrypoint can be wrong into a TaskError that says what to fix.

(Was test_models.py: `FraudMLP`/`build_model`/`state_to_numpy`/`load_numpy_state` became
`FraudTask.build_model`/`seeded_model`, `model_state` and `load_model_state`; `evaluation.evaluate`
became `FraudTask.evaluate`; `flatten_state` became `fl_tasks.aggregation.flat.Layout`.)
"""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from fl_tasks.aggregation.flat import Layout
from fl_tasks.contract import Column, DataContract
from fl_tasks.simulation.datasets import EPOCH, synthetic_fraud_frame
from fl_tasks.tasks.api import (Metric, Task, TaskError, TaskIdentity, TrainingSettings, TrainResult, load_model_state,
                                load_task, model_state, params_sha256)
from fl_tasks.tasks.fraud import COMPONENTS, FraudTask

ENTRYPOINT = "fl_tasks.tasks.fraud:FraudTask"
CONTRACT = DataContract(label=Column("Class", "boolean"),
                        features=tuple(Column(name, "numeric") for name in [*COMPONENTS, "Amount"]),
                        event_time="event_time")
TASK = FraudTask(CONTRACT, hidden=[16, 8])
TASK_NO_BN = FraudTask(CONTRACT, hidden=[16, 8], batch_norm=False)


def assert_states_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_the_fraud_contract_of_the_tests_is_the_federation_files():
    from fl_tasks.config import parse_federation

    from tests.conftest import federation_doc

    assert parse_federation(federation_doc()).contract == CONTRACT


# --- the model -------------------------------------------------------------------------------


def test_architecture_and_state_layout():
    model = TASK.seeded_model(0)
    assert isinstance(model, torch.nn.Module)
    state = model_state(model)
    # The model is a plain nn.Sequential now (FraudMLP's `net.` prefix is gone).
    shapes = {k: v.shape for k, v in state.items()}
    assert shapes == {
        "0.weight": (16, 30), "0.bias": (16,),
        "1.weight": (16,), "1.bias": (16,), "1.running_mean": (16,), "1.running_var": (16,),
        "1.num_batches_tracked": (),
        "3.weight": (8, 16), "3.bias": (8,),
        "4.weight": (8,), "4.bias": (8,), "4.running_mean": (8,), "4.running_var": (8,),
        "4.num_batches_tracked": (),
        "6.weight": (1, 8), "6.bias": (1,),
    }
    assert state["1.num_batches_tracked"].dtype == np.int64
    assert state["0.weight"].dtype == np.float32
    # 28 components + log amount + time of day in; one logit per row out.
    assert FraudTask.input_dim == 30
    assert model.eval()(torch.zeros(5, 30)).shape == (5,)


def test_without_batch_norm_there_are_no_buffers():
    state = model_state(TASK_NO_BN.seeded_model(0))
    assert list(state) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def test_default_params_build_the_documented_model():
    task = FraudTask(CONTRACT)
    assert task.hidden == (64, 32) and task.batch_norm is True
    assert model_state(task.seeded_model(0))["0.weight"].shape == (64, 30)


def test_seeded_model_is_deterministic_and_seeds_differ():
    a = model_state(TASK.seeded_model(7))
    b = model_state(TASK.seeded_model(7))
    c = model_state(TASK.seeded_model(8))
    assert_states_equal(a, b)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    assert not np.array_equal(a["6.weight"], c["6.weight"])
    # Another FraudTask object with the same params (another machine) builds the same weights.
    assert_states_equal(a, model_state(FraudTask(CONTRACT, hidden=[16, 8]).seeded_model(7)))


def test_seeded_model_does_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TASK.seeded_model(7)
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected.numpy())


def test_model_state_returns_copies():
    model = TASK.seeded_model(0)
    state = model_state(model)
    state["0.bias"][:] = 99.0
    assert not torch.any(model.state_dict()["0.bias"] == 99.0)


def test_numpy_state_round_trip():
    source = TASK.seeded_model(1)
    # Make the buffers non-default so that their transfer is visible.
    source.train()
    source(torch.randn(64, 30, generator=torch.Generator().manual_seed(0)))
    state = model_state(source)
    assert int(state["1.num_batches_tracked"]) == 1
    target = TASK.seeded_model(2)
    assert not np.array_equal(model_state(target)["0.weight"], state["0.weight"])
    returned = load_model_state(target, state)
    assert returned is target
    assert_states_equal(model_state(target), state)
    x = torch.randn(10, 30, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_array_equal(source.eval()(x).numpy(), target.eval()(x).numpy())


def test_loaded_state_is_copied_not_shared():
    state = model_state(TASK.seeded_model(1))
    model = load_model_state(TASK.seeded_model(2), state)
    state["0.bias"][:] = 42.0
    assert not torch.any(model.state_dict()["0.bias"] == 42.0)


def test_load_rejects_missing_key():
    model = TASK.seeded_model(0)
    state = model_state(model)
    del state["4.num_batches_tracked"]
    with pytest.raises(ValueError, match=r"tensor names differ from the task's model: \['4.num_batches_tracked'\]"):
        load_model_state(model, state)


def test_load_rejects_extra_key():
    model = TASK.seeded_model(0)
    state = model_state(model)
    state["evil"] = np.zeros(1, dtype=np.float32)
    with pytest.raises(ValueError, match=r"\['evil'\]"):
        load_model_state(model, state)


def test_load_rejects_wrong_shape():
    model = TASK.seeded_model(0)
    before = model_state(model)
    state = model_state(model)
    state["0.weight"] = np.zeros((30, 16), dtype=np.float32)
    with pytest.raises(ValueError, match=r"tensor '0.weight' is \(30, 16\) torch.float32, the task's model has "
                                         r"\(16, 30\) torch.float32"):
        load_model_state(model, state)
    assert_states_equal(model_state(model), before)  # nothing was loaded


@pytest.mark.parametrize("name, dtype", [("0.weight", np.float64), ("0.bias", np.float16),
                                         ("1.num_batches_tracked", np.int32),
                                         ("1.num_batches_tracked", np.float32)])
def test_load_rejects_wrong_dtype(name, dtype):
    model = TASK.seeded_model(0)
    state = model_state(model)
    state[name] = state[name].astype(dtype)
    with pytest.raises(ValueError, match=f"tensor '{name}'"):
        load_model_state(model, state)


def test_a_model_of_other_params_does_not_load():
    with pytest.raises(ValueError, match="tensor names differ"):
        load_model_state(TASK.seeded_model(0), model_state(TASK_NO_BN.seeded_model(0)))
    wider = FraudTask(CONTRACT, hidden=[32, 8])
    with pytest.raises(ValueError, match=r"tensor '0.weight' is \(32, 30\)"):
        load_model_state(TASK.seeded_model(0), model_state(wider.seeded_model(0)))


def test_flattened_state_counts_floating_tensors_only():
    # Distances between models are taken on the floating tensors (Layout replaced flatten_state).
    model = TASK.seeded_model(0)
    state = model_state(model)
    flat = Layout(state).flatten(state)
    num_params = sum(p.numel() for p in model.parameters())
    # 30*16+16 + 2*16 + 16*8+8 + 2*8 + 8+1 = 496 + 32 + 136 + 16 + 9 = 689 parameters,
    # plus running mean and var (2*16 + 2*8 = 48); the two int64 counters are left out.
    assert num_params == 689
    assert flat.shape == (689 + 48,)
    assert flat.size == sum(v.size for v in state.values() if np.issubdtype(v.dtype, np.floating))
    no_bn = model_state(TASK_NO_BN.seeded_model(0))
    assert Layout(no_bn).flatten(no_bn).size == sum(p.numel() for p in TASK_NO_BN.seeded_model(0).parameters())


# --- features ------------------------------------------------------------------------------------


def test_features_are_components_log_amount_and_time_of_day():
    rows = synthetic_fraud_frame(300, seed=0)
    x = TASK.features(rows)
    assert x.shape == (300, 30) and x.dtype == np.float32
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x[:, :28], rows[COMPONENTS].to_numpy(dtype=np.float32))
    np.testing.assert_allclose(x[:, 28], (np.log1p(rows["Amount"].to_numpy()) - 3.0) / 2.0, rtol=1e-6)
    assert x[:, 29].min() >= -1.0 and x[:, 29].max() < 1.0


def test_time_of_day_is_taken_in_utc_whatever_the_zone():
    base = synthetic_fraud_frame(4, seed=0)
    base["event_time"] = pd.to_datetime(["2013-09-01T00:00:00Z", "2013-09-01T06:00:00Z", "2013-09-01T12:00:00Z",
                                         "2013-09-02T18:00:00Z"], utc=True)
    np.testing.assert_allclose(TASK.features(base)[:, 29], [-1.0, -0.5, 0.0, 0.5])
    shifted = base.copy()
    shifted["event_time"] = shifted["event_time"].dt.tz_convert("Europe/Brussels")  # the same instants
    np.testing.assert_array_equal(TASK.features(shifted), TASK.features(base))


def test_missing_values_in_the_components_encode_as_zero():
    rows = synthetic_fraud_frame(5, seed=0)
    rows.loc[2, "V3"] = np.nan
    assert TASK.features(rows)[2, 2] == 0.0


# --- metrics and evaluation --------------------------------------------------------------------------


def rows_with_labels(labels) -> pd.DataFrame:
    rows = synthetic_fraud_frame(len(labels), seed=0)
    rows["Class"] = np.asarray(labels, dtype=bool)
    return rows


def evaluate_scores(labels, scores, monkeypatch) -> dict[str, float]:
    """FraudTask.evaluate on rows with `labels`, the model's scores fixed to `scores`."""
    task = FraudTask(CONTRACT, hidden=[4])
    monkeypatch.setattr(task, "scores", lambda model, rows: np.asarray(scores, dtype=np.float64))
    return task.evaluate(task.seeded_model(0), rows_with_labels(labels))


def test_metrics_are_declared_and_pr_auc_ranks():
    assert [m.name for m in FraudTask.metrics] == ["roc_auc", "pr_auc"]
    assert TASK.primary == Metric("pr_auc", True, 0.0, 1.0)
    assert TASK.primary.better(0.5, 0.4) and not TASK.primary.better(0.4, 0.5)
    assert Metric("loss", higher_is_better=False).better(0.1, 0.2)
    with pytest.raises(KeyError, match="no metric 'accuracy'; it reports roc_auc, pr_auc"):
        TASK.metric("accuracy")


def test_evaluate_hand_computed(monkeypatch):
    m = evaluate_scores([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], monkeypatch)
    # ROC-AUC: of the 4 (positive, negative) pairs, (0.35 vs 0.4) is mis-ordered -> 3/4.
    assert m["roc_auc"] == pytest.approx(0.75)
    # Average precision: ranks 0.8(+), 0.4(-), 0.35(+), 0.1(-): 0.5 * 1 + 0.5 * 2/3.
    assert m["pr_auc"] == pytest.approx(0.5 + 1 / 3)
    assert set(m) == {metric.name for metric in FraudTask.metrics}
    assert all(type(v) is float for v in m.values())


def test_evaluate_perfect_and_reversed(monkeypatch):
    y = [0, 1, 0, 1, 1]
    assert evaluate_scores(y, [0.1, 0.9, 0.2, 0.8, 0.7], monkeypatch) == {"roc_auc": 1.0, "pr_auc": 1.0}
    assert evaluate_scores(y, [0.9, 0.1, 0.8, 0.2, 0.3], monkeypatch)["roc_auc"] == 0.0


@pytest.mark.parametrize("y", [[0] * 5, [1] * 3])
def test_single_class_raises(y, monkeypatch):
    with pytest.raises(ValueError, match="both classes"):
        evaluate_scores(y, np.linspace(0, 1, len(y)), monkeypatch)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scores_give_zeros(bad, monkeypatch):
    assert evaluate_scores([0, 0, 1, 1], [0.1, bad, 0.35, 0.8], monkeypatch) == {"roc_auc": 0.0, "pr_auc": 0.0}


def test_scores_are_probabilities_in_eval_mode():
    model = TASK.seeded_model(0)
    rows = synthetic_fraud_frame(300, seed=0)
    scores = TASK.scores(model, rows)
    assert scores.shape == (300,) and scores.dtype == np.float32
    assert np.all((scores > 0) & (scores < 1))
    assert not model.training  # evaluation switches to eval mode (batch norm uses running stats)
    assert TASK.scores(model, rows.iloc[:0]).shape == (0,)
    metrics = TASK.evaluate(model, rows)
    assert all(0.0 <= metrics[m.name] <= 1.0 for m in FraudTask.metrics)


def test_train_reports_the_examples_and_the_loop_metrics():
    rows = synthetic_fraud_frame(400, seed=1)
    model = TASK.seeded_model(0)
    before = model_state(model)
    result = TASK.train(model, rows, TrainingSettings(local_epochs=1, learning_rate=0.01, batch_size=64),
                        model.state_dict())
    assert isinstance(result, TrainResult) and result.num_examples == 400
    assert set(result.metrics) == {"train_loss", "train_seconds"}
    assert math.isfinite(result.metrics["train_loss"])
    assert not np.array_equal(model_state(model)["0.weight"], before["0.weight"])


# --- params ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, fragment", [
    ({"hidden": []}, "hidden must be a list of positive layer widths"),
    ({"hidden": [0]}, "hidden must be a list of positive layer widths"),
    ({"hidden": [16, "8"]}, "hidden must be a list of positive layer widths"),
    ({"hidden": [True]}, "hidden must be a list of positive layer widths"),
    ({"batch_norm": "yes"}, "batch_norm must be true or false"),
])
def test_bad_params_are_refused(params, fragment):
    with pytest.raises(ValueError, match=fragment):
        FraudTask(CONTRACT, **params)
    # Through load_task (what a federation file goes through): a TaskError naming the entrypoint.
    with pytest.raises(TaskError, match=f"'{ENTRYPOINT}' refused its params: {fragment}"):
        load_task(ENTRYPOINT, params, CONTRACT)


def test_unknown_params_name_the_accepted_ones():
    with pytest.raises(TaskError) as info:
        load_task(ENTRYPOINT, {"hidden": [8], "depth": 3}, CONTRACT)
    message = str(info.value)
    assert f"'{ENTRYPOINT}' does not take params ['depth', 'hidden']" in message
    assert "it accepts hidden, batch_norm" in message


def test_a_contract_without_the_fraud_columns_is_refused():
    other = DataContract(label=Column("Class", "boolean"), features=(Column("Amount", "numeric"),),
                         event_time="event_time")
    with pytest.raises(TaskError, match=r"FraudTask needs numeric features V1..V28 and Amount.*'V1'"):
        load_task(ENTRYPOINT, {}, other)
    no_time = DataContract(CONTRACT.label, CONTRACT.features, event_time=None)
    with pytest.raises(TaskError, match="an event time"):
        load_task(ENTRYPOINT, {}, no_time)
    categorical = DataContract(Column("Class", "categorical", categories=("yes", "no")), CONTRACT.features,
                               "event_time")
    with pytest.raises(TaskError, match="a boolean label"):
        load_task(ENTRYPOINT, {}, categorical)


def test_load_task_builds_the_task_with_its_params():
    task = load_task(ENTRYPOINT, {"hidden": [8, 4], "batch_norm": False}, CONTRACT)
    assert isinstance(task, FraudTask) and task.hidden == (8, 4) and task.batch_norm is False
    assert task.contract is CONTRACT and task.version == FraudTask.version


def test_params_sha256_ignores_key_order_and_sees_every_value():
    assert params_sha256({"hidden": [8], "batch_norm": False}) == params_sha256({"batch_norm": False, "hidden": [8]})
    assert params_sha256({"hidden": [8]}) != params_sha256({"hidden": [9]})
    assert params_sha256({}) != params_sha256({"hidden": [8]})
    identity = TaskIdentity(ENTRYPOINT, "2", params_sha256({}))
    assert identity.as_dict() == {"entrypoint": ENTRYPOINT, "version": "2", "params_sha256": params_sha256({})}


def test_example_data():
    frame = TASK.example_data("synthetic", 200, 3)
    pd.testing.assert_frame_equal(frame, synthetic_fraud_frame(200, 3))
    assert CONTRACT.check(frame) == []
    assert frame["event_time"].min() >= pd.Timestamp(EPOCH, tz="UTC")
    with pytest.raises(ValueError, match="unknown example data 'mnist'"):
        TASK.example_data("mnist", 10, 0)


# --- load_task: every way an entrypoint can be wrong is a TaskError saying what to fix ----------------


@pytest.fixture
def task_modules(tmp_path, monkeypatch):
    """A package of task modules on sys.path; each test's modules get their own name."""
    import sys

    monkeypatch.syspath_prepend(str(tmp_path))
    package = f"task_mods_{abs(hash(str(tmp_path)))}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    header = "from fl_tasks.tasks.api import Metric, Task\n"

    def write(name: str, body: str) -> str:
        (tmp_path / package / f"{name}.py").write_text(header + textwrap.dedent(body))
        return f"{package}.{name}"

    yield write
    for module in [m for m in sys.modules if m.startswith(package)]:
        del sys.modules[module]


COMPLETE = """
class Complete(Task):
    metrics = (Metric("score"),)
    primary_metric = "score"

    def build_model(self):
        import torch
        return torch.nn.Linear(1, 1)

    def train(self, model, rows, settings, global_state):
        raise NotImplementedError

    def evaluate(self, model, rows):
        return {"score": 0.0}
"""


@pytest.mark.parametrize("entrypoint", ["fl_tasks.tasks.fraud.FraudTask", "fl_tasks.tasks.fraud:", ":FraudTask",
                                        "fl_tasks.tasks.fraud:Fraud Task", "", "a:b:c"])
def test_an_entrypoint_that_is_not_module_colon_class(entrypoint):
    with pytest.raises(TaskError, match="is not 'module:Class'; write it as e.g. 'fraud_banks.task:FraudTask'"):
        load_task(entrypoint, {}, CONTRACT)


def test_a_module_that_does_not_import():
    with pytest.raises(TaskError) as info:
        load_task("no_such_task_package.task:FraudTask", {}, CONTRACT)
    message = str(info.value)
    assert "cannot import 'no_such_task_package.task'" in message
    assert "install the task's package on this machine" in message and "PYTHONPATH" in message


def test_a_module_that_fails_while_importing(task_modules):
    module = task_modules("broken", "raise RuntimeError('no GPU here')\n")
    with pytest.raises(TaskError, match=f"importing '{module}' failed: RuntimeError: no GPU here"):
        load_task(f"{module}:Anything", {}, CONTRACT)


def test_a_missing_class(task_modules):
    module = task_modules("complete", COMPLETE)
    with pytest.raises(TaskError, match=f"module '{module}' has no 'Completed'; check the class name"):
        load_task(f"{module}:Completed", {}, CONTRACT)
    assert isinstance(load_task(f"{module}:Complete", {}, CONTRACT), Task)  # the right name loads


@pytest.mark.parametrize("entrypoint", ["fl_tasks.contract:Column", "fl_tasks.tasks.fraud:COMPONENTS",
                                        "fl_tasks.tasks.api:load_task"])
def test_not_a_task_subclass(entrypoint):
    with pytest.raises(TaskError, match=f"'{entrypoint}' is not a subclass of fl_tasks.tasks.api.Task; derive it from Task"):
        load_task(entrypoint, {}, CONTRACT)


def test_missing_methods_are_named(task_modules):
    module = task_modules("partial", """
        class Partial(Task):
            metrics = (Metric("score"),)
            primary_metric = "score"

            def build_model(self):
                raise NotImplementedError
        """)
    with pytest.raises(TaskError, match=f"'{module}:Partial' does not implement evaluate, train; add those methods"):
        load_task(f"{module}:Partial", {}, CONTRACT)


def test_metrics_must_be_declared_and_name_the_primary(task_modules):
    module = task_modules("metrics", COMPLETE + """
class Silent(Complete):
    metrics = ()

class Unranked(Complete):
    primary_metric = "accuracy"
""")
    with pytest.raises(TaskError, match="declares no metrics; set `metrics = "):
        load_task(f"{module}:Silent", {}, CONTRACT)
    with pytest.raises(TaskError, match=r"primary_metric 'accuracy' is not one of its metrics \['score'\]"):
        load_task(f"{module}:Unranked", {}, CONTRACT)


def test_params_a_task_does_not_take(task_modules):
    module = task_modules("noparams", COMPLETE)
    with pytest.raises(TaskError, match=r"does not take params \['width'\] .*it accepts no params"):
        load_task(f"{module}:Complete", {"width": 3}, CONTRACT)


def test_task_error_is_a_value_error():
    assert issubclass(TaskError, ValueError)
