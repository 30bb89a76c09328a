"""The data contract: the columns every silo's rows must have, declared once in the
federation file and carried in every global manifest.

    data:
      contract:
        label: {name: is_fraud, type: boolean}
        event_time: event_time                 # the column data windows select on
        features:
          - {name: amount, type: numeric, max_missing_share: 0.01}
          - {name: channel, type: categorical, categories: [web, pos, atm], max_unknown_share: 0.02}
          - {names: [v1, v2, v3], type: numeric}   # several columns of one type
        allow_extra_columns: false
        min_rows: 2

Before training, a silo checks its rows with `DataContract.check`: missing or extra
columns, wrong types, unknown categories above the allowed share, too many missing values,
or too few rows. Any problem and the silo declines the round with the reasons instead of
training (see fl_tasks.silo.agent).
"""

from __future__ import annotations

import decimal
import hashlib
import json
import numbers
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

COLUMN_TYPES = ("numeric", "boolean", "categorical")
LABEL_TYPES = ("boolean", "categorical", "numeric")
MAX_EXAMPLE_CHARS = 32  # unknown categories quoted in a (public) decline reason are cut to this


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # numeric | boolean | categorical
    categories: tuple[str, ...] = ()  # categorical only: the known values
    max_missing_share: float = 0.0  # share of null values allowed
    max_unknown_share: float = 0.0  # categorical only: share of values outside `categories` allowed

    def __post_init__(self) -> None:
        # Normalised here so that equal contracts written differently (YAML `0` vs `0.0`,
        # a list vs a tuple, `1` vs `"1"`) compare and hash alike on every party.
        if self.type not in COLUMN_TYPES:
            raise ValueError(f"column {self.name!r} has type {self.type!r}; expected one of {', '.join(COLUMN_TYPES)}")
        for share in ("max_missing_share", "max_unknown_share"):
            value = float(getattr(self, share))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"column {self.name!r}: {share} is {value}, expected a share between 0 and 1")
            object.__setattr__(self, share, value)
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "categories", tuple(str(c) for c in self.categories))


@dataclass(frozen=True)
class DataContract:
    label: Column
    features: tuple[Column, ...]
    event_time: str | None = None
    allow_extra_columns: bool = False
    min_rows: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))  # a list would not hash or compare alike

    @property
    def columns(self) -> list[str]:
        """Every column the contract names, label and event time included."""
        return [c.name for c in self.features] + [self.label.name] + ([self.event_time] if self.event_time else [])

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types (lists, not tuples), for manifests and YAML alike."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "DataContract":
        """The contract `as_dict` wrote (a manifest's); fl_tasks.config parses the federation file's."""
        return cls(label=Column(**raw["label"]), features=tuple(Column(**c) for c in raw["features"]),
                   event_time=raw.get("event_time"), allow_extra_columns=bool(raw.get("allow_extra_columns", False)),
                   min_rows=int(raw.get("min_rows", 2)))

    @property
    def sha256(self) -> str:
        """Identifies the contract in manifests: any change to a column changes it."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def feature(self, name: str) -> Column:
        for column in self.features:
            if column.name == name:
                return column
        raise KeyError(f"the data contract has no feature {name!r}")

    # --- checking rows ---------------------------------------------------------------------
    def check(self, frame: "pd.DataFrame") -> list[str]:
        """Every way `frame` breaks the contract, one sentence each naming the column; [] when it holds.

        The sentences become the silo's public decline reason: they give column names, types,
        counts and shares, and never row values except at most three unknown categories."""
        import pandas as pd

        frame = frame.rename(columns=str)
        counts = frame.columns.value_counts()
        problems = [f"column '{name}' appears {count} times" for name, count in counts.items() if count > 1]
        present = set(counts.index)
        problems += [f"column '{name}' missing" for name in self.columns if name not in present]
        if not self.allow_extra_columns:
            problems += [f"column '{name}' is not in the data contract (allow_extra_columns is false)"
                         for name in sorted(present - set(self.columns))]
        if len(frame) < self.min_rows:
            problems.append(f"the data window has {len(frame)} rows, the contract needs at least {self.min_rows}")
        if not len(frame):
            return problems
        for column in [*self.features, self.label]:
            if counts.get(column.name) == 1:
                problems += _check_column(column, frame[column.name])
        if self.event_time and counts.get(self.event_time) == 1:
            if not pd.api.types.is_datetime64_any_dtype(frame[self.event_time]):
                problems.append(f"column '{self.event_time}' (event time) has type {frame[self.event_time].dtype}, "
                                "expected a timestamp")
        return problems

    # --- encoding, for tasks ---------------------------------------------------------------
    def numeric(self, frame: "pd.DataFrame", names: list[str] | None = None) -> "np.ndarray":
        """Numeric and boolean features (or `names`) as a float32 matrix; nulls become 0."""
        import numpy as np

        if names is None:
            names = [c.name for c in self.features if c.type in ("numeric", "boolean")]
        if not names:
            return np.zeros((len(frame), 0), dtype=np.float32)
        return frame[names].astype("float64").fillna(0.0).to_numpy(dtype=np.float32)

    def codes(self, frame: "pd.DataFrame", name: str) -> "np.ndarray":
        """A categorical column as integer codes: its category's index, len(categories) for
        unknown or null values (one extra slot for "other"). Values are compared as text, as
        `check` does."""
        import numpy as np

        column = self.label if name == self.label.name else self.feature(name)
        lookup = {value: i for i, value in enumerate(column.categories)}
        values = frame[name]
        other = len(column.categories)
        return np.array([other if null else lookup.get(str(v), other)
                         for v, null in zip(values.astype("object"), values.isna())], dtype=np.int64)

    def labels(self, frame: "pd.DataFrame") -> "np.ndarray":
        """The label column: 0/1 floats (boolean), class indices (categorical) or floats (numeric)."""
        import numpy as np

        if self.label.type == "categorical":
            return self.codes(frame, self.label.name)
        return frame[self.label.name].astype("float64").to_numpy(dtype=np.float32)


def _is_number(value: object) -> bool:
    """Numbers as databases return them (Decimal included), booleans excluded."""
    import numpy as np

    return isinstance(value, (numbers.Real, decimal.Decimal)) and not isinstance(value, (bool, np.bool_))


def _check_column(column: Column, values: "pd.Series") -> list[str]:
    import numpy as np
    import pandas as pd

    problems = []
    missing = int(values.isna().sum())
    if missing / len(values) > column.max_missing_share:
        problems.append(f"column '{column.name}' has {missing} of {len(values)} values missing "
                        f"({missing / len(values):.1%}), the contract allows {column.max_missing_share:.1%}")
    present = values.dropna()
    if not len(present):
        return problems  # no value to judge the type by
    # Object columns are what a database or a CSV with nulls gives for booleans and decimals.
    is_object = values.dtype == object
    numeric_dtype = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
    if column.type == "numeric":
        if not (numeric_dtype or (is_object and present.map(_is_number).all())):
            problems.append(f"column '{column.name}' has type {values.dtype}, expected numeric")
    elif column.type == "boolean":
        if is_object:
            valid = present.map(lambda v: isinstance(v, (bool, np.bool_)) or (_is_number(v) and v in (0, 1))).all()
        else:
            valid = pd.api.types.is_bool_dtype(values) or (numeric_dtype and present.isin([0, 1]).all())
        if not valid:
            problems.append(f"column '{column.name}' has type {values.dtype}, expected boolean (true/false or 0/1)")
    elif numeric_dtype:
        problems.append(f"column '{column.name}' has type {values.dtype}, expected categorical (text)")
    else:
        text = present.astype(str)
        unknown = ~text.isin(column.categories)
        share = float(unknown.mean())
        if share > column.max_unknown_share:
            examples = [value[:MAX_EXAMPLE_CHARS] for value in sorted(set(text[unknown]))[:3]]
            problems.append(f"column '{column.name}' has {share:.1%} unknown categories (e.g. {examples}), the "
                            f"contract allows {column.max_unknown_share:.1%}")
    return problems
