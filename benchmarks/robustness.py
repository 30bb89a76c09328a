"""Robustness of each aggregation strategy on the real fraud data, clean and under attack.

Five silos (the non-IID split of `make demo`), ten rounds per run, every strategy twice:
all silos honest, and one silo Byzantine (sign-flip x10 of its update). Prints JSON with
the test ROC-AUC and PR-AUC of each run and the machine. Rounds run in-process through the
same library code as the DAG (local training, attack, strategy); runs go two at a time.

    .venv/bin/python benchmarks/robustness.py [--rounds 10] [--attacker bank-east]
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

STRATEGIES = {  # name -> params for five silos with at most one attacker
    "fedavg": {}, "fedavgm": {}, "fedadam": {"eta": 0.1}, "fedyogi": {"eta": 0.1}, "fedadagrad": {"eta": 0.1},
    "median": {}, "trimmed_mean": {"beta": 0.2}, "krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1},
}


def run(strategy: str, params: dict, attacker: str | None, rounds: int, epochs: int, lr: float, seed: int) -> dict:
    import numpy as np
    import torch

    from fl_tasks.aggregation import build
    from fl_tasks.behaviours import SIGN_FLIP, poison_model
    from fl_tasks.config import load_federation
    from fl_tasks.datasets import dirichlet_partition, holdout_split, load_dataset
    from fl_tasks.evaluation import evaluate
    from fl_tasks.models import build_model, load_numpy_state, state_to_numpy
    from fl_tasks.training import train_local

    torch.set_num_threads(1)
    spec = load_federation(REPO / "federations" / "banks.yaml")
    pool, _, test = holdout_split(load_dataset("creditcard"), seed=spec.data.seed)
    parts = dirichlet_partition(pool.y, len(spec.clients), alpha=0.5, seed=spec.data.seed, min_rows=500,
                                majority_alpha=5.0)
    silos = {c.id: pool.take(p) for c, p in zip(spec.clients, parts)}
    try:
        aggregator = build(strategy, **params)
    except ValueError as exc:
        return {"strategy": strategy, "attacked": attacker is not None, "error": str(exc)}
    model = build_model(spec.model, seed=spec.model.seed)
    started = time.perf_counter()
    for number in range(rounds):
        base = state_to_numpy(model)
        updates = []
        for index, (client_id, table) in enumerate(silos.items()):
            local = load_numpy_state(build_model(spec.model), base)
            train_local(local, table, epochs=epochs, learning_rate=lr, batch_size=spec.training.batch_size,
                        seed=seed * 100_000 + number * 100 + index)
            trained = state_to_numpy(local)
            if client_id == attacker:
                trained = poison_model(SIGN_FLIP, trained, base, 10.0, f"{number:06d}")
            updates.append((trained, len(table)))
        try:
            model = load_numpy_state(build_model(spec.model), aggregator.aggregate(base, iter(updates)))
        except ValueError as exc:
            return {"strategy": strategy, "attacked": attacker is not None, "error": str(exc)}
    metrics = evaluate(model, test)
    return {"strategy": strategy, "params": params, "attacked": attacker is not None,
            "roc_auc": metrics["roc_auc"], "pr_auc": metrics["pr_auc"],
            "finite": bool(all(np.isfinite(v).all() for v in state_to_numpy(model).values())),
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--attacker", default="bank-east", help="the Byzantine silo in attacked runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (different training seeds); "
                                                                 "the table reports the median")
    args = parser.parse_args()
    from fl_tasks.datasets import load_dataset

    load_dataset("creditcard")  # fetch and cache once, before the workers start
    jobs = [(name, params, attacker, args.rounds, args.epochs, args.learning_rate, seed)
            for name, params in STRATEGIES.items() for attacker in (None, args.attacker)
            for seed in range(args.repeats)]
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(run, *zip(*jobs)))
    table = {}
    for result in results:
        entry = table.setdefault(result["strategy"], {"params": STRATEGIES[result["strategy"]]})
        cell = entry.setdefault("byzantine" if result["attacked"] else "clean", {"runs": []})
        if "error" in result:
            cell["error"] = result["error"]
            continue
        cell["runs"].append({k: result[k] for k in ("roc_auc", "pr_auc", "finite", "seconds")})
    for entry in table.values():
        for cell in (entry.get("clean", {}), entry.get("byzantine", {})):
            if cell.get("runs"):
                cell["median_roc_auc"] = statistics.median(r["roc_auc"] for r in cell["runs"])
                cell["median_pr_auc"] = statistics.median(r["pr_auc"] for r in cell["runs"])
    clean_fedavg = table["fedavg"]["clean"]["median_roc_auc"]
    for entry in table.values():
        if "median_roc_auc" in entry.get("byzantine", {}):
            entry["byzantine_points_below_clean_fedavg"] = 100 * (clean_fedavg - entry["byzantine"]["median_roc_auc"])
    print(json.dumps({
        "benchmark": "robustness",
        "setting": {"dataset": "creditcard (ULB)", "silos": 5, "rounds": args.rounds, "local_epochs": args.epochs,
                    "repeats": args.repeats,
                    "learning_rate": args.learning_rate, "attack": f"{args.attacker}: sign-flip x10",
                    "metric": "test split of the coordinator (never trained or gated on)"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": table,
    }, indent=2))


if __name__ == "__main__":
    main()
