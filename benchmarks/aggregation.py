"""Throughput and memory of every aggregation strategy against this machine's bandwidth.

Prints one JSON document: for each strategy and (clients, parameters) case, the median time
of several runs, the effective GB/s over the client bytes read, the peak memory allocated
during aggregation as a multiple of one model (inputs excluded), and the same machine's
numpy copy bandwidth measured in the same run, with each strategy's fraction of it.

    .venv/bin/python benchmarks/aggregation.py [--repeats 5] [--strategies fedavg,krum]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_tasks.aggregation import STRATEGY_NAMES, build  # noqa: E402

PARAMS = {"trimmed_mean": {"beta": 0.1}, "krum": {"f": 2}, "multi_krum": {"f": 2}, "bulyan": {"f": 1}}


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of a large array copy (read + write), the machine's streaming ceiling."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # the first touch faults the pages in: not timed
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - started)
    return 2 * nbytes / statistics.median(times) / 1e9


def client_models(num_clients: int, num_params: int, seed: int):
    """Pre-built client states, so that the timing measures aggregation, not generation."""
    rng = np.random.default_rng(seed)
    return [({"w": rng.standard_normal(num_params, dtype=np.float32)}, int(rng.integers(100, 10_000)))
            for _ in range(num_clients)]


def run_case(strategy_name: str, updates: list, repeats: int) -> dict:
    num_clients, num_params = len(updates), updates[0][0]["w"].size
    base = {"w": np.zeros(num_params, dtype=np.float32)}
    times = []
    for _ in range(repeats):
        strategy = build(strategy_name, **PARAMS.get(strategy_name, {}))
        started = time.perf_counter()
        strategy.aggregate(base, iter(updates))
        times.append(time.perf_counter() - started)
    strategy = build(strategy_name, **PARAMS.get(strategy_name, {}))
    tracemalloc.start()
    strategy.aggregate(base, iter(updates))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    model_bytes = num_params * 4
    seconds = statistics.median(times)
    return {"strategy": strategy_name, "params": PARAMS.get(strategy_name, {}), "clients": num_clients,
            "params_per_model": num_params, "median_seconds": seconds,
            "effective_gb_per_s": num_clients * model_bytes / seconds / 1e9,
            "peak_memory_models": peak / model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    args = parser.parse_args()
    bandwidth = copy_bandwidth(400_000_000, args.repeats)
    cases = []
    for num_clients, num_params in ((10, 10_000_000), (100, 1_000_000)):
        updates = client_models(num_clients, num_params, seed=num_clients)
        for name in args.strategies.split(","):
            case = run_case(name, updates, args.repeats)
            case["fraction_of_copy_bandwidth"] = case["effective_gb_per_s"] / bandwidth
            cases.append(case)
            print(f"{name} n={num_clients}: {case['median_seconds']:.3f}s", file=sys.stderr, flush=True)
        del updates
    print(json.dumps({
        "benchmark": "aggregation",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "numpy": np.__version__},
        "copy_bandwidth_gb_per_s": bandwidth,
        "cases": cases,
    }, indent=2))


if __name__ == "__main__":
    main()
