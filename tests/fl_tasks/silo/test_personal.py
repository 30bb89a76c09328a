"""Personal models at the silo (fl_tasks.silo.personal, wired into fl_tasks.silo.agent):
Ditto's personal objective, FedBN's local tensors (never uploaded, kept, loaded again),
fine-tuning on the training share only (all layers or the head), the local-only baseline that
never takes global weights, and the evaluation's personal block: it validates, serves the
better model, records the choice each round, and shares the weights only when asked.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fl_tasks import protocol
from fl_tasks.contract import Column, DataContract
from fl_tasks.protocol import EvaluationManifest, EvaluationRequest, GlobalManifest, UpdateManifest, sha256_hex
from fl_tasks.protocol.codec import decode_state, decode_update, encode_state
from fl_tasks.protocol.personalization import PersonalizationSettings, PersonalReport
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.silo.agent import SiloAgent
from fl_tasks.silo.holdout import split_rows
from fl_tasks.silo.kept import KeptTensors
from fl_tasks.silo.personal import (better, ditto_step, finetuned, personal_folder, scored, serving_history,
                                    without)
from fl_tasks.silo.sources import FileSource
from fl_tasks.simulation.datasets import synthetic_fraud_frame
from fl_tasks.tasks.api import Metric, Task, TrainingSettings, TrainResult, load_model_state, model_state, params_sha256
from fl_tasks.tasks.fraud import COMPONENTS, FraudTask
from fl_tasks.tasks.training import fit

ENTRYPOINT = "fl_tasks.tasks.fraud:FraudTask"
PARAMS = {"hidden": [8], "batch_norm": True}
CONTRACT = DataContract(label=Column("Class", "boolean"),
                        features=tuple(Column(name, "numeric") for name in [*COMPONENTS, "Amount"]),
                        event_time="event_time")
TASK = FraudTask(CONTRACT, **PARAMS)
LOCAL = TASK.normalization_tensors(TASK.build_model())  # the batch-norm tensors: fedbn's local ones
HOLDOUT = 0.25
ROWS = 800
TRAINING = {"local_epochs": 1, "learning_rate": 0.01, "batch_size": 64, "proximal_mu": 0.0, "codec": "fp32",
            "holdout_fraction": HOLDOUT}


def seeded(seed: int) -> dict[str, np.ndarray]:
    return model_state(TASK.seeded_model(seed))


def silo_rows() -> pd.DataFrame:
    return synthetic_fraud_frame(ROWS, seed=2)


def personalization(strategy: str = "finetune", **changes) -> dict:
    """A manifest's personalization block (fedbn: the task's batch-norm tensors stay local)."""
    block = PersonalizationSettings(strategy, local_tensors=tuple(LOCAL) if strategy == "fedbn" else ()).as_dict()
    return {**block, **changes}


def task_section() -> dict:
    return {"entrypoint": ENTRYPOINT, "version": FraudTask.version, "params": PARAMS,
            "params_sha256": params_sha256(PARAMS)}


def deadline() -> str:
    return (datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat()


def publish_round(agent: SiloAgent, round_id: str, state: dict, personal: dict | None = None,
                  privacy: dict | None = None, **training) -> GlobalManifest:
    """Commit a training round as the coordinator would: payload first, manifest last."""
    payload = encode_state(state)
    manifest = GlobalManifest(
        federation="fed", round_id=round_id, model_name="m", model_version=f"v{round_id}", task=task_section(),
        contract=CONTRACT.as_dict(), payload_sha256=sha256_hex(payload), payload_bytes=len(payload),
        training={**TRAINING, **training}, data_window={"start": None, "end": None}, deadline=deadline(),
        created_at=datetime.now(timezone.utc).isoformat(), personalization=personal or {},
        privacy=privacy or {})
    agent.store.put_bytes(agent.bucket, protocol.global_model_key("", "fed", round_id), payload)
    agent.store.put_bytes(agent.bucket, protocol.global_manifest_key("", "fed", round_id), manifest.to_json())
    return manifest


def publish_evaluation(agent: SiloAgent, round_id: str, models: dict[str, dict], personal: dict | None = None
                       ) -> EvaluationRequest:
    """Commit an evaluation request: each model's payload, then the request."""
    described = {}
    for label, state in models.items():
        payload = encode_state(state)
        agent.store.put_bytes(agent.bucket, protocol.evaluation_model_key("", "fed", round_id, label), payload)
        described[label] = {"version": label, "sha256": sha256_hex(payload), "bytes": len(payload)}
    request = EvaluationRequest(
        federation="fed", round_id=round_id, model_name="m", models=described, task=task_section(),
        contract=CONTRACT.as_dict(), holdout_fraction=HOLDOUT, data_window={"start": None, "end": None},
        deadline=deadline(), created_at=datetime.now(timezone.utc).isoformat(), personalization=personal or {})
    agent.store.put_bytes(agent.bucket, protocol.evaluation_request_key("", "fed", round_id), request.to_json())
    return request


def read_evaluation(agent: SiloAgent, round_id: str) -> EvaluationManifest:
    return EvaluationManifest.from_json(agent.store.get_bytes(agent.bucket, protocol.evaluation_result_key(
        "", "fed", round_id)))


def update_payload(agent: SiloAgent, round_id: str) -> bytes:
    return agent.store.get_bytes(agent.bucket, protocol.update_payload_key("", "fed", round_id))


def header_names(payload: bytes) -> set[str]:
    """The tensor names in a safetensors payload's header, read without decoding it."""
    size = int.from_bytes(payload[:8], "little")
    return set(json.loads(payload[8:8 + size])) - {"__metadata__"}


def shares(agent: SiloAgent) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training share, evaluation share) of the agent's rows."""
    return split_rows(silo_rows(), HOLDOUT, agent.salt)


def round_settings(agent: SiloAgent, round_id: str) -> TrainingSettings:
    """The round's TrainingSettings as the agent builds them."""
    return TrainingSettings(local_epochs=TRAINING["local_epochs"], learning_rate=TRAINING["learning_rate"],
                            batch_size=TRAINING["batch_size"], seed=agent.seed + zlib.crc32(round_id.encode()) % 10_000)


def kept(agent: SiloAgent, name: str) -> tuple[dict, dict]:
    return KeptTensors(personal_folder(agent.state_dir, "fed"), name).load()


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture
def store(s3_server):
    return ObjectStore(s3_server.endpoint_url)


@pytest.fixture
def make_agent(store, tmp_path):
    """make(name) -> an agent over the silo's rows, with its own bucket and state directory."""
    path = tmp_path / "silo.parquet"
    silo_rows().to_parquet(path, index=False)

    def make(name: str = "a", agent_class: type[SiloAgent] = SiloAgent) -> SiloAgent:
        bucket = f"personal-{name}-{datetime.now().strftime('%H%M%S%f')}"
        store.ensure_bucket(bucket)
        return agent_class("bank-a", "fed", f"s3://{bucket}", FileSource(path), store,
                           state_dir=tmp_path / f"state-{name}")

    return make


# --- Ditto's personal objective ----------------------------------------------------------------------


class TinyTask(Task):
    """A linear model on three columns whose parameters record each gradient they get, with the
    data loss (BCE) switched on or off."""

    metrics = (Metric("loss", higher_is_better=False),)
    primary_metric = "loss"

    def __init__(self, data_loss: bool = True) -> None:
        super().__init__(CONTRACT)
        self.data_loss, self.grads = data_loss, {}

    def build_model(self) -> nn.Module:
        model = nn.Linear(3, 1)
        for name, parameter in model.named_parameters():
            parameter.register_hook(lambda grad, name=name: self.grads.setdefault(name, grad.detach().clone()))
        return model

    def tensors(self, rows):
        return torch.from_numpy(rows[["a", "b", "c"]].to_numpy(np.float32)), torch.from_numpy(
            rows["y"].to_numpy(np.float32))

    def loss(self, output, target):
        bce = nn.functional.binary_cross_entropy_with_logits(output.squeeze(-1), target)
        return bce if self.data_loss else 0.0 * bce

    def train(self, model, rows, settings, global_state):
        x, y = self.tensors(rows)
        report = fit(model, [x], y, self.loss, settings, global_state)
        return TrainResult(len(rows), report.metrics, report.optimizer_state)

    def evaluate(self, model, rows):
        x, y = self.tensors(rows)
        with torch.no_grad():
            return {"loss": float(self.loss(model(x), y))}


def tiny_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"a": rng.normal(size=8), "b": rng.normal(size=8), "c": rng.normal(size=8),
                         "y": (np.arange(8) % 2).astype(np.float32)})


def tiny_state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"weight": rng.normal(size=(1, 3)).astype(np.float32), "bias": rng.normal(size=1).astype(np.float32)}


def ditto(lam: float, epochs: int = 1, lr: float = 0.01) -> PersonalizationSettings:
    return PersonalizationSettings("ditto", epochs=epochs, learning_rate=lr, ditto_lambda=lam)


# One full batch, one step: the gradient the hooks see is the whole objective's.
FULL_BATCH = TrainingSettings(local_epochs=1, learning_rate=0.01, batch_size=64)


def test_the_personal_objectives_gradient_is_the_pull_lambda_v_minus_w_without_data_loss():
    task = TinyTask(data_loss=False)
    v, w = tiny_state(1), tiny_state(2)
    ditto_step(task, v, w, tiny_rows(), FULL_BATCH, ditto(0.5))
    for name in v:
        np.testing.assert_allclose(task.grads[name].numpy(), 0.5 * (v[name] - w[name]), rtol=1e-6, err_msg=name)


def test_the_personal_objectives_gradient_is_the_data_gradient_plus_the_pull():
    task = TinyTask()
    v, w, rows = tiny_state(1), tiny_state(2), tiny_rows()
    ditto_step(task, v, w, rows, FULL_BATCH, ditto(2.0))
    # F_k(v) + lambda/2 ||v - w||^2, written out by hand on the same (full) batch.
    model = load_model_state(nn.Linear(3, 1), v)
    x, y = task.tensors(rows)
    objective = task.loss(model(x), y) + 2.0 / 2 * sum(
        ((p - torch.from_numpy(w[n])) ** 2).sum() for n, p in model.named_parameters())
    objective.backward()
    for name, parameter in model.named_parameters():
        np.testing.assert_allclose(task.grads[name].numpy(), parameter.grad.numpy(), rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_ditto_with_lambda_zero_is_plain_local_training():
    train, _ = split_rows(silo_rows(), HOLDOUT, "bank-a:0")
    v, w = seeded(1), seeded(2)
    settings = TrainingSettings(local_epochs=2, learning_rate=0.01, batch_size=64, seed=3)
    personal = ditto_step(TASK, v, w, train, settings, ditto(0.0, epochs=2))
    model = load_model_state(TASK.build_model(), v)
    TASK.train(model, train, settings, model.state_dict())
    assert_same_state(personal, model_state(model))


def test_a_large_lambda_keeps_v_near_w():
    train, _ = split_rows(silo_rows(), HOLDOUT, "bank-a:0")
    w = seeded(1)
    settings = TrainingSettings(local_epochs=1, learning_rate=0.01, batch_size=64, seed=3)

    def distance(lam: float) -> float:
        v = ditto_step(TASK, w, w, train, settings, ditto(lam, epochs=4))
        return float(np.sqrt(sum(((v[n] - w[n]) ** 2).sum() for n, _ in TASK.build_model().named_parameters())))

    free, held = distance(0.0), distance(100.0)
    assert free > 0
    assert held < 0.25 * free, (held, free)


# --- fine-tuning ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers", ["head", "all"])
def test_head_only_fine_tuning_changes_the_head_alone_and_all_changes_the_body_too(layers):
    train, _ = split_rows(silo_rows(), HOLDOUT, "bank-a:0")
    start = seeded(1)
    settings = PersonalizationSettings("finetune", layers=layers, epochs=2, learning_rate=0.01)
    tuned = finetuned(TASK, start, train, settings, seed=0)
    changed = {name for name in start if not np.array_equal(tuned[name], start[name])}
    head = set(TASK.head_parameters(TASK.build_model()))
    assert head == {"3.weight", "3.bias"}
    if layers == "head":
        assert changed == head  # batch-norm statistics included: the body is the global model's
    else:
        assert head < changed and {"0.weight", "1.running_mean"} <= changed


def test_serving_follows_the_primary_metrics_direction():
    assert better(TASK, {"pr_auc": 0.6, "roc_auc": 0.1}, {"pr_auc": 0.5, "roc_auc": 0.9}) == "personal"
    assert better(TASK, {"pr_auc": 0.5}, {"pr_auc": 0.5}) == "global"  # a tie keeps the shared model
    assert better(TinyTask(), {"loss": 0.3}, {"loss": 0.4}) == "personal"  # lower is better
    assert better(TinyTask(), {"loss": 0.5}, {"loss": 0.4}) == "global"


# --- FedBN: the batch-norm tensors stay at the silo ----------------------------------------------------


class Recording(SiloAgent):
    """The production agent, recording each round's trained state (what reported_state sees)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.trained: dict[str, dict] = {}

    def reported_state(self, trained, base, round_id):
        self.trained[round_id] = {name: value.copy() for name, value in trained.items()}
        return trained


@pytest.fixture
def starts(monkeypatch):
    """The state each FraudTask.train call starts from, and the rows it trains on, in call order."""
    calls: list[tuple[dict, pd.DataFrame]] = []
    original = FraudTask.train

    def train(self, model, rows, settings, global_state):
        calls.append((model_state(model), rows.copy()))
        return original(self, model, rows, settings, global_state)

    monkeypatch.setattr(FraudTask, "train", train)
    return calls


def test_fedbn_local_tensors_never_leave_the_silo_and_the_next_round_trains_with_them(make_agent, starts):
    agent = make_agent(agent_class=Recording)
    block = personalization("fedbn", local_only=False)
    assert LOCAL == ["1.bias", "1.num_batches_tracked", "1.running_mean", "1.running_var", "1.weight"]
    base_1, base_2 = seeded(1), seeded(2)
    shared = set(without(base_1, LOCAL))

    publish_round(agent, "000001", base_1, block)
    assert agent.answer("000001") is True
    payload = update_payload(agent, "000001")
    assert header_names(payload) == shared  # fp32: the weights less the local tensors
    assert set(decode_state(payload)) == shared
    local, record = kept(agent, "fedbn_local")
    assert_same_state(local, {n: agent.trained["000001"][n] for n in LOCAL})  # the trained ones are kept
    assert record["round_id"] == "000001"
    assert any(not np.array_equal(local[n], base_1[n]) for n in LOCAL)  # and they did train

    publish_round(agent, "000002", base_2, block, codec="int8")
    assert agent.answer("000002") is True
    start = starts[-1][0]
    assert_same_state({n: start[n] for n in LOCAL}, local)  # round 2 starts from the kept local tensors ...
    assert_same_state(without(start, LOCAL), without(base_2, LOCAL))  # ... and the round's shared weights
    payload = update_payload(agent, "000002")
    assert not any(name in key for key in header_names(payload) for name in LOCAL)
    # The coordinator decodes against its base less the local tensors (and fills them from the base).
    decoded = decode_update(payload, "int8", without(base_2, LOCAL), TASK.tensor_ranges)
    assert set(decoded) == shared
    update = UpdateManifest.from_json(agent.store.get_bytes(agent.bucket, protocol.update_manifest_key(
        "", "fed", "000002")))
    assert update.payload_sha256 == sha256_hex(payload)
    assert_same_state(kept(agent, "fedbn_local")[0], {n: agent.trained["000002"][n] for n in LOCAL})


def test_fedbn_under_silo_noise_and_topk_sends_no_local_tensor(make_agent):
    agent = make_agent()
    publish_round(agent, "000001", seeded(1), personalization("fedbn", local_only=False),
                  privacy={"clip_norm": 1.0, "noise_stddev": 0.001}, codec="topk:0.1")
    assert agent.answer("000001") is True
    payload = update_payload(agent, "000001")
    assert header_names(payload) == {"indices", "values"}  # the bounded variances are local: no raw/ tensor
    residual, _ = agent.residuals().kept.load()
    assert set(residual) == set(without(seeded(1), LOCAL))  # error feedback over the shared tensors alone
    assert set(decode_update(payload, "topk:0.1", without(seeded(1), LOCAL), TASK.tensor_ranges)) == set(
        without(seeded(1), LOCAL))


def test_a_fedbn_manifest_naming_tensors_the_model_lacks_is_declined(make_agent):
    agent = make_agent()
    publish_round(agent, "000001", seeded(1), personalization("fedbn", local_tensors=["9.running_mean"]))
    assert agent.answer("000001") is False
    decline = protocol.DeclineManifest.from_json(agent.store.get_bytes(agent.bucket, protocol.decline_key(
        "", "fed", "000001")))
    assert "personalization.local_tensors names tensors the task's model does not have: ['9.running_mean']" \
        in decline.reason


def test_fedbn_scores_every_model_with_the_silos_own_normalisation(make_agent, capsys):
    agent = make_agent()
    block = personalization("fedbn", local_only=False)
    candidate, champion = seeded(5), seeded(6)
    _, held = shares(agent)
    # Before its first round the silo has no local tensors: the models are scored as sent.
    publish_evaluation(agent, "000001", {"candidate": candidate, "champion": champion}, block)
    assert agent.evaluate("000001") is True
    evaluation = read_evaluation(agent, "000001")
    assert evaluation.scores["candidate"] == scored(TASK, candidate, held) and evaluation.personal == {}
    assert "no FedBN local tensors kept yet" in capsys.readouterr().out

    publish_round(agent, "000002", seeded(1), block)
    assert agent.answer("000002") is True
    local, _ = kept(agent, "fedbn_local")
    request = publish_evaluation(agent, "000003", {"candidate": candidate, "champion": champion}, block)
    assert agent.evaluate("000003") is True
    evaluation = read_evaluation(agent, "000003")
    for label, state in (("candidate", candidate), ("champion", champion)):
        assert evaluation.scores[label] == scored(TASK, {**state, **local}, held), label
    report = PersonalReport.from_dict(evaluation.personal)
    assert report.strategy == "fedbn" and report.scores == {"personal": evaluation.scores["candidate"]}
    assert report.serving == "global"  # the same model: a tie keeps the global one
    assert report.global_sha256 == request.models["candidate"]["sha256"]
    assert report.personal_sha256 == sha256_hex(encode_state({**candidate, **local}))


# --- Ditto at the silo --------------------------------------------------------------------------------


def test_ditto_keeps_v_pulled_towards_each_rounds_base_and_reports_its_lineage(make_agent, capsys):
    agent = make_agent()
    block = personalization("ditto", epochs=2, learning_rate=0.005, ditto_lambda=0.5, local_only=False)
    settings = PersonalizationSettings.from_dict(block)
    base_1, base_2 = seeded(1), seeded(2)
    train, held = shares(agent)
    publish_evaluation(agent, "000000", {"candidate": base_1}, block)
    assert agent.evaluate("000000") is True  # no v yet: the global scores go, without a personal block
    assert read_evaluation(agent, "000000").personal == {}
    assert "no Ditto personal model kept yet" in capsys.readouterr().out

    first = publish_round(agent, "000001", base_1, block)
    assert agent.answer("000001") is True
    v_1, record = kept(agent, "ditto")
    assert_same_state(v_1, ditto_step(TASK, base_1, base_1, train, round_settings(agent, "000001"), settings))
    assert (record["base_sha256"], record["round_id"]) == (first.payload_sha256, "000001")

    second = publish_round(agent, "000002", base_2, block)
    assert agent.answer("000002") is True
    v_2, record = kept(agent, "ditto")
    assert_same_state(v_2, ditto_step(TASK, v_1, base_2, train, round_settings(agent, "000002"), settings))
    assert record["base_sha256"] == second.payload_sha256 and record["rounds"] == 2

    request = publish_evaluation(agent, "000003", {"candidate": seeded(7), "champion": base_2}, block)
    assert agent.evaluate("000003") is True
    report = PersonalReport.from_dict(read_evaluation(agent, "000003").personal)
    assert report.global_sha256 == second.payload_sha256 != request.models["candidate"]["sha256"]
    assert report.scores == {"personal": scored(TASK, v_2, held)}
    assert report.personal_sha256 == sha256_hex(encode_state(v_2))


# --- the local-only baseline ---------------------------------------------------------------------------


def test_the_local_only_model_never_takes_global_weights(make_agent):
    block = personalization("finetune", local_only=True)
    moved, fixed = make_agent("moved"), make_agent("fixed")
    base_1, base_2 = seeded(1), seeded(2)
    # Same rows, same rounds; one federation's base changes in round 2, the other's does not.
    for agent, bases in ((moved, (base_1, base_2)), (fixed, (base_1, base_1))):
        for round_id, base in zip(("000001", "000002"), bases):
            publish_round(agent, round_id, base, block)
            assert agent.answer(round_id) is True
    local_moved, record = kept(moved, "local_only")
    assert_same_state(local_moved, kept(fixed, "local_only")[0])
    assert record == {**record, "round_id": "000002", "rounds": 2,
                      "seed_sha256": sha256_hex(encode_state(base_1))}
    adam = json.loads((personal_folder(moved.state_dir, "fed") / "local_only_optimizer" / "adam.json").read_text())
    assert adam["round_id"] == "000002"  # its own Adam moments, kept between rounds
    # And it is the seed trained twice on the silo's rows, the second time with the kept moments.
    train, _ = shares(moved)
    model = load_model_state(TASK.build_model(), base_1)
    first = TASK.train(model, train, round_settings(moved, "000001"), model.state_dict())
    TASK.train(model, train, TrainingSettings(**{**round_settings(moved, "000002").__dict__,
                                                 "optimizer_state": first.optimizer_state}), model.state_dict())
    for name, value in model_state(model).items():
        np.testing.assert_allclose(local_moved[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


# --- the evaluation's personal block -------------------------------------------------------------------


def test_fine_tuning_never_sees_the_evaluation_share(make_agent, starts):
    agent = make_agent()
    publish_evaluation(agent, "000001", {"candidate": seeded(1)}, personalization("finetune", local_only=False))
    assert agent.evaluate("000001") is True
    assert read_evaluation(agent, "000001").personal != {}
    train, held = shares(agent)

    def hashes(rows: pd.DataFrame) -> set[int]:
        return set(pd.util.hash_pandas_object(rows, index=False).tolist())

    (_, trained_on), = starts  # one fine-tuning, on the training share exactly
    assert hashes(trained_on) == hashes(train) and not hashes(trained_on) & hashes(held)


def history(agent: SiloAgent) -> list[dict]:
    return serving_history(personal_folder(agent.state_dir, "fed"))


def test_the_personal_block_validates_serves_the_winner_and_records_each_round(make_agent, capsys):
    agent = make_agent()
    block = personalization("finetune", epochs=5, learning_rate=0.01, local_only=True)
    publish_round(agent, "000001", seeded(1), block)
    assert agent.answer("000001") is True  # trains the local-only model too
    untrained = seeded(9)
    request = publish_evaluation(agent, "000001", {"candidate": untrained, "champion": seeded(1)}, block)
    assert agent.evaluate("000001") is True
    evaluation = read_evaluation(agent, "000001")
    report = PersonalReport.from_dict(evaluation.personal)
    _, held = shares(agent)
    assert set(report.scores) == {"personal", "local_only"}
    assert report.scores["local_only"] == scored(TASK, kept(agent, "local_only")[0], held)
    assert report.global_sha256 == request.models["candidate"]["sha256"]  # the candidate, not the champion
    # Fine-tuned for five epochs, the personal model beats the untrained candidate: it is served.
    assert report.scores["personal"]["pr_auc"] > evaluation.scores["candidate"]["pr_auc"]
    assert report.serving == "personal" and report.weights_bytes == 0
    assert agent.store.get_bytes(agent.bucket, protocol.personal_weights_key("", "fed", "000001")) is None
    personal, record = kept(agent, "personal")
    assert record["sha256"] == report.personal_sha256 == sha256_hex(encode_state(personal))
    assert report.scores["personal"] == scored(TASK, personal, held)
    out = capsys.readouterr().out
    assert (f"round 000001: personalization (finetune): personal pr_auc {report.scores['personal']['pr_auc']:.4f}, "
            f"local-only pr_auc {report.scores['local_only']['pr_auc']:.4f}, global (candidate) pr_auc "
            f"{evaluation.scores['candidate']['pr_auc']:.4f}; serving personal") in out
    (line,) = history(agent)
    assert (line["round_id"], line["serving"], line["strategy"]) == ("000001", "personal", "finetune")
    assert line["global"] == {"label": "candidate", "sha256": request.models["candidate"]["sha256"],
                              "scores": evaluation.scores["candidate"]}
    assert line["personal"]["sha256"] == report.personal_sha256

    # The next evaluation: the champion is all there is; its choice is appended.
    publish_evaluation(agent, "000002", {"champion": seeded(1)}, block)
    assert agent.evaluate("000002") is True
    report = PersonalReport.from_dict(read_evaluation(agent, "000002").personal)
    assert [line["round_id"] for line in history(agent)] == ["000001", "000002"]
    assert history(agent)[-1]["serving"] == report.serving == better(
        TASK, report.scores["personal"], read_evaluation(agent, "000002").scores["champion"])


def test_shared_personal_weights_go_to_their_key_before_the_manifest(make_agent):
    agent = make_agent()
    block = personalization("finetune", layers="head", local_only=False, share_weights=True)
    publish_evaluation(agent, "000001", {"candidate": seeded(1)}, block)
    assert agent.evaluate("000001") is True
    report = PersonalReport.from_dict(read_evaluation(agent, "000001").personal)
    weights = agent.store.get_bytes(agent.bucket, protocol.personal_weights_key("", "fed", "000001"))
    assert sha256_hex(weights) == report.personal_sha256 and report.weights_bytes == len(weights)
    assert set(decode_state(weights)) == set(seeded(1))


def test_a_request_without_candidate_or_champion_sends_the_scores_without_a_personal_block(make_agent, capsys):
    agent = make_agent()
    publish_evaluation(agent, "000001", {"version-7": seeded(1)}, personalization("finetune"))
    assert agent.evaluate("000001") is True
    evaluation = read_evaluation(agent, "000001")
    assert set(evaluation.scores) == {"version-7"} and evaluation.personal == {}
    assert "names neither of the models a personal one starts from" in capsys.readouterr().out
    assert history(agent) == []


def test_personal_state_is_kept_atomically_under_the_federation(make_agent):
    agent = make_agent()
    publish_round(agent, "000001", seeded(1), personalization("ditto", local_only=True))
    assert agent.answer("000001") is True
    folder = personal_folder(agent.state_dir, "fed")
    assert folder == Path(agent.state_dir) / "fed" / "personal"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["ditto.json", "ditto.safetensors", "local_only.json", "local_only.safetensors",
                     "local_only_optimizer"]
    for name in ("ditto", "local_only"):
        record = json.loads((folder / f"{name}.json").read_text())
        assert record["sha256"] == hashlib.sha256((folder / f"{name}.safetensors").read_bytes()).hexdigest()
