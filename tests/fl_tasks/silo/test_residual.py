"""fl_tasks/silo/residual.py: error feedback keeps what a topk update did not send, at the silo,
across rounds and agent restarts, and starts again from zero when it no longer fits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fl_tasks.protocol.codec import Codec, decode_update, encode_update
from fl_tasks.silo.residual import ResidualStore, residual_folder

TOPK = Codec.parse("topk:0.05")


def base_of(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal((20, 10)).astype(np.float32), "b": rng.standard_normal(20).astype(np.float32),
            "n": np.array(3, np.int64)}


def flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(state[n], np.float64).reshape(-1) for n in ("b", "w")])  # the packed order


def test_error_feedback_telescopes_over_rounds():
    """sent_r + residual_r = change_r + residual_(r-1): over the rounds, everything sent plus
    what is still held back is exactly the sum of the changes."""
    rng = np.random.default_rng(1)
    residual, sent, changes = None, np.zeros(220), np.zeros(220)
    for number in range(6):
        base = base_of(number)  # every round starts from a new global model
        change = {"w": rng.normal(0, 0.01, (20, 10)).astype(np.float32),
                  "b": rng.normal(0, 0.01, 20).astype(np.float32)}
        state = {"w": base["w"] + change["w"], "b": base["b"] + change["b"], "n": base["n"] + 1}
        encoded = encode_update(state, base, TOPK, residual)
        decoded = decode_update(encoded.payload, TOPK, base)
        sent += flat({"w": decoded["w"].astype(np.float64) - base["w"], "b": decoded["b"].astype(np.float64) - base["b"]})
        changes += flat({"w": state["w"].astype(np.float64) - base["w"], "b": state["b"].astype(np.float64) - base["b"]})
        residual = encoded.residual
        assert set(residual) == {"w", "b"} and residual["w"].dtype == np.float32
        assert np.count_nonzero(flat(residual)) == 220 - TOPK.k(220)
    np.testing.assert_allclose(sent + flat(residual), changes, rtol=0, atol=1e-6)


def test_a_change_too_small_for_one_round_is_sent_once_it_has_built_up():
    """A steady small change on one weight, under larger noisy ones elsewhere: without the
    residual it is never among the top k; with it, it gets through."""
    rng = np.random.default_rng(2)
    base = {"w": np.zeros(100, np.float32)}
    with_feedback, without, residual = 0.0, 0.0, None
    for _ in range(40):
        change = rng.normal(0, 0.05, 100).astype(np.float32)
        change[7] = 0.01  # the steady one
        encoded = encode_update({"w": change}, base, "topk:0.05", residual)
        residual = encoded.residual
        with_feedback += decode_update(encoded.payload, "topk:0.05", base)["w"][7]
        without += decode_update(encode_update({"w": change}, base, "topk:0.05").payload, "topk:0.05", base)["w"][7]
    assert without == 0.0
    assert with_feedback + residual["w"][7] == pytest.approx(0.4, rel=1e-5) and with_feedback > 0.2


def test_residual_persists_across_store_instances(tmp_path):
    base = base_of()
    residual = {"w": np.full((20, 10), 0.5, np.float32), "b": np.arange(20, dtype=np.float32)}
    ResidualStore(tmp_path / "r").save(TOPK, residual, "000001")
    loaded = ResidualStore(tmp_path / "r").load(TOPK, base)  # another agent process, same state directory
    assert set(loaded) == {"w", "b"}
    for name, value in residual.items():
        np.testing.assert_array_equal(loaded[name], value)
    record = json.loads((tmp_path / "r" / "residual.json").read_text())
    assert record["codec"] == "topk:0.05" and record["size"] == 220 and record["round_id"] == "000001"
    assert not list((tmp_path / "r").glob(".*tmp"))  # the temporary files were renamed into place


def test_no_residual_yet_is_a_fresh_start(tmp_path):
    lines = []
    assert ResidualStore(tmp_path / "none", lines.append).load(TOPK, base_of()) is None
    assert lines == []


def _saved(tmp_path, lines):
    store = ResidualStore(tmp_path / "r", lines.append)
    store.save(TOPK, {"w": np.ones((20, 10), np.float32), "b": np.ones(20, np.float32)}, "000001")
    return store


def test_reset_when_the_codec_changes(tmp_path):
    lines = []
    store = _saved(tmp_path, lines)
    assert store.load(Codec.parse("topk:0.1"), base_of()) is None
    assert "kept for codec topk:0.05, this round's is topk:0.1; starting again from zero" in lines[-1]


def test_reset_when_the_model_size_changes(tmp_path):
    lines = []
    store = _saved(tmp_path, lines)
    bigger = {**base_of(), "b": np.zeros(21, np.float32)}
    assert store.load(TOPK, bigger) is None
    assert "kept for a model of 220 parameters, this round's has 221; starting again from zero" in lines[-1]


def test_reset_when_the_tensors_no_longer_match_the_model(tmp_path):
    lines = []
    store = _saved(tmp_path, lines)
    renamed = {"v": np.zeros((20, 10), np.float32), "b": np.zeros(20, np.float32)}  # same size, other names
    assert store.load(TOPK, renamed) is None
    assert "its tensors do not match the model's floating tensors" in lines[-1]


def test_reset_when_the_files_do_not_belong_together(tmp_path):
    lines = []
    store = _saved(tmp_path, lines)
    store.kept.tensors.write_bytes(store.kept.tensors.read_bytes()[:-4] + b"\x00\x00\x80\x7f")  # last value: +inf
    assert store.load(TOPK, base_of()) is None
    assert "does not match the sha256" in lines[-1]
    store.kept.record.write_text("{not json")
    assert store.load(TOPK, base_of()) is None
    assert "cannot be read" in lines[-1]


def test_a_failed_save_leaves_no_stale_residual(tmp_path, monkeypatch):
    """The old record goes before the new tensors are written: a save that fails midway must
    not let the next round add a residual whose changes were already sent."""
    lines = []
    store = _saved(tmp_path, lines)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fl_tasks.silo.kept.write_atomically", full_disk)
    with pytest.raises(OSError):
        store.save(TOPK, {"w": np.zeros((20, 10), np.float32), "b": np.zeros(20, np.float32)}, "000002")
    monkeypatch.undo()
    assert store.load(TOPK, base_of()) is None


def test_residual_folder_is_per_federation(tmp_path):
    assert residual_folder(tmp_path, "banks") == tmp_path / "banks" / "residual"
