"""Name -> strategy class, for `build`."""

from __future__ import annotations

from fl_tasks.aggregation.bulyan import Bulyan
from fl_tasks.aggregation.coordinate import Median, TrimmedMean
from fl_tasks.aggregation.fedavg import FedAvg
from fl_tasks.aggregation.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fl_tasks.aggregation.krum import Krum, MultiKrum

REGISTRY: dict[str, type] = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum, "multi_krum": MultiKrum, "bulyan": Bulyan,
}
