"""Server learning-rate sweep for the server optimisers, on the clean real-data run.

Same setting as benchmarks/robustness.py (five silos, ten rounds of one local epoch, three
training seeds, no attacker), one run per (optimiser, eta, seed), every other parameter at
its default (tau 1e-3, beta1 0.9, beta2 0.99, momentum 0.9). Prints JSON with the median
validation and test ROC-AUC / PR-AUC per eta and, per optimiser, the eta with the best median
validation ROC-AUC (the coordinator's validation split: the test split does not pick).

    .venv/bin/python benchmarks/server_lr.py [--strategies fedadam,fedyogi]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from robustness import run_all  # noqa: E402

GRID = {
    "fedavgm": (0.1, 0.3, 1.0),
    "fedadam": (0.001, 0.003, 0.01, 0.03, 0.1),
    "fedyogi": (0.001, 0.003, 0.01, 0.03, 0.1),
    "fedadagrad": (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategies", default=",".join(GRID))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    names = args.strategies.split(",")
    jobs = [(name, {"eta": eta}, None, args.rounds, args.epochs, args.learning_rate, seed)
            for name in names for eta in GRID[name] for seed in range(args.repeats)]
    results = run_all(jobs, args.workers)
    sweep: dict = {}
    for (name, params, *_), result in zip(jobs, results):
        cell = sweep.setdefault(name, {}).setdefault(str(params["eta"]), {"runs": []})
        cell["runs"].append({k: result.get(k) for k in ("seed", "roc_auc", "pr_auc", "validation_roc_auc", "error")
                             if k in result})
    best = {}
    for name, cells in sweep.items():
        for cell in cells.values():
            runs = [r for r in cell["runs"] if "error" not in r]
            for key in ("validation_roc_auc", "roc_auc", "pr_auc"):
                cell[f"median_{key}"] = statistics.median(r[key] for r in runs) if runs else None
        best[name] = max(cells, key=lambda eta: (cells[eta]["median_validation_roc_auc"] or 0.0))
        print(name, " ".join(f"eta {eta}: val {c['median_validation_roc_auc']:.3f} test {c['median_roc_auc']:.3f}"
                             for eta, c in cells.items()), "-> best", best[name], file=sys.stderr)
    print(json.dumps({
        "benchmark": "server_lr",
        "setting": {"dataset": "creditcard (ULB)", "silos": 5, "rounds": args.rounds, "local_epochs": args.epochs,
                    "repeats": args.repeats, "learning_rate": args.learning_rate, "attack": None,
                    "choice": "eta with the best median validation ROC-AUC; other parameters at their defaults"},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "sweep": sweep,
        "best_eta": best,
    }, indent=2))


if __name__ == "__main__":
    main()
