"""The silo agent (`fl-client`) against a moto server, reading its rows from a Parquet file: it
answers committed rounds in protocol order, with a trained update, or, when its rows or its
installed task do not fit the round, with a signed decline that names why and no update.

(Was test_client.py: `ClientRuntime` over an in-memory `Table` became `SiloAgent` over a
`DataSource`; the global manifest names the task and the data contract instead of a model
spec; the dropout behaviour moved to the simulator's AttackingAgent, tested in
tests/fl_tasks/simulation/test_attacks.py.)
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fl_tasks import protocol
from fl_tasks.contract import Column, DataContract
from fl_tasks.protocol import DeclineManifest, GlobalManifest, UpdateManifest, sha256_hex
from fl_tasks.protocol.codec import Codec, Packing, decode_state, decode_update, encode_state, encode_update
from fl_tasks.protocol.drift import DriftReport, DriftSettings
from fl_tasks.protocol.signing import SignatureError, verify_manifest
from fl_tasks.protocol.storage import ObjectStore
from fl_tasks.silo.agent import SiloAgent, main
from fl_tasks.silo.sources import FileSource
from fl_tasks.simulation.datasets import shift_rows, synthetic_fraud_frame
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
            contract: DataContract | None = None, state=None, drift: dict | None = None,
            codec: str = "fp32") -> GlobalManifest:
    """Commit round `round_id` in `bucket` as the coordinator would: payload first, manifest last."""
    payload = encode_state(state if state is not None else base_state())
    manifest = GlobalManifest(
        federation="fed", round_id=round_id, model_name="m", model_version="seed",
        task=task or task_of(), contract=(contract or CONTRACT).as_dict(),
        payload_sha256=sha256_hex(payload), payload_bytes=len(payload),
        training={"local_epochs": 1, "learning_rate": 0.01, "batch_size": 64, "proximal_mu": 0.0, "codec": codec},
        data_window=window or {"start": None, "end": None},
        deadline=(deadline or datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat(),
        created_at=datetime.now(timezone.utc).isoformat(), drift=drift or {},
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


# --- compressed updates ------------------------------------------------------------------------------

class FixedChangeAgent(SiloAgent):
    """Sends base + the change given for each round (the production agent sends what it
    trained), so that what a topk update leaves out is known."""

    changes: dict[str, dict[str, np.ndarray]] = {}

    def reported_state(self, trained, base, round_id):
        change = self.changes[round_id]
        return {name: base[name] + change[name] if name in change else trained[name] for name in trained}


def test_a_topk_silos_second_update_carries_the_residual_of_its_first(store, tmp_path):
    codec = Codec.parse("topk:0.05")
    base = base_state()
    packed = Packing(base, TASK.tensor_ranges).names  # compressed; the variances travel exactly
    rng = np.random.default_rng(3)
    changes = {r: {n: rng.normal(0, 0.01, base[n].shape).astype(np.float32) for n in packed}
               for r in ("000001", "000002")}
    agent = FixedChangeAgent("bank-a", "fed", f"s3://{new_bucket(store)}",
                             FileSource(write_parquet(silo_rows(), tmp_path / "silo.parquet")), store,
                             state_dir=tmp_path / "state")
    agent.changes = changes

    def sent(round_id):
        update = read_update(agent, round_id)
        assert update.codec == "topk:0.05"
        payload = agent.store.get_bytes(agent.bucket, protocol.update_payload_key("", "fed", round_id))
        decoded = decode_update(payload, codec, base, TASK.tensor_ranges)
        return {n: decoded[n].astype(np.float64) - base[n] for n in packed}

    def topk_of(change, residual=None):
        state = {**base, **{n: base[n] + change[n] for n in packed}}
        payload = encode_update(state, base, codec, residual, TASK.tensor_ranges).payload
        decoded = decode_update(payload, codec, base, TASK.tensor_ranges)
        return {n: decoded[n].astype(np.float64) - base[n] for n in packed}

    for round_id in ("000001", "000002"):
        publish(agent.store, agent.bucket, round_id, codec="topk:0.05")
        assert agent.answer(round_id) is True
    first, second = sent("000001"), sent("000002")
    # What round 1 did not send is what the silo keeps: the change less what went out.
    residual = {n: (changes["000001"][n] - first[n]).astype(np.float32) for n in packed}
    expected, alone = topk_of(changes["000002"], residual), topk_of(changes["000002"])
    for n in packed:
        np.testing.assert_allclose(second[n], expected[n], atol=1e-6, err_msg=n)
    assert any(not np.allclose(second[n], alone[n], atol=1e-6) for n in packed)
    # Nothing is lost over the two rounds: sent + still held back == the two changes.
    kept = json.loads((tmp_path / "state" / "fed" / "residual" / "residual.json").read_text())
    assert kept["round_id"] == "000002" and kept["codec"] == "topk:0.05"
    held = agent.residuals().load(codec, base, TASK.tensor_ranges)
    for n in packed:
        np.testing.assert_allclose(first[n] + second[n] + held[n], changes["000001"][n] + changes["000002"][n],
                                   atol=1e-6, err_msg=n)


@pytest.mark.parametrize("codec", ["fp16", "int8:channel"])
def test_an_update_in_a_compressed_codec_decodes_against_the_base(agent, codec):
    publish(agent.store, agent.bucket, "000001", codec=codec)
    assert agent.answer("000001") is True
    update = read_update(agent, "000001")
    payload = agent.store.get_bytes(agent.bucket, protocol.update_payload_key("", "fed", "000001"))
    assert update.codec == codec and update.payload_bytes == len(payload)
    assert len(payload) < len(encode_state(base_state())) / 1.9
    state = decode_update(payload, codec, base_state(), TASK.tensor_ranges)
    assert any(not (state[k] == v).all() for k, v in base_state().items())  # it trained, and it shows


def test_a_round_in_a_codec_this_silo_does_not_know_is_declined(signed_agent):
    agent = signed_agent(silo_rows())
    publish(agent.store, agent.bucket, "000001", codec="int4")
    assert agent.answer("000001") is False
    assert_declined(agent, "000001", "this silo cannot send the round's training.codec: unknown codec 'int4'")


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


def test_cli_takes_the_state_dir_from_the_flag_or_the_environment(tmp_path, monkeypatch, s3_server):
    from fl_tasks.silo.agent import agent_from_args, build_parser

    data = write_parquet(silo_rows(100), tmp_path / "silo.parquet")
    argv = ["--client-id", "bank-a", "--federation", "fed", "--bucket", "s3://bank-a", "--data", str(data),
            "--endpoint-url", s3_server.endpoint_url]
    assert "--state-dir" in build_parser_flags()
    agent = agent_from_args(build_parser().parse_args([*argv, "--state-dir", str(tmp_path / "state")]))
    assert agent.state_dir == tmp_path / "state"
    monkeypatch.setenv("FL_CLIENT_STATE_DIR", str(tmp_path / "from-env"))
    assert agent_from_args(build_parser().parse_args(argv)).state_dir == tmp_path / "from-env"
    monkeypatch.delenv("FL_CLIENT_STATE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert agent_from_args(build_parser().parse_args(argv)).state_dir == tmp_path / "home" / ".fl-client" / "bank-a"


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


# --- drift at the silo: scores in the update, rows and reports at the silo -----------------------------

DRIFT_COLUMNS = [*COMPONENTS, "Amount"]
SHIFTED = ["Amount", "V1", "V2", "V3", "V4", "V5"]
DAY_1 = {"start": "2013-09-01T00:00:00+00:00", "end": "2013-09-02T00:00:00+00:00"}  # synthetic rows span two days
DAY_2 = {"start": "2013-09-02T00:00:00+00:00", "end": None}


def drift_settings(reference: str = "first", window: dict | None = None, **changes) -> dict:
    """The drift block of a global manifest, over the contract's features."""
    return replace(DriftSettings(reference, window or {}, tuple(DRIFT_COLUMNS)), **changes).as_dict()


@pytest.fixture
def drift_agent(store, tmp_path):
    """make(rows) -> an agent over `rows` with its state directory in tmp_path; `use(agent,
    rows)` points it at other rows (the silo's data changed between rounds)."""

    def make(rows: pd.DataFrame) -> SiloAgent:
        return SiloAgent("bank-a", "fed", f"s3://{new_bucket(store, 'drift-test')}", FileSource(parquet(rows)), store,
                         state_dir=tmp_path / "state")

    def parquet(rows: pd.DataFrame) -> Path:
        return write_parquet(rows, tmp_path / f"rows-{datetime.now():%H%M%S%f}.parquet")

    make.use = lambda agent, rows: setattr(agent, "source", FileSource(parquet(rows)))
    return make


def answer_drift(agent, round_id: str, settings: dict, window: dict | None = None) -> dict:
    """Publish a round asking for drift, answer it; the drift block of the committed update."""
    publish(agent.store, agent.bucket, round_id, drift=settings, window=window)
    assert agent.answer(round_id) is True
    return read_update(agent, round_id).drift


def drifted(block: dict) -> list[str]:
    return sorted(name for name, column in DriftReport.from_dict(block).columns.items() if column.drifted)


def report_path(agent, round_id: str) -> Path:
    return agent.state_dir / "fed" / "drift" / f"{round_id}.html"


def assert_scores_only(agent, round_id: str, rows: pd.DataFrame) -> None:
    """The update manifest carries scores, and no value of the silo's rows; the bucket holds
    nothing of the silo but its update (no report, no reference window)."""
    body = json.loads(agent.store.get_bytes(agent.bucket, protocol.update_manifest_key("", "fed", round_id)))
    drift = body["drift"]
    assert set(drift) == {"reference", "reference_rows", "current_rows", "drifted_share", "dataset_drifted", "columns"}
    for name, column in drift["columns"].items():
        assert set(column) == {"score", "drifted", "method"}, name

    def numbers(value):
        if isinstance(value, dict):
            return [n for v in value.values() for n in numbers(v)]
        if isinstance(value, list):
            return [n for v in value for n in numbers(v)]
        return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []

    # One score per column, two row counts, one share: and none of them is a value of the rows.
    assert len(numbers(drift)) == len(drift["columns"]) + 3
    leaked = set(numbers(body)) & set(rows[DRIFT_COLUMNS].to_numpy(dtype=float).ravel().tolist())
    assert not leaked
    for key in agent.store.list_keys(agent.bucket, ""):
        assert key.rsplit("/", 1)[-1] in {"model.safetensors", "manifest.json", "update.safetensors"}, key


def test_drift_against_the_first_window(drift_agent, capsys):
    rows = silo_rows()
    agent = drift_agent(rows)
    settings = drift_settings("first", drift_share=0.2)
    # Round 1: no reference yet. Its window becomes the first reference; no scores are sent.
    assert answer_drift(agent, "000001", settings) == {}
    references = agent.state_dir / "fed" / "drift" / "references"
    record = json.loads((references / "first.json").read_text())
    assert (record["round_id"], record["rows"], record["columns"]) == ("000001", ROWS, DRIFT_COLUMNS)
    assert not report_path(agent, "000001").exists()
    # Round 2, the same rows: scored against round 1, nothing drifted.
    block = answer_drift(agent, "000002", settings)
    report = DriftReport.from_dict(block)
    assert report.reference == f"first window (round 000001, {ROWS} rows)"
    assert (report.reference_rows, report.current_rows) == (ROWS, ROWS)
    assert drifted(block) == [] and report.dataset_drifted is False and set(report.columns) == set(DRIFT_COLUMNS)
    # Round 3, the silo's data shifted: exactly those columns drifted, still against round 1.
    shifted = shift_rows(rows, SHIFTED, scale=3.0, offset=2.0)
    drift_agent.use(agent, shifted)
    block = answer_drift(agent, "000003", settings)
    report = DriftReport.from_dict(block)
    assert drifted(block) == sorted(SHIFTED) and report.drifted_share == pytest.approx(6 / 29)
    assert report.dataset_drifted is True  # 6 of 29 columns reach drift_share 0.2
    assert report.reference == f"first window (round 000001, {ROWS} rows)"
    for round_id in ("000002", "000003"):
        assert report_path(agent, round_id).stat().st_size > 10_000  # evidently's HTML, at the silo only
    assert_scores_only(agent, "000003", shifted)
    assert_scores_only(agent, "000002", rows)
    out = capsys.readouterr().out
    assert (f"round 000003: drift against the first window (round 000001, {ROWS} rows): 21% of 29 columns drifted "
            f"(Amount, V1, V2, V3, V4, V5), the data drifted; report in {report_path(agent, '000003')}") in out
    # Round 1 run again: its own window is no reference, and the first reference is not taken again.
    assert answer_drift(agent, "000001", settings) == {}
    assert json.loads((references / "first.json").read_text()) == record


def test_drift_against_the_previous_window(drift_agent):
    rows = silo_rows()
    agent = drift_agent(rows)
    settings = drift_settings("previous", drift_share=0.2)
    assert answer_drift(agent, "000001", settings) == {}
    drift_agent.use(agent, shift_rows(rows, SHIFTED, scale=3.0, offset=2.0))
    block = answer_drift(agent, "000002", settings)
    assert DriftReport.from_dict(block).reference == f"previous window (round 000001, {ROWS} rows)"
    assert drifted(block) == sorted(SHIFTED) and block["dataset_drifted"] is True
    # Round 3 on the same shifted rows: the previous window is round 2's, so nothing drifted.
    block = answer_drift(agent, "000003", settings)
    assert DriftReport.from_dict(block).reference == f"previous window (round 000002, {ROWS} rows)"
    assert drifted(block) == [] and block["dataset_drifted"] is False
    # Round 3 run again compares with round 2, not with itself.
    block = answer_drift(agent, "000003", settings)
    assert DriftReport.from_dict(block).reference == f"previous window (round 000002, {ROWS} rows)"


def test_drift_against_a_fixed_window_read_from_the_source(drift_agent):
    rows = silo_rows()
    times = rows["event_time"]
    day_1, day_2 = times < pd.Timestamp(DAY_2["start"]), times >= pd.Timestamp(DAY_2["start"])
    agent = drift_agent(rows)
    settings = drift_settings("fixed", DAY_1, drift_share=0.5)
    # A fixed reference needs no earlier round: round 1 is scored already.
    block = answer_drift(agent, "000001", settings, window=DAY_2)
    report = DriftReport.from_dict(block)
    assert report.reference == f"fixed window {DAY_1['start']}..{DAY_1['end']}"
    assert (report.reference_rows, report.current_rows) == (int(day_1.sum()), int(day_2.sum()))
    assert report.dataset_drifted is False  # two days of the same distribution
    # The second day's rows shift; the first day, read again from the source, is the reference still.
    shifted = pd.concat([rows[day_1], shift_rows(rows[day_2], SHIFTED, scale=3.0, offset=2.0)], ignore_index=True)
    drift_agent.use(agent, shifted)
    block = answer_drift(agent, "000002", replace_settings(settings, drift_share=0.2), window=DAY_2)
    assert set(SHIFTED) <= set(drifted(block)) and block["dataset_drifted"] is True
    assert block["reference_rows"] == int(day_1.sum())
    assert report_path(agent, "000002").exists()


def replace_settings(settings: dict, **changes) -> dict:
    return {**settings, **changes}


def test_an_evidently_failure_sends_no_scores_and_the_update_still_goes(drift_agent, capsys):
    """The fixed reference window holds no Amount at all (the round's own window is clean and
    fits the contract): evidently cannot compare, the silo logs why and trains anyway."""
    rows = silo_rows()
    rows.loc[rows["event_time"] < pd.Timestamp(DAY_2["start"]), "Amount"] = np.nan
    agent = drift_agent(rows)
    block = answer_drift(agent, "000001", drift_settings("fixed", DAY_1), window=DAY_2)
    assert block == {}
    update = read_update(agent, "000001")
    assert update.num_examples == int((rows["event_time"] >= pd.Timestamp(DAY_2["start"])).sum())
    assert not report_path(agent, "000001").exists()
    out = capsys.readouterr().out
    assert ("round 000001: drift not measured, no scores sent: DriftError: evidently could not compare the "
            "windows") in out
    assert "empty column 'Amount'" in out
    assert "round 000001: update committed" in out


def test_a_round_without_drift_settings_keeps_no_state(agent, tmp_path):
    agent = replace(agent, state_dir=tmp_path / "state")
    publish(agent.store, agent.bucket, "000001")
    assert agent.answer("000001") is True
    assert read_update(agent, "000001").drift == {}
    assert not (tmp_path / "state").exists()


# --- evaluation requests, with and without personalization ---------------------------------------------


def publish_evaluation(agent, round_id: str, states: dict[str, dict], personalization: dict | None = None):
    """Commit an evaluation request for `states` (label -> weights): payloads first, request last."""
    from fl_tasks.protocol import EvaluationRequest

    models = {}
    for label, state in states.items():
        payload = encode_state(state)
        agent.store.put_bytes(agent.bucket, protocol.evaluation_model_key("", "fed", round_id, label), payload)
        models[label] = {"version": label, "sha256": sha256_hex(payload), "bytes": len(payload)}
    request = EvaluationRequest(
        federation="fed", round_id=round_id, model_name="m", models=models, task=task_of(), contract=CONTRACT.as_dict(),
        holdout_fraction=0.25, data_window={"start": None, "end": None},
        deadline=(datetime.now(timezone.utc) + timedelta(minutes=5)).isoformat(),
        created_at=datetime.now(timezone.utc).isoformat(), personalization=personalization or {})
    agent.store.put_bytes(agent.bucket, protocol.evaluation_request_key("", "fed", round_id), request.to_json())


def read_evaluation(agent, round_id):
    from fl_tasks.protocol import EvaluationManifest

    return EvaluationManifest.from_json(agent.store.get_bytes(agent.bucket, protocol.evaluation_result_key(
        "", "fed", round_id)))


FINETUNE = {"strategy": "finetune", "layers": "all", "epochs": 1, "learning_rate": 0.01, "batch_size": 64,
            "ditto_lambda": 0.1, "local_only": False, "share_weights": False, "local_tensors": []}


def test_an_evaluation_without_personalization_sends_no_personal_block(agent, tmp_path):
    agent = replace(agent, state_dir=tmp_path / "state")
    publish_evaluation(agent, "000001", {"candidate": base_state()})
    assert agent.evaluate("000001") is True
    evaluation = read_evaluation(agent, "000001")
    assert set(evaluation.scores) == {"candidate"} and evaluation.personal == {}
    assert not (tmp_path / "state").exists()


def test_a_personalization_failure_still_sends_the_global_scores(agent, tmp_path, monkeypatch, capsys):
    from fl_tasks.silo.personal import SiloPersonalization

    def broken(*args, **kwargs):
        raise RuntimeError("the personal model's disk is on fire")

    monkeypatch.setattr(SiloPersonalization, "evaluate", broken)
    agent = replace(agent, state_dir=tmp_path / "state")
    publish_evaluation(agent, "000001", {"candidate": base_state()}, FINETUNE)
    assert agent.evaluate("000001") is True
    evaluation = read_evaluation(agent, "000001")
    assert set(evaluation.scores) == {"candidate"} and evaluation.personal == {}
    assert ("round 000001: personalization (finetune) failed, no personal scores sent: RuntimeError: the personal "
            "model's disk is on fire") in capsys.readouterr().out


def test_a_failing_personal_model_does_not_stop_the_update(agent, tmp_path, monkeypatch, capsys):
    from fl_tasks.silo import personal

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(personal, "ditto_step", broken)
    agent = replace(agent, state_dir=tmp_path / "state")
    manifest = publish(agent.store, agent.bucket, "000001")
    raw = replace(manifest, personalization={**FINETUNE, "strategy": "ditto", "local_only": True}).to_json()
    agent.store.put_bytes(agent.bucket, protocol.global_manifest_key("", "fed", "000001"), raw)
    assert agent.answer("000001") is True
    assert read_update(agent, "000001") is not None
    out = capsys.readouterr().out
    assert ("round 000001: personalization: could not train the Ditto personal model: RuntimeError: out of "
            "memory") in out
    assert (tmp_path / "state" / "fed" / "personal" / "local_only.json").exists()  # the next step still ran
