"""Differential privacy on the real fraud data: the primary metric against epsilon.

DP-FedAvg (fl_tasks.aggregation.private, the code a private round runs) for several noise
multipliers z, on federations of 5 and of 50 silos (the creditcard split of the robustness
benchmark: Dirichlet label skew), ten rounds of one local epoch, every silo in every round
(q = 1). Epsilon at delta 1e-5 comes from fl_tasks.coordinator.privacy (dp-accounting's RDP
accountant) for the ten rounds. Two baselines per silo count: plain example-weighted FedAvg,
and DP-FedAvg with z = 0 (clipping and equal weights, no noise). The clip norm C of a
federation is the median update norm of its silos' first round, measured before the runs,
as a team would pick it from a pilot. Prints JSON with the medians over the seeds and the
machine; rounds run in-process, two runs at a time.

    .venv/bin/python benchmarks/privacy.py [--silos 5,50] [--noise 0,0.5,1,2,4] [--repeats 3]
        [--update benchmarks/results-privacy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DELTA = 1e-5
PLAIN = "fedavg"  # the non-private baseline's label in the table


def federation(silos: int):
    """(spec, task, [rows of each silo], test rows) of the real-data split."""
    from fl_tasks.config import load_federation
    from fl_tasks.simulation.datasets import benchmark_split

    spec = load_federation(REPO / "federations" / "banks.yaml")
    task = spec.load_task()
    split = benchmark_split(spec, task, silos)
    return spec, task, split.silos, split.test


def train_round(task, spec, base, tables, epochs: int, lr: float, seed: int, number: int):
    from fl_tasks.tasks.api import TrainingSettings, load_model_state, model_state

    updates = []
    for index, table in enumerate(tables):
        local = load_model_state(task.build_model(), base)
        task.train(local, table, TrainingSettings(epochs, lr, spec.training.batch_size,
                                                  seed=seed * 100_000 + number * 1000 + index), local.state_dict())
        updates.append((model_state(local), len(table)))
    return updates


def clip_norm_for(silos: int, epochs: int, lr: float) -> float:
    """The median norm of the silos' first-round updates from the seeded model."""
    import torch

    from fl_tasks.coordinator import screening
    from fl_tasks.tasks.api import model_state

    torch.set_num_threads(1)
    spec, task, tables, _ = federation(silos)
    base = model_state(task.seeded_model(spec.task.seed))
    return statistics.median(screening.update_norm(state, base)
                             for state, _ in train_round(task, spec, base, tables, epochs, lr, 0, 0))


def run(silos: int, noise: float | None, clip_norm: float, rounds: int, epochs: int, lr: float, seed: int) -> dict:
    """One federation trained `rounds` rounds; noise None: plain FedAvg."""
    import torch

    from fl_tasks.aggregation import build
    from fl_tasks.aggregation.private import DPFedAvg
    from fl_tasks.coordinator.privacy import PrivacyEvent, epsilon
    from fl_tasks.tasks.api import load_model_state, model_state

    torch.set_num_threads(1)
    spec, task, tables, test = federation(silos)
    model = task.seeded_model(spec.task.seed)
    started = time.perf_counter()
    for number in range(rounds):
        base = model_state(model)
        updates = train_round(task, spec, base, tables, epochs, lr, seed, number)
        if noise is None:
            aggregator = build("fedavg")
        else:
            aggregator = DPFedAvg(build("fedavg"), clip_norm, float(silos), noise * clip_norm,
                                  seed=seed * 1000 + number, ranges=task.tensor_ranges)
        model = load_model_state(task.build_model(), aggregator.aggregate(base, iter(updates)))
    metrics = task.evaluate(model, test)
    spent = None
    if noise:
        spent = epsilon([PrivacyEvent(f"{i:06d}", noise, "all", silos) for i in range(rounds)], DELTA)
    return {"silos": silos, "noise_multiplier": noise, "seed": seed, "epsilon": spent,
            "roc_auc": metrics["roc_auc"], "pr_auc": metrics["pr_auc"], "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silos", default="5,50")
    parser.add_argument("--noise", default="0,0.5,1,2,4", help="noise multipliers z (0: clipping only)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--update", type=Path, help="write the results to this file too")
    args = parser.parse_args()
    from fl_tasks.simulation.datasets import creditcard_frame

    creditcard_frame()  # fetched and cached once, before the workers start
    counts = [int(s) for s in args.silos.split(",")]
    noises = [float(z) for z in args.noise.split(",")]
    clip = {n: clip_norm_for(n, args.epochs, args.learning_rate) for n in counts}
    print(json.dumps({"clip_norms": clip}), file=sys.stderr)
    jobs = [(n, z, clip[n], args.rounds, args.epochs, args.learning_rate, seed)
            for n in counts for z in [None, *noises] for seed in range(args.repeats)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, *zip(*jobs)))
    tables = {}
    for n in counts:
        rows = []
        for z in [None, *noises]:
            runs = [r for r in results if r["silos"] == n and r["noise_multiplier"] == z]
            rows.append({"strategy": PLAIN if z is None else "dp_fedavg", "noise_multiplier": z,
                         "epsilon": runs[0]["epsilon"],
                         "median_pr_auc": statistics.median(r["pr_auc"] for r in runs),
                         "median_roc_auc": statistics.median(r["roc_auc"] for r in runs), "runs": runs})
        tables[f"{n}_silos"] = {"silos": n, "clip_norm": clip[n], "rows": rows}
    document = {
        "benchmark": "privacy",
        "setting": {"dataset": "creditcard (ULB)", "rounds": args.rounds, "local_epochs": args.epochs,
                    "learning_rate": args.learning_rate, "repeats": args.repeats, "delta": DELTA,
                    "sampling": "all silos every round (q = 1)", "accountant": "rdp (dp-accounting)",
                    "metric": "test split of the coordinator (never trained or gated on); pr_auc is the task's primary",
                    "clip_norm": "median first-round update norm of the federation's silos"},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "tables": tables,
    }
    text = json.dumps(document, indent=1)
    if args.update:
        args.update.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
