"""Throughput and memory of every aggregation strategy against this machine's bandwidth.

Prints one JSON document: for each strategy and (clients, parameters) case, the median time
of several runs, the effective GB/s over the client bytes read, the peak memory allocated
during aggregation as a multiple of one model (tracemalloc; the prebuilt inputs excluded),
and the fraction of the machine's copy bandwidth, measured in the same run, interleaved with
the case's own runs so that both see the same load:

- one thread: a large numpy copy (single-threaded memcpy), the streaming ceiling of one core;
- T > 1 threads (`--threads 1,2`): a large torch copy on T threads, the ceiling of T cores.

Only FedAvg's kernel is run once per thread count (torch's intra-op threads); the other
strategies run in numpy (Krum's and Bulyan's distances in one torch float64 GEMM per column
block, on one torch thread here), and are compared with the one-thread copy.

`--only reference` measures the robust kernels against the plain numpy reference of the same
formula, written as Flower 1.x writes it (flwr/server/strategy/aggregate.py): for 5, 10, 16
and 100 clients, side by side in one run (each reference run followed by one of ours, so that
both see the same load), the median seconds of each, their ratio (ours on one thread), and
whether the results match: the median bit for bit against np.median of the float64 columns;
the means within float64 rounding of the reference run on float64 columns, except where an
exact tie at Bulyan's cut lets Flower's argpartition keep either value (ours keeps the earlier
pick, as the stable sort does: checked); Krum and Bulyan pick the same clients. The references
get the stacked (n, d) float32 matrix, as ours do, and are spared Flower's extra copies
(stacking the models again per call) and its model-equality searches (Bulyan finds each Krum
winner by comparing whole models): the ratios are, if anything, understated.

    .venv/bin/python benchmarks/aggregation.py [--repeats 5] [--threads 1,2] [--strategies fedavg,krum]
        [--only strategies,reference] [--output benchmarks/results-aggregation.json]
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

from fl_tasks.aggregation import STRATEGY_NAMES, build, robust  # noqa: E402

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


# --- against the plain numpy reference (Flower 1.x's functions) -----------------------------------------


def flower_median(x: np.ndarray) -> np.ndarray:
    """aggregate_median: np.median over the stacked updates."""
    return np.median(x, axis=0)


def flower_trimmed_mean(x: np.ndarray, proportiontocut: float) -> np.ndarray:
    """aggregate_trimmed_avg / _trim_mean (scipy's trim_mean): partition, mean of the middle."""
    nobs = x.shape[0]
    lowercut = int(proportiontocut * nobs)
    uppercut = nobs - lowercut
    atmp = np.partition(x, (lowercut, uppercut - 1), 0)
    return np.mean(atmp[lowercut:uppercut], axis=0)


def flower_distances(flat_w) -> np.ndarray:
    """_compute_distances: the squared norm of every pair's difference, pair by pair."""
    distance_matrix = np.zeros((len(flat_w), len(flat_w)))
    for i, flat_w_i in enumerate(flat_w):
        for j, flat_w_j in enumerate(flat_w):
            delta = flat_w_i - flat_w_j
            norm = np.linalg.norm(delta)
            distance_matrix[i, j] = norm**2
    return distance_matrix


def flower_krum_scores(flat_w: list[np.ndarray], num_malicious: int) -> list[float]:
    """aggregate_krum's scores: per model the sum of its n - f - 2 smallest distances to others."""
    distance_matrix = flower_distances(flat_w)
    num_closest = max(1, len(flat_w) - num_malicious - 2)
    closest_indices = [np.argsort(distance)[1:num_closest + 1].tolist() for distance in distance_matrix]
    return [float(np.sum(distance_matrix[i, closest_indices[i]])) for i in range(len(distance_matrix))]


def flower_krum(flat_w: list[np.ndarray], num_malicious: int) -> tuple[int, list[float]]:
    """aggregate_krum with to_keep=0: the model with the lowest score (its index), and the scores."""
    scores = flower_krum_scores(flat_w, num_malicious)
    return int(np.argmin(scores)), scores


def flower_closest_to_median(selected: np.ndarray, beta: int) -> np.ndarray:
    """aggregate_median of the selected models, then _aggregate_n_closest_weights."""
    median_vect = np.median(selected, axis=0)
    diff_np = np.abs(median_vect - selected)
    indices = np.argpartition(diff_np, kth=beta - 1, axis=0)
    beta_closest_weights = np.take_along_axis(selected, indices=indices, axis=0)[:beta]
    return np.mean(beta_closest_weights, axis=0)


def flower_bulyan(x: np.ndarray, num_malicious: int) -> tuple[np.ndarray, list[int]]:
    """aggregate_bulyan with aggregate_krum: theta times a full Krum (distances included) on
    the models left, the winner moved to the selection; then the closest-to-median mean."""
    remaining = list(range(x.shape[0]))
    theta = x.shape[0] - 2 * num_malicious
    beta = theta - 2 * num_malicious
    picked = []
    for _ in range(theta):
        best, _ = flower_krum([x[i] for i in remaining], num_malicious)
        picked.append(remaining.pop(best))
    return flower_closest_to_median(np.asarray(x[picked]), beta), picked


def ours_krum(x: np.ndarray, f: int) -> np.ndarray:
    """What the krum strategy's combine does: distances, scores, the chosen row in float64."""
    best = robust.krum_select(robust.pairwise_squared_distances(x), f, 1)
    return x[int(best[0])].astype(np.float64)


def side_by_side(reference, ours, runs: int, min_seconds: float) -> tuple[dict, object, object]:
    """Median seconds of `reference` and `ours`, each reference run followed by one of ours
    (`runs` pairs, one when a reference run takes over LONG_REFERENCE seconds); ours keeps
    running until min_seconds are spent (at most 30 runs). Returns the timing and the last
    results of both."""
    ref_times, our_times = [], []

    def timed(fn, times):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
        return result

    for _ in range(runs):
        reference_result = timed(reference, ref_times)
        our_result = timed(ours, our_times)
        if ref_times[-1] > LONG_REFERENCE:
            break
    while sum(our_times) < min_seconds and len(our_times) < 30:
        timed(ours, our_times)
    reference_seconds, our_seconds = statistics.median(ref_times), statistics.median(our_times)
    timing = {"reference_runs": len(ref_times), "reference_median_seconds": reference_seconds,
              "ours_runs": len(our_times), "ours_median_seconds": our_seconds,
              "speedup": reference_seconds / our_seconds}
    return timing, reference_result, our_result


def within_rounding(ours: np.ndarray, expected: np.ndarray, values: np.ndarray, count: int) -> dict:
    """Max |ours - expected|, against what adding `count` float64 values of these sizes may round."""
    diff = float(np.max(np.abs(ours - expected))) if ours.size else 0.0
    bound = float(2 * count * np.finfo(np.float64).eps * np.max(np.abs(values)))
    return {"max_abs_diff": diff, "rounding_bound": bound, "match": bool(diff <= bound)}


def stable_closest_to_median(selected: np.ndarray, beta: int) -> np.ndarray:
    """The project's rule: as Flower's, but equal distances go to the earlier pick (stable sort)."""
    median_vect = np.median(selected, axis=0)
    order = np.argsort(np.abs(selected - median_vect), axis=0, kind="stable")[:beta]
    return np.mean(np.take_along_axis(selected, order, axis=0), axis=0)


def closest_match(ours: np.ndarray, selected: np.ndarray, beta: int) -> dict:
    """Ours against Flower's coordinate step on the float64 rows. Where the beta-th and the
    next distance to the median are exactly equal, Flower's argpartition keeps either value;
    there ours must equal the stable rule (the earlier pick), and the column must hold a tie."""
    selected = selected.astype(np.float64)
    flower = flower_closest_to_median(selected, beta)
    bound = float(2 * beta * np.finfo(np.float64).eps * np.max(np.abs(selected)))
    off = np.abs(ours - flower) > bound
    block = selected[:, off]
    distances = np.sort(np.abs(block - np.median(block, axis=0)), axis=0)
    tie = bool(np.all(distances[beta - 1] == distances[beta])) if beta < len(block) else not off.any()
    stable = bool(np.all(np.abs(ours[off] - stable_closest_to_median(block, beta)) <= bound))
    outside = float(np.max(np.abs(ours - flower)[~off])) if (~off).any() else 0.0
    return {"max_abs_diff_outside_those_columns": outside, "rounding_bound": bound,
            "columns_where_flowers_argpartition_broke_an_exact_tie_otherwise": int(off.sum()),
            "those_columns_hold_an_exact_tie_at_the_cut": tie,
            "those_columns_equal_the_stable_rule_earlier_pick_first": stable,
            "match": bool(outside <= bound and tie and stable)}


REFERENCE_SIZES = ((5, 10_000_000), (10, 10_000_000), (16, 10_000_000), (100, 1_000_000))
# Flower's Bulyan reruns its whole Krum, pairwise distance loop included, for each of the theta
# picks (O(n^3 d)): at 100 clients it is measured on 100k-parameter models so that it ends in
# seconds; 10 clients are also measured at 1M, where Flower's loop runs from the CPU cache.
BULYAN_SIZES = ((5, 10_000_000), (10, 10_000_000), (10, 1_000_000), (16, 10_000_000), (100, 100_000))
TRIM_BETA = 0.2  # cuts at every n here (0.1 cuts nothing from 5)
REFERENCE_MIN_SECONDS = 1.0  # ours repeats until this much time is spent
LONG_REFERENCE = 10.0  # seconds: a reference run this long is not repeated


def reference_cases(n: int, d: int, runs: int) -> list[dict]:
    """Median, trimmed mean, Krum and Bulyan's coordinate step on n client models of d parameters."""
    x = client_matrix(n, d, seed=n)
    base = {"clients": n, "params_per_model": d}
    cases = []
    # median
    timing, flower, ours = side_by_side(lambda: flower_median(x), lambda: robust.coordinate_median(x), runs,
                                        REFERENCE_MIN_SECONDS)
    exact = np.median(x.astype(np.float64), axis=0)
    cases.append({"rule": "median", **base, **timing, "match": {
        "match": bool(np.array_equal(ours, exact)),
        "bit_for_bit_with_np_median_of_float64_columns": bool(np.array_equal(ours, exact)),
        "max_abs_diff_from_the_float32_reference": float(np.max(np.abs(ours - flower)))}})
    report(cases[-1])
    del exact, flower, ours
    # trimmed mean
    k = int(TRIM_BETA * n)
    timing, _, ours = side_by_side(lambda: flower_trimmed_mean(x, TRIM_BETA),
                                   lambda: robust.trimmed_mean(x, TRIM_BETA), runs, REFERENCE_MIN_SECONDS)
    cases.append({"rule": "trimmed_mean", **base, "params": {"beta": TRIM_BETA, "cut_each_end": k}, **timing,
                  "match": within_rounding(ours, flower_trimmed_mean(x.astype(np.float64), TRIM_BETA), x, n - 2 * k)})
    report(cases[-1])
    # Krum
    f = min(PARAMS["krum"]["f"], (n - 3) // 2)
    timing, (flower_best, flower_scores), _ = side_by_side(
        lambda: flower_krum(list(x), f), lambda: ours_krum(x, f), runs, REFERENCE_MIN_SECONDS)
    distances = robust.pairwise_squared_distances(x)
    chosen = int(robust.krum_select(distances, f, 1)[0])
    cases.append({"rule": "krum", **base, "params": {"f": f}, **timing, "match": {
        "match": bool(chosen == flower_best), "chosen": chosen,
        "max_relative_score_diff_from_the_float32_reference": float(np.max(
            np.abs(robust.krum_scores(distances, f) - flower_scores) / np.array(flower_scores)))}})
    report(cases[-1])
    # Bulyan's coordinate step alone, on theta rows
    fb = min(PARAMS["bulyan"]["f"], (n - 3) // 4)
    theta, beta = n - 2 * fb, n - 4 * fb
    rows = np.arange(theta)
    timing, _, ours = side_by_side(lambda: flower_closest_to_median(np.asarray(x[rows]), beta),
                                   lambda: robust.mean_closest_to_median(x, beta, rows), runs, REFERENCE_MIN_SECONDS)
    cases.append({"rule": "bulyan_coordinate_step", **base, "params": {"f": fb, "theta": theta, "beta": beta},
                  **timing, "match": closest_match(ours, x[rows], beta)})
    report(cases[-1])
    return cases


def bulyan_case(n: int, d: int, runs: int) -> dict:
    """Bulyan as a whole (Flower's: theta full Krums, then the coordinate step) on n models of d."""
    x = client_matrix(n, d, seed=1000 + n)
    f = min(PARAMS["bulyan"]["f"], (n - 3) // 4)
    theta, beta = n - 2 * f, n - 4 * f
    timing, (_, picked), (vector, selected) = side_by_side(
        lambda: flower_bulyan(x, f), lambda: robust.bulyan(x, f), runs, REFERENCE_MIN_SECONDS)
    match = closest_match(vector, x[selected], beta)
    match["same_picks_as_the_reference"] = bool(selected.tolist() == picked)
    match["match"] = match["match"] and match["same_picks_as_the_reference"]
    return {"rule": "bulyan", "clients": n, "params_per_model": d, "params": {"f": f, "theta": theta, "beta": beta},
            **timing, "match": match}


def report(case: dict) -> None:
    print(f"{case['rule']} n={case['clients']} d={case['params_per_model']} {case.get('params', {})}: "
          f"reference {case['reference_median_seconds']:.3f} s ({case['reference_runs']} runs), "
          f"ours {case['ours_median_seconds']:.4f} s, x{case['speedup']:.1f}, match={case['match']['match']}",
          file=sys.stderr, flush=True)


def reference_comparison(runs: int) -> dict:
    """Every case, ours on one thread (torch's, for Krum's GEMM, pinned to 1; the rest is numpy)."""
    cases = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for n, d in REFERENCE_SIZES:
            cases += reference_cases(n, d, runs)
        for n, d in BULYAN_SIZES:
            cases.append(bulyan_case(n, d, runs))
            report(cases[-1])
    finally:
        torch.set_num_threads(threads)
    return {
        "about": "robust kernels (fl_tasks/aggregation/kernels.py via robust.py) against the plain numpy "
                 "reference of the same formula as Flower 1.x writes it, side by side in one run; speedup = "
                 "reference median seconds / ours; ours on one thread (torch's, for Krum's float64 GEMM, "
                 "pinned to 1); the reference's np.linalg.norm keeps OpenBLAS's own threads",
        "machine": machine(),
        "torch_threads_ours": 1,
        "cases": cases,
    }


def client_matrix(num_clients: int, num_params: int, seed: int) -> np.ndarray:
    """The stacked float32 client models: one set of full weights (standard normal) plus a
    small update per client (0.01 x standard normal), as clients of one round send."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(num_params, dtype=np.float32)
    x = np.empty((num_clients, num_params), dtype=np.float32)
    for i in range(num_clients):
        x[i] = base
        x[i] += np.float32(0.01) * rng.standard_normal(num_params, dtype=np.float32)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fewest runs per case (the median is reported)")
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    parser.add_argument("--threads", default="1,2", help="torch thread counts for FedAvg, e.g. 1,2")
    parser.add_argument("--only", default="strategies,reference",
                        help="strategies (every strategy's throughput), reference (against Flower's numpy)")
    parser.add_argument("--reference-runs", type=int, default=3, help="runs of each reference (the median)")
    parser.add_argument("--output", type=Path, help="also write the JSON here; the parts not run are kept "
                                                     "from the file")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    result: dict = {"benchmark": "aggregation"}
    if args.output and args.output.exists():
        result |= json.loads(args.output.read_text())
    if "strategies" in parts:
        result |= strategy_cases(args)
    if "reference" in parts:
        result["reference_comparison"] = reference_comparison(args.reference_runs)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


def strategy_cases(args: argparse.Namespace) -> dict:
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
    return {"machine": machine(), "copy_gb_per_s_before_the_cases": bandwidth, "cases": cases}


if __name__ == "__main__":
    main()
