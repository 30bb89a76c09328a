"""The coordinator's own labelled rows, for the quality gates.

Optional: by default the gates read the silos' own evaluations (fl_tasks.coordinator.evaluation).
They are set as a URI in the federation file (`evaluation.coordinator_data`: s3://... in a
bucket the coordinator owns, or a local .parquet/.csv path) and read through the federation's
data contract, like a silo's rows. They are never derived from the silos' data: the
simulator writes a held-out share of the pooled example data there, a real coordinator puts
its own hold-out there.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from fl_tasks.contract import DataContract
from fl_tasks.protocol.storage import ObjectStore

if TYPE_CHECKING:
    import pandas as pd


class ValidationDataError(ValueError):
    """The coordinator's validation rows are missing or do not fit the contract."""


def read_validation_rows(uri: str, contract: DataContract, store: ObjectStore) -> "pd.DataFrame":
    """The rows at `uri`, checked against the contract; ValidationDataError names the problem."""
    import pandas as pd

    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        data = store.get_bytes(bucket, key)
        if data is None:
            raise ValidationDataError(f"coordinator data {uri} does not exist; put the coordinator's labelled "
                                      "hold-out rows there (evaluation.coordinator_data in the federation file)")
        frame = pd.read_csv(io.BytesIO(data)) if key.endswith(".csv") else pd.read_parquet(io.BytesIO(data))
        if contract.event_time and contract.event_time in frame.columns:
            frame[contract.event_time] = pd.to_datetime(frame[contract.event_time], utc=True)
    else:
        from fl_tasks.silo.sources import DataSourceError, Window, open_source

        try:
            frame = open_source(uri).read(Window(), contract.event_time)
        except DataSourceError as exc:
            raise ValidationDataError(f"coordinator data: {exc}") from None
    problems = contract.check(frame)
    if problems:
        raise ValidationDataError(f"coordinator data {uri} does not fit the data contract: {'; '.join(problems)}")
    return frame
