"""FedAvg throughput and memory against this machine's streaming memory bandwidth.

Prints one JSON document: for each (clients, parameters) case the median time of several
runs, the effective GB/s over the client bytes read, the peak extra memory as a multiple of
one model, and the same machine's numpy copy bandwidth measured in the same run.

    .venv/bin/python benchmarks/fedavg.py [--repeats 5]
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

from fl_tasks.aggregation import build  # noqa: E402


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s of a large array copy (read + write), the machine's streaming ceiling."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
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


def run_case(num_clients: int, num_params: int, repeats: int) -> dict:
    updates = client_models(num_clients, num_params, seed=num_clients)
    base = {"w": np.zeros(num_params, dtype=np.float32)}
    strategy = build("fedavg")
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        strategy.aggregate(base, iter(updates))
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    strategy.aggregate(base, iter(updates))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    model_bytes = num_params * 4
    seconds = statistics.median(times)
    return {"clients": num_clients, "params": num_params, "median_seconds": seconds,
            "effective_gb_per_s": num_clients * model_bytes / seconds / 1e9,
            "peak_extra_memory_models": peak / model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    bandwidth = copy_bandwidth(400_000_000, args.repeats)
    cases = [run_case(n, p, args.repeats) for n, p in ((10, 10_000_000), (100, 1_000_000))]
    for case in cases:
        case["fraction_of_copy_bandwidth"] = case["effective_gb_per_s"] / bandwidth
    print(json.dumps({
        "benchmark": "fedavg",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "numpy": np.__version__},
        "copy_bandwidth_gb_per_s": bandwidth,
        "cases": cases,
    }, indent=2))


if __name__ == "__main__":
    main()
