"""Robustness of each aggregation strategy on the real fraud data, clean and under attack.

n silos (5 by default: the non-IID split of `make demo`; 7 gives Bulyan with f=1 the
n >= 4f + 3 it needs), ten rounds per run, every strategy twice: all silos honest, and one
silo Byzantine (sign-flip x10 of its update). Prints JSON with the test ROC-AUC and PR-AUC
(and the coordinator's validation ROC-AUC) of each run and the machine. Rounds run in-process
through the same library code as the DAG (local training, attack, strategy); runs go two at
a time. Strategies run with their defaults unless STRATEGIES below says otherwise.

    .venv/bin/python benchmarks/robustness.py [--silos 5] [--strategies fedavg,median]
        [--update benchmarks/results-robustness.json]

With --update the file's table for this number of silos gets (or replaces) the rows run now,
the other rows and tables are kept, and the merged document is written back and printed.
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

STRATEGIES = {  # name -> params beyond the strategy's defaults, for at most one attacker
    "fedavg": {}, "fedavgm": {}, "fedadam": {}, "fedyogi": {}, "fedadagrad": {},
    "median": {}, "trimmed_mean": {"beta": 0.2}, "krum": {"f": 1}, "multi_krum": {"f": 1}, "bulyan": {"f": 1},
}


def silo_ids(configured: list[str], count: int) -> list[str]:
    """The federation's silos, then bank-6, bank-7, ... when more are asked for."""
    return configured[:count] + [f"bank-{i + 1}" for i in range(len(configured), count)]


def run(strategy: str, params: dict, attacker: str | None, rounds: int, epochs: int, lr: float, seed: int,
        silos: int = 5) -> dict:
    import numpy as np
    import torch

    from fl_tasks.aggregation import STRATEGY_PARAMS, build
    from fl_tasks.simulation.attacks import SIGN_FLIP, poison_model
    from fl_tasks.config import load_federation
    from fl_tasks.simulation.datasets import dirichlet_partition, holdout_split, load_dataset
    from fl_tasks.tasks.evaluation import evaluate
    from fl_tasks.tasks.models import build_model, load_numpy_state, state_to_numpy
    from fl_tasks.tasks.training import train_local

    torch.set_num_threads(1)
    spec = load_federation(REPO / "federations" / "banks.yaml")
    pool, validation, test = holdout_split(load_dataset("creditcard"), seed=spec.data.seed)
    ids = silo_ids([c.id for c in spec.clients], silos)
    parts = dirichlet_partition(pool.y, len(ids), alpha=0.5, seed=spec.data.seed, min_rows=500,
                                majority_alpha=5.0)
    tables = {client_id: pool.take(p) for client_id, p in zip(ids, parts)}
    head = {"strategy": strategy, "attacked": attacker is not None, "seed": seed}
    try:
        aggregator = build(strategy, **params)
    except ValueError as exc:
        return {**head, "error": str(exc)}
    effective = {name: getattr(aggregator, name) for name in STRATEGY_PARAMS[strategy] if hasattr(aggregator, name)}
    model = build_model(spec.model, seed=spec.model.seed)
    started = time.perf_counter()
    for number in range(rounds):
        base = state_to_numpy(model)
        updates = []
        for index, (client_id, table) in enumerate(tables.items()):
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
            return {**head, "error": str(exc)}
    metrics = evaluate(model, test)
    return {**head, "params": effective, "roc_auc": metrics["roc_auc"], "pr_auc": metrics["pr_auc"],
            "validation_roc_auc": evaluate(model, validation)["roc_auc"],
            "finite": bool(all(np.isfinite(v).all() for v in state_to_numpy(model).values())),
            "seconds": time.perf_counter() - started}


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    """run(*job) for every job, `workers` processes at a time (the dataset is cached first)."""
    from fl_tasks.simulation.datasets import load_dataset

    load_dataset("creditcard")  # fetch and cache once, before the workers start
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(run, *zip(*jobs)))


def cell_medians(cell: dict) -> None:
    if cell.get("runs"):
        for key in ("roc_auc", "pr_auc"):
            cell[f"median_{key}"] = statistics.median(r[key] for r in cell["runs"])


def build_table(results: list[dict]) -> dict:
    table: dict = {}
    for result in results:
        entry = table.setdefault(result["strategy"], {"params": STRATEGIES[result["strategy"]]})
        if "params" in result:
            entry["params"] = result["params"]  # the effective values, defaults included
        cell = entry.setdefault("byzantine" if result["attacked"] else "clean", {"runs": []})
        if "error" in result:
            cell["error"] = result["error"]
            continue
        cell["runs"].append({k: result[k] for k in ("seed", "roc_auc", "pr_auc", "validation_roc_auc", "finite",
                                                    "seconds")})
    for entry in table.values():
        for cell in (entry.get("clean", {}), entry.get("byzantine", {})):
            cell_medians(cell)
    return table


def mark_against_clean_fedavg(table: dict) -> None:
    clean = table.get("fedavg", {}).get("clean", {}).get("median_roc_auc")
    for entry in table.values():
        entry.pop("byzantine_points_below_clean_fedavg", None)
        if clean is not None and "median_roc_auc" in entry.get("byzantine", {}):
            entry["byzantine_points_below_clean_fedavg"] = 100 * (clean - entry["byzantine"]["median_roc_auc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.002)
    parser.add_argument("--silos", type=int, default=5)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--attacker", default="bank-east", help="the Byzantine silo in attacked runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (different training seeds); "
                                                                 "the table reports the median")
    parser.add_argument("--update", type=Path, help="merge into this results file and write it back")
    args = parser.parse_args()
    names = args.strategies.split(",")
    unknown = sorted(set(names) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown strategies {unknown}")
    setting = {"dataset": "creditcard (ULB)", "rounds": args.rounds, "local_epochs": args.epochs,
               "repeats": args.repeats, "learning_rate": args.learning_rate, "attack": "sign-flip x10",
               "metric": "test split of the coordinator (never trained or gated on)"}
    document = {"benchmark": "robustness", "setting": setting, "tables": {}}
    if args.update and args.update.exists():
        document = json.loads(args.update.read_text())
        if document.get("setting") != setting:
            sys.exit(f"{args.update} was made with {document.get('setting')}, not {setting}: rerun it whole")
    jobs = [(name, STRATEGIES[name], attacker, args.rounds, args.epochs, args.learning_rate, seed, args.silos)
            for name in names for attacker in (None, args.attacker) for seed in range(args.repeats)]
    fresh = build_table(run_all(jobs, args.workers))
    key = f"{args.silos}_silos"
    table = document["tables"].setdefault(key, {"silos": args.silos, "attacker": args.attacker, "results": {}})
    if table["attacker"] != args.attacker:
        sys.exit(f"the {key} table was attacked by {table['attacker']}, not {args.attacker}")
    table["results"].update(fresh)
    table["results"] = {name: table["results"][name] for name in STRATEGIES if name in table["results"]}
    mark_against_clean_fedavg(table["results"])
    document["tables"] = dict(sorted(document["tables"].items(), key=lambda item: item[1]["silos"]))
    document["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    text = json.dumps(document, indent=2)
    if args.update:
        args.update.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
