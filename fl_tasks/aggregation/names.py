"""Strategy names and parameter names, importable without numpy so that DAG files can build
their trigger form and configs can be validated without the maths."""

STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "median", "trimmed_mean", "krum", "multi_krum", "bulyan",
    "weighted_median", "weighted_trimmed_mean", "weighted_multi_krum", "centered_clipping",
)

# Keyword parameters each strategy's `build(name, **params)` accepts (all optional).
STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("eta", "momentum"),
    "fedadam": ("eta", "beta1", "beta2", "tau"),
    "fedyogi": ("eta", "beta1", "beta2", "tau"),
    "fedadagrad": ("eta", "beta1", "tau"),  # Adagrad sums squares: no beta2 (Reddi et al. 2021, Alg. 2)
    "median": (),
    "trimmed_mean": ("beta",),
    "krum": ("f",),
    "multi_krum": ("f", "m"),
    "bulyan": ("f",),
    "weighted_median": (),
    "weighted_trimmed_mean": ("beta",),
    "weighted_multi_krum": ("f", "m"),
    "centered_clipping": ("tau", "tau_ratio", "iterations"),  # tau 0: adaptive, tau_ratio x median distance
}
