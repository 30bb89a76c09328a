"""Simulated Byzantine behaviours transform updates exactly as documented."""

from __future__ import annotations

import numpy as np

from fl_tasks.simulation.attacks import (COLLUDING, HONEST, LABEL_FLIP, NOISE, SCALED, SIGN_FLIP, poison_data,
                                 poison_model)
from fl_tasks.simulation.datasets import make_synthetic

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
    table = make_synthetic(300, seed=1)
    flipped = poison_data(LABEL_FLIP, table)
    np.testing.assert_array_equal(flipped.y, 1 - table.y)
    assert poison_data(HONEST, table) is table
