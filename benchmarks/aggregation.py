"""Throughput and memory of every aggregation strategy against this machine's bandwidth.

Prints one JSON document: for each strategy and (clients, parameters) case, the median time
of several runs, the effective GB/s over the client bytes read, the peak memory allocated
during aggregation as a multiple of one model (tracemalloc; the prebuilt inputs excluded),
and the fraction of the machine's copy bandwidth, measured in the same run, interleaved with
the case's own runs so that both see the same load:

- one thread: a large numpy copy (single-threaded memcpy), the streaming ceiling of one core;
- T > 1 threads (`--threads 1,2`): a large torch copy on T threads, the ceiling of T cores.

Only FedAvg's kernel runs through torch (multi-threaded when torch has several threads), so
only FedAvg is run once per thread count; the other strategies run in numpy, and are
compared with the one-thread copy.

    .venv/bin/python benchmarks/aggregation.py [--repeats 5] [--threads 1,2] [--strategies fedavg,krum]
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_tasks.aggregation import STRATEGY_NAMES, build  # noqa: E402

PARAMS = {"trimmed_mean": {"beta": 0.1}, "krum": {"f": 2}, "multi_krum": {"f": 2}, "bulyan": {"f": 1}}
THREADED = {"fedavg"}  # strategies whose kernel runs through torch's intra-op threads
COPY_BYTES = 400_000_000
MIN_SECONDS = 2.0  # fast cases repeat until this much time has been spent (at most 50 runs)


def machine() -> dict:
    """What the figures were measured on."""
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "numpy": np.__version__,
            "torch": torch.__version__.split("+")[0]}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                                 if line.startswith("model name"))
        info["virtualised"] = " hypervisor" in cpuinfo
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 1)
        caches = Path("/sys/devices/system/cpu/cpu0/cache")
        info["caches"] = {f"L{(d / 'level').read_text().strip()} {(d / 'type').read_text().strip().lower()}":
                          (d / "size").read_text().strip() for d in sorted(caches.glob("index*"))}
    except (OSError, StopIteration, ValueError):
        info.setdefault("cpu_model", platform.processor() or platform.machine())
    return info


class Copy:
    """A large float32 copy, timed one run at a time: numpy on one thread, torch on several."""

    def __init__(self, nbytes: int) -> None:
        self.src = np.ones(nbytes // 4, dtype=np.float32)
        self.dst = np.empty_like(self.src)
        np.copyto(self.dst, self.src)  # the first touch faults the pages in: not timed

    def gb_per_s(self, threads: int) -> float:
        """Bytes read + bytes written per second, one copy."""
        if threads == 1:
            started = time.perf_counter()
            np.copyto(self.dst, self.src)
        else:
            torch.set_num_threads(threads)
            src, dst = torch.from_numpy(self.src), torch.from_numpy(self.dst)
            started = time.perf_counter()
            dst.copy_(src)
        return 2 * self.src.nbytes / (time.perf_counter() - started) / 1e9


def client_models(num_clients: int, num_params: int, seed: int):
    """Pre-built client states, so that the timing measures aggregation, not generation."""
    rng = np.random.default_rng(seed)
    return [({"w": rng.standard_normal(num_params, dtype=np.float32)}, int(rng.integers(100, 10_000)))
            for _ in range(num_clients)]


def run_case(strategy_name: str, updates: list, threads: int, copy: Copy, repeats: int) -> dict:
    num_clients, num_params = len(updates), updates[0][0]["w"].size
    model_bytes = num_params * 4
    base = {"w": np.zeros(num_params, dtype=np.float32)}
    params = PARAMS.get(strategy_name, {})
    times, copies = [], []
    spent = 0.0
    while len(times) < repeats or (spent < MIN_SECONDS and len(times) < 50):
        copies.append(copy.gb_per_s(threads))
        torch.set_num_threads(threads)
        strategy = build(strategy_name, **params)
        started = time.perf_counter()
        strategy.aggregate(base, iter(updates))
        times.append(time.perf_counter() - started)
        spent += times[-1]
    strategy = build(strategy_name, **params)
    tracemalloc.start()
    strategy.aggregate(base, iter(updates))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    seconds, baseline = statistics.median(times), statistics.median(copies)
    effective = num_clients * model_bytes / seconds / 1e9
    return {"strategy": strategy_name, "params": params, "clients": num_clients, "params_per_model": num_params,
            "threads": threads, "runs": len(times), "median_seconds": seconds, "effective_gb_per_s": effective,
            "peak_memory_models": peak / model_bytes,
            "baseline": "numpy copy, 1 thread" if threads == 1 else f"torch copy, {threads} threads",
            "baseline_gb_per_s": baseline, "fraction_of_copy_bandwidth": effective / baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fewest runs per case (the median is reported)")
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    parser.add_argument("--threads", default="1,2", help="torch thread counts for FedAvg, e.g. 1,2")
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    copy = Copy(COPY_BYTES)
    bandwidth = {("numpy copy, 1 thread" if t == 1 else f"torch copy, {t} threads"):
                 statistics.median(copy.gb_per_s(t) for _ in range(args.repeats)) for t in sorted({1, *thread_counts})}
    cases = []
    for num_clients, num_params in ((10, 10_000_000), (100, 1_000_000)):
        updates = client_models(num_clients, num_params, seed=num_clients)
        for name in args.strategies.split(","):
            for threads in (thread_counts if name in THREADED else [1]):
                case = run_case(name, updates, threads, copy, args.repeats)
                cases.append(case)
                print(f"{name} n={num_clients} threads={threads}: {case['median_seconds']:.4f} s, "
                      f"{case['effective_gb_per_s']:.1f} GB/s = {case['fraction_of_copy_bandwidth']:.2f} of "
                      f"{case['baseline']} ({case['baseline_gb_per_s']:.1f} GB/s), "
                      f"peak {case['peak_memory_models']:.2f} models", file=sys.stderr, flush=True)
        del updates
    print(json.dumps({
        "benchmark": "aggregation",
        "machine": machine(),
        "copy_gb_per_s_before_the_cases": bandwidth,
        "cases": cases,
    }, indent=2))


if __name__ == "__main__":
    main()
