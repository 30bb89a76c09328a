"""Simulated silo behaviours, for demos, tests and the robustness benchmark.

Honest silos train and report. The others model what a production federation must survive:
silos that never answer or answer late, Byzantine silos that send poisoned models, and silos
that lie about (or never send) their evaluation of a candidate.
`AttackingAgent` wraps the honest agent (fl_tasks.silo.agent), overriding only what it
trains on and what it reports; the production `fl-client` has no such branches. Attacks act
on the floating tensors of `update - base`; integer buffers are left alone.

    python -m fl_tasks.simulation.attacks --behaviour sign_flip <fl-client arguments>
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from fl_tasks.silo.agent import SiloAgent, agent_from_args, build_parser, serve

if TYPE_CHECKING:
    import pandas as pd

    from fl_tasks.contract import DataContract

HONEST, DROPOUT, STRAGGLER = "honest", "dropout", "straggler"
SIGN_FLIP, SCALED, NOISE, COLLUDING, LABEL_FLIP = "sign_flip", "scaled", "noise", "colluding", "label_flip"
INFLATED_EVAL, SANDBAGGED_EVAL, NO_EVAL = "inflated_eval", "sandbagged_eval", "no_eval"
BEHAVIOURS = (HONEST, DROPOUT, STRAGGLER, SIGN_FLIP, SCALED, NOISE, COLLUDING, LABEL_FLIP, INFLATED_EVAL,
              SANDBAGGED_EVAL, NO_EVAL)
MODEL_ATTACKS = (SIGN_FLIP, SCALED, NOISE, COLLUDING)
EVALUATION_ATTACKS = (INFLATED_EVAL, SANDBAGGED_EVAL, NO_EVAL)


def lie_about_scores(behaviour: str, scores: Mapping[str, Mapping[str, float]], metrics) -> dict[str, dict[str, float]]:
    """The candidate's scores a lying silo reports: inflated_eval, the best value each metric's
    range allows (or 1.0 above the measured value when unbounded); sandbagged_eval, the worst
    (or 1.0 below). Every other model's scores stay as measured."""
    out = {label: dict(values) for label, values in scores.items()}
    if behaviour not in (INFLATED_EVAL, SANDBAGGED_EVAL) or "candidate" not in out:
        return out
    for metric in metrics:
        if metric.name not in out["candidate"]:
            continue
        better = (behaviour == INFLATED_EVAL) == metric.higher_is_better
        bound = metric.high if better else metric.low
        value = out["candidate"][metric.name]
        out["candidate"][metric.name] = float(bound) if np.isfinite(bound) else value + (1.0 if better else -1.0)
    return out


def poison_data(behaviour: str, rows: "pd.DataFrame", contract: "DataContract") -> "pd.DataFrame":
    """Label-flip data poisoning: the silo trains on inverted labels (boolean labels: negated;
    categorical: each class moved to the next one)."""
    if behaviour != LABEL_FLIP:
        return rows
    rows = rows.copy()
    label = contract.label
    if label.type == "categorical":
        shift = {c: label.categories[(i + 1) % len(label.categories)] for i, c in enumerate(label.categories)}
        rows[label.name] = rows[label.name].map(shift)
    else:
        rows[label.name] = ~rows[label.name].astype(bool)
    return rows


def poison_model(behaviour: str, trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                 scale: float, round_id: str) -> dict[str, np.ndarray]:
    """The model a Byzantine silo reports instead of `trained`.

    sign_flip: base - scale * delta; scaled: base + scale * delta; noise: trained + N(0, scale);
    colluding: base + the same N(0, scale) draw for every colluder of the round (seeded by the
    round id), so their updates are identical.
    """
    if behaviour not in MODEL_ATTACKS:
        return dict(trained)
    shared = np.random.default_rng(zlib.crc32(round_id.encode()))
    private = np.random.default_rng()
    out = {}
    for name in sorted(trained):
        value, origin = trained[name], base[name]
        if not np.issubdtype(value.dtype, np.floating):
            out[name] = value
            continue
        delta = value.astype(np.float64) - origin
        if behaviour == SIGN_FLIP:
            poisoned = origin - scale * delta
        elif behaviour == SCALED:
            poisoned = origin + scale * delta
        elif behaviour == NOISE:
            poisoned = value + private.normal(0.0, scale, value.shape)
        else:
            poisoned = origin + shared.normal(0.0, scale, value.shape)
        out[name] = poisoned.astype(value.dtype)
    return out


class AttackingAgent(SiloAgent):
    """The honest agent with one simulated behaviour."""

    def __init__(self, *args, behaviour: str = HONEST, attack_scale: float = 10.0, delay_seconds: float = 0.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour {behaviour!r} must be one of {', '.join(BEHAVIOURS)}")
        self.behaviour, self.attack_scale, self.delay_seconds = behaviour, attack_scale, delay_seconds

    def answer(self, round_id: str) -> bool:
        if self.behaviour == DROPOUT:
            self.answered.add(round_id)
            self.log(f"round {round_id}: dropping out (simulated)")
            return False
        if self.behaviour == STRAGGLER and self.delay_seconds > 0:
            self.log(f"round {round_id}: straggling for {self.delay_seconds:.0f}s (simulated)")
            time.sleep(self.delay_seconds)
        return super().answer(round_id)

    def evaluate(self, round_id: str) -> bool:
        if self.behaviour == NO_EVAL:
            self.evaluated.add(round_id)
            self.log(f"round {round_id}: not evaluating (simulated)")
            return False
        return super().evaluate(round_id)

    def reported_evaluation(self, manifest, task):
        if self.behaviour != INFLATED_EVAL and self.behaviour != SANDBAGGED_EVAL:
            return manifest
        # A liar also claims a large evaluation share, to weigh heavily in an example-weighted mean.
        grow = 1000 if self.behaviour == INFLATED_EVAL else 1
        return dataclasses.replace(manifest, scores=lie_about_scores(self.behaviour, manifest.scores, task.metrics),
                                   num_examples=manifest.num_examples * grow, rows_held=manifest.rows_held * grow)

    def train_rows(self, rows, contract):
        return poison_data(self.behaviour, rows, contract)

    def reported_state(self, trained, base, round_id):
        return poison_model(self.behaviour, trained, base, self.attack_scale, round_id)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.prog = "fl-simulate-silo"
    parser.add_argument("--behaviour", choices=BEHAVIOURS, default=HONEST, help="simulated behaviour")
    parser.add_argument("--attack-scale", type=float, default=10.0,
                        help="k of sign_flip/scaled, noise std of noise/colluding")
    parser.add_argument("--delay-seconds", type=float, default=0.0, help="straggler delay")
    args = parser.parse_args(argv)
    try:
        agent = agent_from_args(args, AttackingAgent, behaviour=args.behaviour, attack_scale=args.attack_scale,
                                delay_seconds=args.delay_seconds)
    except (OSError, ValueError, KeyError) as exc:
        print(f"fl-simulate-silo: {exc}", file=sys.stderr)
        return 2
    return serve(agent, args)


if __name__ == "__main__":
    sys.exit(main())
