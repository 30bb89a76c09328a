"""Simulated Byzantine behaviours transform updates exactly as documented, and the attacking
silo is the production agent with only what it trains on and what it reports replaced."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fl_tasks import protocol
from fl_tasks.contract import Column, DataContract
from fl_tasks.protocol import UpdateManifest
from fl_tasks.protocol.codec import decode_state
from fl_tasks.silo.agent import SiloAgent
from fl_tasks.silo.sources import FileSource
from fl_tasks.simulation import attacks
from fl_tasks.simulation.attacks import (BEHAVIOURS, COLLUDING, DROPOUT, HONEST, INFLATED_EVAL, LABEL_FLIP, NO_EVAL,
                                        NOISE, SANDBAGGED_EVAL, SCALED, SIGN_FLIP, STRAGGLER, AttackingAgent, poison_data, poison_model)
from fl_tasks.simulation.datasets import synthetic_fraud_frame

from tests.fl_tasks.silo.test_agent import CONTRACT, base_state, publish, read_decline, read_update, silo_rows

BASE = {"w": np.array([1.0, 2.0], np.float32), "n": np.array(4, np.int64)}
TRAINED = {"w": np.array([1.5, 1.0], np.float32), "n": np.array(9, np.int64)}


def test_sign_flip_and_scaled_move_the_delta():
    flipped = poison_model(SIGN_FLIP, TRAINED, BASE, 10.0, "r1")
    np.testing.assert_allclose(flipped["w"], [1.0 - 10 * 0.5, 2.0 + 10 * 1.0])
    scaled = poison_model(SCALED, TRAINED, BASE, 3.0, "r1")
    np.testing.assert_allclose(scaled["w"], [1.0 + 1.5, 2.0 - 3.0])
    assert flipped["n"] == 9 and scaled["w"].dtype == np.float32  # integer buffers untouched


def test_colluders_send_identical_models_and_noise_is_private():
    a = poison_model(COLLUDING, TRAINED, BASE, 1.0, "000003")
    b = poison_model(COLLUDING, {"w": np.array([9.0, 9.0], np.float32), "n": TRAINED["n"]}, BASE, 1.0, "000003")
    np.testing.assert_array_equal(a["w"], b["w"])
    assert not np.array_equal(a["w"], poison_model(COLLUDING, TRAINED, BASE, 1.0, "000004")["w"])
    noisy = poison_model(NOISE, TRAINED, BASE, 0.5, "000003")
    assert not np.array_equal(noisy["w"], TRAINED["w"]) and np.all(np.abs(noisy["w"] - TRAINED["w"]) < 5)


def test_honest_and_label_flip_keep_the_trained_model_and_label_flip_inverts_labels():
    assert poison_model(HONEST, TRAINED, BASE, 10.0, "r")["w"].tolist() == TRAINED["w"].tolist()
    assert poison_model(LABEL_FLIP, TRAINED, BASE, 10.0, "r")["w"].tolist() == TRAINED["w"].tolist()
    # Rows are DataFrames now: the contract's label column is inverted, nothing else changes.
    rows = synthetic_fraud_frame(300, seed=1)
    flipped = poison_data(LABEL_FLIP, rows, CONTRACT)
    np.testing.assert_array_equal(flipped["Class"].to_numpy(), ~rows["Class"].to_numpy())
    pd.testing.assert_frame_equal(flipped.drop(columns="Class"), rows.drop(columns="Class"))
    assert flipped["Class"].dtype == bool and CONTRACT.check(flipped) == []
    assert rows["Class"].sum() == synthetic_fraud_frame(300, seed=1)["Class"].sum()  # the silo's rows untouched
    assert poison_data(HONEST, rows, CONTRACT) is rows
    assert poison_data(SIGN_FLIP, rows, CONTRACT) is rows


def test_label_flip_of_a_categorical_label_moves_each_class_to_the_next():
    contract = DataContract(Column("risk", "categorical", categories=("low", "mid", "high")),
                            (Column("x", "numeric"),))
    rows = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "risk": ["low", "mid", "high", "low"]})
    assert poison_data(LABEL_FLIP, rows, contract)["risk"].tolist() == ["mid", "high", "low", "mid"]


def test_label_flip_of_a_zero_one_label():
    rows = pd.DataFrame({"Class": [0, 1, 1, 0]})
    assert poison_data(LABEL_FLIP, rows, CONTRACT)["Class"].tolist() == [True, False, False, True]


# --- the attacking agent ------------------------------------------------------------------------------


@pytest.fixture
def silo(s3_server, tmp_path):
    """make(agent_class, **kwargs) -> an agent over 800 good rows in a bucket of its own, round 000001 committed."""
    from datetime import datetime

    from fl_tasks.protocol.storage import ObjectStore

    store = ObjectStore(s3_server.endpoint_url)
    path = tmp_path / "silo.parquet"
    silo_rows().to_parquet(path, index=False)
    made = []

    def make(agent_class=AttackingAgent, rows_path=path, **kwargs):
        bucket = f"attack-{len(made)}-{datetime.now().strftime('%H%M%S%f')}"
        store.ensure_bucket(bucket)
        agent = agent_class("bank-a", "fed", f"s3://{bucket}", FileSource(rows_path), store, **kwargs)
        publish(store, bucket, "000001")
        made.append(agent)
        return agent

    return make


def payload_of(agent) -> dict[str, np.ndarray]:
    return decode_state(agent.store.get_bytes(agent.bucket, protocol.update_payload_key("", "fed", "000001")))


def test_the_attacker_is_the_production_agent():
    assert issubclass(AttackingAgent, SiloAgent)
    overridden = {name for name in vars(AttackingAgent) if not name.startswith("__")}
    assert overridden == {"answer", "train_rows", "reported_state", "evaluate", "reported_evaluation"}
    with pytest.raises(ValueError, match="behaviour 'evil' must be one of"):
        AttackingAgent("bank-a", "fed", "s3://bucket-b", FileSource("x.parquet"), None, behaviour="evil")


def test_an_honest_attacking_agent_reports_what_the_silo_agent_reports(silo):
    honest = silo(SiloAgent)
    assert honest.answer("000001") is True
    attacker = silo(behaviour=HONEST)
    assert attacker.answer("000001") is True
    # The same rows, base and round seed train the same model.
    for name, value in payload_of(honest).items():
        np.testing.assert_array_equal(payload_of(attacker)[name], value)


@pytest.mark.parametrize("behaviour, scale", [(SIGN_FLIP, 10.0), (SCALED, 3.0)])
def test_model_attacks_poison_the_trained_model_before_it_is_committed(silo, behaviour, scale):
    honest = silo(SiloAgent)
    honest.answer("000001")
    attacker = silo(behaviour=behaviour, attack_scale=scale)
    assert attacker.answer("000001") is True
    expected = poison_model(behaviour, payload_of(honest), base_state(), scale, "000001")
    reported = payload_of(attacker)
    assert set(reported) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(reported[name], value, rtol=1e-6, err_msg=name)
    # The poisoned payload is committed like any update: its manifest hashes it, honestly counted.
    update = read_update(attacker, "000001")
    assert update.num_examples == read_update(honest, "000001").num_examples
    assert UpdateManifest.from_json(update.to_json()) == update


def test_label_flip_trains_on_inverted_labels(silo, monkeypatch):
    seen = []
    train = AttackingAgent.train_rows

    def spy(self, rows, contract):
        out = train(self, rows, contract)
        seen.append((rows["Class"].to_numpy().copy(), out["Class"].to_numpy().copy()))
        return out

    monkeypatch.setattr(AttackingAgent, "train_rows", spy)
    honest = silo(SiloAgent)
    honest.answer("000001")
    attacker = silo(behaviour=LABEL_FLIP)
    assert attacker.answer("000001") is True
    [(given, trained_on)] = seen
    np.testing.assert_array_equal(trained_on, ~given)
    assert not np.array_equal(payload_of(attacker)["0.weight"], payload_of(honest)["0.weight"])


def test_dropout_behaviour_never_answers(silo):
    dropout = silo(behaviour=DROPOUT)
    assert dropout.answer("000001") is False
    assert read_update(dropout, "000001") is None and read_decline(dropout, "000001") is None
    assert dropout.pending_rounds() == []  # it will not try again either


def test_a_straggler_waits_then_answers(silo, monkeypatch):
    slept = []
    monkeypatch.setattr(attacks.time, "sleep", slept.append)
    straggler = silo(behaviour=STRAGGLER, delay_seconds=30.0)
    assert straggler.answer("000001") is True
    assert slept == [30.0] and read_update(straggler, "000001") is not None


def test_an_attacker_is_bound_by_the_data_contract_too(silo, tmp_path):
    path = tmp_path / "bad.parquet"
    silo_rows().drop(columns="Amount").to_parquet(path, index=False)
    attacker = silo(rows_path=path, behaviour=SIGN_FLIP)
    assert attacker.answer("000001") is False
    assert "column 'Amount' missing" in read_decline(attacker, "000001").reason
    assert read_update(attacker, "000001") is None


def test_the_command_line_takes_a_behaviour(capsys, tmp_path):
    path = tmp_path / "silo.parquet"
    silo_rows(50).to_parquet(path, index=False)
    with pytest.raises(SystemExit) as info:
        attacks.main(["--behaviour", "evil", "--client-id", "bank-a", "--federation", "fed", "--bucket", "s3://b",
                      "--data", str(path)])
    assert info.value.code == 2 and "invalid choice: 'evil'" in capsys.readouterr().err
    code = attacks.main(["--behaviour", SIGN_FLIP, "--client-id", "../x", "--federation", "fed", "--bucket", "s3://b",
                         "--data", str(path), "--endpoint-url", "http://127.0.0.1:1"])
    assert code == 2 and "fl-simulate-silo: client id '../x' must match" in capsys.readouterr().err
    assert set(BEHAVIOURS) == {HONEST, DROPOUT, STRAGGLER, SIGN_FLIP, SCALED, NOISE, COLLUDING, LABEL_FLIP,
                               INFLATED_EVAL, SANDBAGGED_EVAL, NO_EVAL}
