"""Name -> strategy class, for `build`."""

from __future__ import annotations

from fl_tasks.aggregation.bulyan import Bulyan
from fl_tasks.aggregation.centered import CenteredClipping
from fl_tasks.aggregation.coordinate import Median, TrimmedMean, WeightedMedian, WeightedTrimmedMean
from fl_tasks.aggregation.fedavg import FedAvg
from fl_tasks.aggregation.fedopt import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fl_tasks.aggregation.krum import Krum, MultiKrum, WeightedMultiKrum

REGISTRY: dict[str, type] = {
    "fedavg": FedAvg, "fedavgm": FedAvgM, "fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad,
    "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum, "multi_krum": MultiKrum, "bulyan": Bulyan,
    "weighted_median": WeightedMedian, "weighted_trimmed_mean": WeightedTrimmedMean,
    "weighted_multi_krum": WeightedMultiKrum, "centered_clipping": CenteredClipping,
}
