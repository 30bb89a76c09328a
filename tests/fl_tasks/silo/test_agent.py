"""The silo agent (`fl-client`) against a moto server, reading its rows from a Parquet file: it
answers committed rounds in protocol order, with a trained update, or, when its rows or its
installed task do not fit the round, with a signed decline that names why and no update.

(Was test_client.py: `ClientRuntime` over an in-memory `Table` became `SiloAgent` over a
`DataSource`; the global manifest names the task and the data contract instead of a model
spec; the dropout behaviour moved to the simulator's AttackingAgent, tested in
tests/fl_tasks/simulation/test_attacks.py.)
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_tasks import protocol
from fl_tasks.contract import Column, DataContract
from fl_tasks.protocol import DeclineManifest, GlobalManifest, UpdateManifest, sha256_hex
from fl_tasks.protocol.codec import decode_state, encode_state
from fl_tasks.protocol.signing import SignatureError, verify_manifest
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.silo.agent import SiloAgent, main
from fl_tasks.silo.sources import FileSource
from fl_tasks.simulation.datasets import synthetic_fraud_frame
from fl_tasks.tasks.api import model_state, params_sha256
from fl_tasks.tasks.fraud import COMPONENTS, FraudTask

ENTRYPOINT = "fl_tasks.tasks.fraud:FraudTask"
PARAMS = {"hidden": [8]}
CONTRACT = DataContract(label=Column("Class", "boolean"),
                        features=tuple(Column(name, "numeric") for name in [*COMPONENTS, "Amount"]),
                        event_time="event_time")
TASK = FraudTask(CONTRACT, **PARAMS)
KEY = "silo-key-" * 4
ROWS = 800


def base_state(params=None) -> dict[str, np.ndarray]:
    return model_state(FraudTask(CONTRACT, **(params or PARAMS)).seeded_model(1))


def task_of(**changes) -> dict:
    """The task section of a global manifest: the installed fraud task unless changed."""
    task = {"entrypoint": ENTRYPOINT, "version": FraudTask.version, "params": PARAMS,
            "params_sha256": params_sha256(PARAMS)}
    task.update(changes)
    if "params" in changes and "params_sha256" not in changes:
        task["params_sha256"] = params_sha256(changes["params"])
    return task


def publish(store, bucket, round_id, deadline=None, window=None, corrupt=False, task=None,
            contract: DataContract | None = None, state=None) -> GlobalManifest:
    """Commit round `round_id` in `bucket` as the coordinator would: payload first, manifest last."""
    payload = encode_state(state if state is not None else base_state())
    manifest = GlobalManifest(
        federation="fed", round_id=round_id, model_name="m", model_version="seed",
        task=task or task_of(), contract=(contract or CONTRACT).as_dict(),
        payload_sha256=sha256_hex(payload), payload_bytes=len(payload),
        training={"local_epochs": 1, "learning_rate": 0.01, "batch_size": 64, "proximal_mu": 0.0, "codec": "fp32"},
        data_window=window or {"start": None, "end": None},
        deadline=(deadline or datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat(),
        created_at=datetime.now(timezone.utc).isoformat(),
    )
    store.put_bytes(bucket, protocol.global_model_key("", "fed", round_id), payload[:-1] if corrupt else payload)
    store.put_bytes(bucket, protocol.global_manifest_key("", "fed", round_id), manifest.to_json())
    return manifest


def silo_rows(rows: int = ROWS) -> pd.DataFrame:
    return synthetic_fraud_frame(rows, seed=2)


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_parquet(path, index=False)
    return path


def new_bucket(store: ObjectStore, name: str = "agent-test") -> str:
    bucket = f"{name}-{datetime.now().strftime('%H%M%S%f')}"
    store.ensure_bucket(bucket)
    return bucket


@pytest.fixture
def store(s3_server):
    return ObjectStore(s3_server.endpoint_url)


@pytest.fixture
def agent(store, tmp_path):
    """An unsigned agent over a Parquet file of 800 rows that satisfy the contract."""
    path = write_parquet(silo_rows(), tmp_path / "silo.parquet")
    return SiloAgent("bank-a", "fed", f"s3://{new_bucket(store)}", FileSource(path), store)


@pytest.fixture
def signed_agent(store, tmp_path):
    """make(frame or path) -> a signing agent over those rows, in a fresh bucket."""

    def make(rows: pd.DataFrame | Path) -> SiloAgent:
        path = rows if isinstance(rows, Path) else write_parquet(rows, tmp_path / f"rows-{datetime.now():%H%M%S%f}.parquet")
        return SiloAgent("bank-a", "fed", f"s3://{new_bucket(store, 'decline-test')}", FileSource(path), store,
                         signing_key=KEY)

    return make


def read_update(agent, round_id):
    raw = agent.store.get_bytes(agent.bucket, protocol.update_manifest_key("", "fed", round_id))
    return None if raw is None else UpdateManifest.from_json(raw)


def read_decline(agent, round_id):
    raw = agent.store.get_bytes(agent.bucket, protocol.decline_key("", "fed", round_id))
    return None if raw is None else DeclineManifest.from_json(raw)


# --- answering with an update -------------------------------------------------------------------


def test_answers_a_committed_round_with_a_verifiable_update(agent):
    manifest = publish(agent.store, agent.bucket, "000001")
    assert agent.pending_rounds() == ["000001"]
    assert agent.run(poll_seconds=0.01, max_rounds=1) == 1
    update = read_update(agent, "000001")
    assert update.client_id == "bank-a" and update.num_examples == ROWS
    assert update.base_sha256 == manifest.payload_sha256 and update.base_model_version == "seed"
    assert "train_loss" in update.metrics and set(update.timings) == {"fetch_seconds", "train_seconds"}
    payload = agent.store.get_bytes(agent.bucket, protocol.update_payload_key("", "fed", "000001"))
    assert sha256_hex(payload) == update.payload_sha256 and update.payload_bytes == len(payload)
    state = decode_state(payload)
    base = base_state()
    assert set(state) == set(base)
    assert any(not (state[k] == base[k]).all() for k in base)  # it actually trained
    assert read_decline(agent, "000001") is None
    assert agent.pending_rounds() == []


def test_an_answered_round_is_not_pending_for_a_restarted_agent(agent):
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is True
    restarted = SiloAgent("bank-a", "fed", agent.bucket_uri, agent.source, agent.store)
    assert restarted.pending_rounds() == []  # the committed update in the bucket is the answer


def test_a_round_without_a_committed_manifest_is_not_answered(agent):
    payload = encode_state(base_state())
    agent.store.put_bytes(agent.bucket, protocol.global_model_key("", "fed", "000002"), payload)
    assert agent.pending_rounds() == []


def test_past_deadline_and_corrupt_payload_are_skipped(agent):
    publish(agent.store, agent.bucket, "000003", deadline=datetime.now(timezone.utc) - timedelta(seconds=1))
    publish(agent.store, agent.bucket, "000004", corrupt=True)
    assert agent.answer("000003") is False
    assert agent.answer("000004") is False
    for round_id in ("000003", "000004"):
        # Skipped, not declined: neither is the silo's data or task at fault.
        assert read_update(agent, round_id) is None and read_decline(agent, round_id) is None


def test_a_manifest_of_another_federation_or_round_is_skipped(agent):
    publish(agent.store, agent.bucket, "000005")
    raw = agent.store.get_bytes(agent.bucket, protocol.global_manifest_key("", "fed", "000005"))
    agent.store.put_bytes(agent.bucket, protocol.global_manifest_key("", "fed", "000006"), raw)  # names 000005
    assert agent.answer("000006") is False
    assert read_update(agent, "000006") is None and read_decline(agent, "000006") is None


def test_trains_only_on_rows_inside_the_data_window(agent):
    times = silo_rows()["event_time"]
    start, end = times[200], times[500]
    publish(agent.store, agent.bucket, "000005", window={"start": start.isoformat(), "end": end.isoformat()})
    assert agent.answer("000005") is True
    assert read_update(agent, "000005").num_examples == int(((times >= start) & (times < end)).sum())


def test_a_naive_window_is_utc(agent):
    times = silo_rows()["event_time"]
    start = times[100].tz_convert(None)  # naive, as a scheduler may write it
    publish(agent.store, agent.bucket, "000006", window={"start": start.isoformat(), "end": None})
    assert agent.answer("000006") is True
    assert read_update(agent, "000006").num_examples == int((times >= times[100]).sum())


def test_the_agent_reads_a_csv_file_as_well(store, tmp_path):
    path = tmp_path / "silo.csv"
    silo_rows().to_csv(path, index=False)  # event times written in ISO 8601
    agent = SiloAgent("bank-a", "fed", f"s3://{new_bucket(store)}", FileSource(path), store)
    publish(store, agent.bucket, "000001")
    assert agent.answer("000001") is True and read_update(agent, "000001").num_examples == ROWS


def test_an_allowed_share_of_unknown_categories_still_trains(store, tmp_path):
    contract = DataContract(CONTRACT.label, (*CONTRACT.features, Column("channel", "categorical",
                                                                        categories=("web", "pos"),
                                                                        max_unknown_share=0.1)), "event_time")
    rows = silo_rows()
    rows["channel"] = np.where(np.arange(ROWS) % 20 == 0, "atm", "web")  # 5% unknown, 10% allowed
    agent = SiloAgent("bank-a", "fed", f"s3://{new_bucket(store)}", FileSource(write_parquet(rows, tmp_path / "r.parquet")),
                      store)
    publish(store, agent.bucket, "000001", contract=contract)
    assert agent.answer("000001") is True and read_decline(agent, "000001") is None


# --- declines: the data does not fit the contract ---------------------------------------------------


def assert_declined(agent, round_id, *fragments: str) -> DeclineManifest:
    """The round was answered with a decline signed by the agent's key naming every fragment,
    and with nothing else: no update payload, no update manifest."""
    decline = read_decline(agent, round_id)
    assert decline is not None, "no decline was committed"
    assert (decline.client_id, decline.federation, decline.round_id) == ("bank-a", "fed", round_id)
    for fragment in fragments:
        assert fragment in decline.reason, (fragment, decline.reason)
    verify_manifest(decline, KEY)
    with pytest.raises(SignatureError):
        verify_manifest(decline, "another-key-" * 4)
    assert read_update(agent, round_id) is None
    assert agent.store.get_bytes(agent.bucket, protocol.update_payload_key("", "fed", round_id)) is None
    assert agent.pending_rounds() == []  # a decline is the silo's answer for the round
    return decline


def with_channel(rows: pd.DataFrame, unknown_every: int) -> pd.DataFrame:
    rows = rows.copy()
    rows["channel"] = np.where(np.arange(len(rows)) % unknown_every == 0, "atm", "web")
    return rows


CHANNEL_CONTRACT = DataContract(CONTRACT.label, (*CONTRACT.features, Column("channel", "categorical",
                                                                            categories=("web", "pos"),
                                                                            max_unknown_share=0.1)), "event_time")


@pytest.mark.parametrize("rows, contract, fragments", [
    pytest.param(silo_rows().drop(columns="Amount"), CONTRACT, ["column 'Amount' missing"], id="missing-column"),
    pytest.param(silo_rows().drop(columns="Class"), CONTRACT, ["column 'Class' missing"], id="missing-label"),
    pytest.param(silo_rows().assign(customer_name="someone"), CONTRACT,
                 ["column 'customer_name' is not in the data contract (allow_extra_columns is false)"],
                 id="extra-column"),
    pytest.param(silo_rows().assign(Amount=lambda f: f["Amount"].round(2).astype(str)), CONTRACT,
                 ["column 'Amount' has type object, expected numeric"], id="wrong-type"),
    pytest.param(silo_rows().assign(Class=lambda f: np.where(f["Class"], 2, 0)), CONTRACT,
                 ["column 'Class' has type int64, expected boolean (true/false or 0/1)"], id="wrong-label-type"),
    pytest.param(silo_rows().assign(event_time=lambda f: np.arange(len(f))), CONTRACT,
                 ["column 'event_time' (event time) has type int64, expected a timestamp"], id="wrong-time-type"),
    pytest.param(with_channel(silo_rows(), 4), CHANNEL_CONTRACT,
                 ["column 'channel' has 25.0% unknown categories (e.g. ['atm']), the contract allows 10.0%"],
                 id="unknown-categories"),
    pytest.param(silo_rows().assign(Amount=lambda f: f["Amount"].where(np.arange(len(f)) % 10 != 0)), CONTRACT,
                 ["column 'Amount' has 80 of 800 values missing (10.0%), the contract allows 0.0%"],
                 id="missing-values"),
])
def test_rows_that_break_the_contract_give_a_signed_decline_naming_it(signed_agent, rows, contract, fragments):
    agent = signed_agent(rows)
    publish(agent.store, agent.bucket, "000001", contract=contract)
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", *fragments)


def test_every_problem_is_named_in_one_decline(signed_agent):
    agent = signed_agent(silo_rows().drop(columns=["Amount", "V3"]).assign(extra=1))
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is False
    reason = assert_declined(agent, "000001", "column 'V3' missing", "column 'Amount' missing",
                             "column 'extra' is not in the data contract").reason
    assert reason.count("; ") == 2


def test_a_decline_reason_gives_no_row_values(signed_agent):
    rows = silo_rows().assign(Amount=lambda f: f["Amount"].map(lambda v: f"EUR {v:.2f}"))
    agent = signed_agent(rows)
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is False
    reason = assert_declined(agent, "000001", "column 'Amount' has type object").reason
    assert "EUR" not in reason  # the reason is public: column names and types, not the silo's data


def test_an_empty_data_window_is_declined_with_the_window(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001",
            window={"start": "2020-01-01T00:00:00+00:00", "end": "2020-01-02T00:00:00+00:00"})
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", "the data window has 0 rows, the contract needs at least 2",
                    "(data window [2020-01-01T00:00:00+00:00, 2020-01-02T00:00:00+00:00))")


def test_a_missing_data_file_is_declined_as_unreadable(signed_agent, tmp_path):
    agent = signed_agent(tmp_path / "gone.parquet")
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", "data source unreadable: data file", "gone.parquet does not exist")


def test_a_corrupt_data_file_is_declined_as_unreadable(signed_agent, tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    agent = signed_agent(path)
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", "data source unreadable: cannot read", "as Parquet")


# --- declines: the installed task is not the round's -------------------------------------------------


def test_another_task_version_is_declined(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001", task=task_of(version="1"))
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", f"task {ENTRYPOINT} version {FraudTask.version} is installed here, the round "
                                     "needs version 1")


def test_params_that_do_not_match_their_hash_are_declined(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001", task=task_of(params_sha256=params_sha256({"hidden": [9]})))
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", "the round's task params do not match their sha256")


def test_params_the_installed_task_does_not_take_are_declined(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001", task=task_of(params={"hidden": [8], "depth": 3}))
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", f"task {ENTRYPOINT} is not usable here", "does not take params ['depth', 'hidden']")
    publish(agent.store, agent.bucket, "000002", task=task_of(params={"hidden": [0]}))
    assert agent.answer("000002") is False
    assert_declined(agent, "000002", "refused its params: hidden must be a list of positive layer widths")


def test_a_task_that_is_not_installed_is_declined(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001", task=task_of(entrypoint="claims_models.task:ClaimsTask"))
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", "task claims_models.task:ClaimsTask is not usable here", "cannot import")


def test_a_global_model_of_other_params_is_declined(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001", state=base_state({"hidden": [8, 4]}))
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", "the global model does not fit the installed task's model")


def test_params_change_between_rounds_is_followed(signed_agent):
    """The installed task is built per round from the round's params: a new architecture in
    the next round trains, it is not a mismatch."""
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is True
    wider = {"hidden": [12]}
    publish(agent.store, agent.bucket, "000002", task=task_of(params=wider), state=base_state(wider))
    assert agent.answer("000002") is True
    assert decode_state(agent.store.get_bytes(agent.bucket, protocol.update_payload_key("", "fed", "000002")))[
        "0.weight"].shape == (12, 30)


def test_a_decline_does_not_stop_the_agent(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001", task=task_of(version="0"))
    publish(agent.store, agent.bucket, "000002")
    assert agent.run(poll_seconds=0.01, max_rounds=1) == 1  # counts updates; the decline came first
    assert read_decline(agent, "000001") is not None and read_update(agent, "000002") is not None


def test_an_unsigned_agent_writes_an_unsigned_decline(agent):
    publish(agent.store, agent.bucket, "000001", task=task_of(version="0"))
    assert agent.answer("000001") is False
    decline = read_decline(agent, "000001")
    assert decline.signature == "" and "version" in decline.reason


def test_a_long_reason_is_cut_to_the_limit(signed_agent):
    extra = pd.DataFrame(0.0, index=range(ROWS), columns=[f"unexpected_column_{i:03d}" for i in range(300)])
    wide = pd.concat([silo_rows(), extra], axis=1)
    agent = signed_agent(wide)
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is False
    decline = assert_declined(agent, "000001", "column 'unexpected_column_000' is not in the data contract")
    assert len(decline.reason) == DeclineManifest.MAX_REASON_CHARS


# --- signing and the command line ----------------------------------------------------------------------


def test_cli_rejects_a_bad_client_id_without_a_traceback(tmp_path, capsys, s3_server):
    data = write_parquet(silo_rows(100), tmp_path / "silo.parquet")
    code = main(["--client-id", "../etc", "--federation", "fed", "--bucket", "s3://b", "--data", str(data),
                 "--endpoint-url", s3_server.endpoint_url])
    assert code == 2
    assert "client id '../etc' must match" in capsys.readouterr().err


def test_cli_rejects_a_data_path_it_cannot_read_without_a_traceback(tmp_path, capsys, s3_server):
    code = main(["--client-id", "bank-a", "--federation", "fed", "--bucket", "s3://b",
                 "--data", str(tmp_path / "silo.npz"), "--endpoint-url", s3_server.endpoint_url])
    assert code == 2
    assert "expected a .parquet or .csv file, or a database URL" in capsys.readouterr().err


def test_a_signing_key_signs_the_committed_manifest(agent):
    signer = replace(agent, signing_key=KEY)
    publish(agent.store, agent.bucket, "000007")
    assert signer.answer("000007") is True
    update = read_update(agent, "000007")
    verify_manifest(update, KEY)
    with pytest.raises(SignatureError):
        verify_manifest(update, "another-key-" * 4)
    # Without a key the manifest goes unsigned, as before.
    publish(agent.store, agent.bucket, "000008")
    assert agent.answer("000008") is True and read_update(agent, "000008").signature == ""


def test_cli_takes_the_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from fl_tasks.silo.agent import read_signing_key

    monkeypatch.delenv("FL_SIGNING_KEY", raising=False)
    assert read_signing_key(None) is None
    monkeypatch.setenv("FL_SIGNING_KEY", "from-the-environment")
    assert read_signing_key(None) == "from-the-environment"
    path = tmp_path / "key"
    path.write_text("from-the-file-0123456789\n")
    assert read_signing_key(str(path)) == "from-the-file-0123456789"  # the file wins, newline stripped
    assert build_parser_flags() >= {"--signing-key-file", "--data", "--sql-table", "--sql-query"}


def build_parser_flags() -> set[str]:
    from fl_tasks.silo.agent import build_parser

    return {opt for action in build_parser()._actions for opt in action.option_strings}


def test_cli_refuses_a_short_key_without_a_traceback(tmp_path, capsys, s3_server, monkeypatch):
    data = write_parquet(silo_rows(100), tmp_path / "silo.parquet")
    monkeypatch.setenv("FL_SIGNING_KEY", "short")
    code = main(["--client-id", "bank-a", "--federation", "fed", "--bucket", "s3://b", "--data", str(data),
                 "--endpoint-url", s3_server.endpoint_url])
    assert code == 2
    assert "at least 16" in capsys.readouterr().err
