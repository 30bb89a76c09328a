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
    "weighted_median": {}, "weighted_trimmed_mean": {"beta": 0.2}, "weighted_multi_krum": {"f": 1},
    "centered_clipping": {},
    # Behind the coordinator's default screening and weight cap (banks.yaml's settings): FedAvg,
    # and the default strategy, what a round does when nobody configured a defence.
    "fedavg+defaults": {}, "weighted_median+defaults": {},
}


def silo_ids(configured: list[str], count: int) -> list[str]:
    """The federation's silos, then bank-6, bank-7, ... when more are asked for."""
    return configured[:count] + [f"bank-{i + 1}" for i in range(len(configured), count)]


def run(strategy: str, params: dict, attacker: str | None, rounds: int, epochs: int, lr: float, seed: int,
        silos: int = 5) -> dict:
    import numpy as np
    import torch

    from fl_tasks.aggregation import STRATEGY_PARAMS, build
    from fl_tasks.aggregation.mean import cap_shares
    from fl_tasks.config import load_federation
    from fl_tasks.coordinator import screening
    from fl_tasks.simulation.attacks import SIGN_FLIP, poison_model
    from fl_tasks.simulation.datasets import benchmark_split
    from fl_tasks.tasks.api import TrainingSettings, load_model_state, model_state

    torch.set_num_threads(1)
    spec = load_federation(REPO / "federations" / "banks.yaml")
    task = spec.load_task()
    split = benchmark_split(spec, task, silos)
    tables = dict(zip(silo_ids([c.id for c in spec.clients], silos), split.silos))
    defence = strategy.endswith(DEFENDED)
    strategy = strategy.removesuffix(DEFENDED)
    head = {"strategy": strategy + (DEFENDED if defence else ""), "attacked": attacker is not None, "seed": seed}
    try:
        aggregator = build(strategy, **params)
    except ValueError as exc:
        return {**head, "error": str(exc)}
    effective = {name: getattr(aggregator, name) for name in STRATEGY_PARAMS[strategy] if hasattr(aggregator, name)}
    if defence:
        effective.update({"max_weight_share": spec.max_weight_share, "min_norm_ratio": spec.screening.min_norm_ratio,
                          "max_abs_value": spec.screening.max_abs_value})
    model = task.seeded_model(spec.task.seed)
    started = time.perf_counter()
    rejected = 0
    for number in range(rounds):
        base = model_state(model)
        updates = []
        for index, (client_id, table) in enumerate(tables.items()):
            local = load_model_state(task.build_model(), base)
            task.train(local, table, TrainingSettings(epochs, lr, spec.training.batch_size,
                                                      seed=seed * 100_000 + number * 100 + index), local.state_dict())
            trained = model_state(local)
            if client_id == attacker:
                trained = poison_model(SIGN_FLIP, trained, base, 10.0, f"{number:06d}")
            updates.append((trained, len(table)))
        if defence:
            updates, dropped = default_defence(spec, updates, base, epochs, screening, cap_shares, task)
            rejected += dropped
        try:
            model = load_model_state(task.build_model(), aggregator.aggregate(base, iter(updates)))
        except ValueError as exc:
            return {**head, "error": str(exc)}
    metrics = task.evaluate(model, split.test)
    return {**head, "params": effective, "roc_auc": metrics["roc_auc"], "pr_auc": metrics["pr_auc"],
            "validation_roc_auc": task.evaluate(model, split.validation)["roc_auc"],
            "finite": bool(all(np.isfinite(v).all() for v in model_state(model).values())),
            "rejected_updates": rejected, "seconds": time.perf_counter() - started}


DEFENDED = "+defaults"


def default_defence(spec, updates, base, epochs, screening, cap_shares, task):
    """What the coordinator does by default before any strategy (banks.yaml's screening and
    aggregation settings): value checks, free riders, norm screens, the weight-share cap.
    Returns the updates that pass, with capped weights, and how many were dropped."""
    rules = spec.screening
    kept = []
    for state, count in updates:
        try:
            screening.check_values(state, base, max_abs=rules.max_abs_value, max_increment=epochs * count,
                                   ranges=task.tensor_ranges)
            kept.append((state, count))
        except ValueError:
            pass
    norms = {str(i): screening.update_norm(state, base) for i, (state, _) in enumerate(kept)}
    drop = set(screening.free_riders(norms, rules.min_norm_ratio)) | set(
        screening.norm_outliers(norms, rules.max_update_norm, rules.max_norm_ratio))
    kept = [u for i, u in enumerate(kept) if str(i) not in drop]
    weights = cap_shares([count for _, count in kept], spec.max_weight_share)
    return [(state, weight) for (state, _), weight in zip(kept, weights)], len(updates) - len(kept)


def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    """run(*job) for every job, `workers` processes at a time (the dataset is cached first)."""
    from fl_tasks.simulation.datasets import creditcard_frame

    creditcard_frame()  # fetch and cache once, before the workers start
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
                                                    "rejected_updates", "seconds")})
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
