"""Federation spec: one YAML file per federation, loaded into validated, frozen objects.

A bad file fails at load time with the file, the dotted field and the fix, so that a typo
never surfaces halfway through a round.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from fl_tasks.aggregation.names import STRATEGY_NAMES, STRATEGY_PARAMS
from fl_tasks.protocol import NAME_PATTERN as ID_PATTERN

BUCKET_URI_PATTERN = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/([A-Za-z0-9._/-]*))?$")
DATASETS = ("creditcard", "synthetic")


class ConfigError(ValueError):
    """A federation file is invalid; the message names the file, the field and the fix."""

    def __init__(self, source: str, field_path: str, problem: str, fix: str):
        self.source, self.field_path, self.problem, self.fix = source, field_path, problem, fix
        super().__init__(f"{source}: field '{field_path}': {problem}. Fix: {fix}")


@dataclass(frozen=True)
class ClientSpec:
    id: str
    bucket: str  # s3://bucket[/prefix]

    @property
    def bucket_name(self) -> str:
        return BUCKET_URI_PATTERN.fullmatch(self.bucket).group(1)

    @property
    def prefix(self) -> str:
        return (BUCKET_URI_PATTERN.fullmatch(self.bucket).group(2) or "").strip("/")


@dataclass(frozen=True)
class QuorumSpec:
    min_clients: int = 1
    min_fraction: float | None = None  # quorum = max(min_clients, ceil(min_fraction * clients))
    round_timeout_minutes: float = 30.0
    # Once the quorum is in, wait this long for stragglers, then close (never past the
    # deadline); null: keep the round open until the deadline or until every client commits.
    grace_period_minutes: float | None = None
    poll_interval_seconds: float = 10.0


STALENESS_POLICIES = ("reject", "polynomial")


@dataclass(frozen=True)
class StalenessSpec:
    """Updates trained on another base than the round dispatched (staleness s = how many
    registered versions the update's base is behind the round's base)."""

    policy: str = "reject"  # reject | polynomial: weight x (1 + s) ** -exponent (FedAsync, Xie et al. 2019)
    exponent: float = 0.5
    max_staleness: int = 3  # older still: rejected under any policy


@dataclass(frozen=True)
class ModelSpec:
    factory: str = "fraud_mlp"
    input_dim: int = 30
    hidden: tuple[int, ...] = (64, 32)
    batch_norm: bool = True
    seed: int = 0


@dataclass(frozen=True)
class TrainingSpec:
    local_epochs: int = 1
    learning_rate: float = 0.001
    batch_size: int = 512
    proximal_mu: float = 0.0
    codec: str = "fp32"
    # "interval": scheduled and backfill rounds train on their run's data interval only;
    # "all": every round retrains on all local data.
    window: str = "interval"


@dataclass(frozen=True)
class GatesSpec:
    min_roc_auc: float = 0.0
    min_pr_auc: float = 0.0
    max_regression: float = 1.0  # largest allowed ROC-AUC drop against the champion


@dataclass(frozen=True)
class ScreeningSpec:
    """Statistical checks on top of the structural ones (null: off)."""

    max_update_norm: float | None = None  # absolute bound on ||update - base||
    max_norm_ratio: float | None = None  # bound relative to the round's median norm
    min_cosine: float | None = None  # direction against the mean of the other updates


CONN_ID_PLACEHOLDERS = ("{client}", "{federation}")
# After the placeholders are filled in: letters, digits and underscores only, so that the id
# is also a valid environment-variable suffix (AIRFLOW_CONN_<ID>, upper-cased by Airflow).
CONN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,200}$")


@dataclass(frozen=True)
class SecuritySpec:
    """Update signatures (HMAC-SHA256, one key per client; see fl_tasks.signing)."""

    require_signatures: bool = False
    # Airflow connection holding a client's key (its password); '-' in ids becomes '_'.
    signing_key_conn_id: str = "fl_signing_{client}"

    def conn_id(self, federation: str, client_id: str) -> str:
        return (self.signing_key_conn_id.replace("{client}", client_id.replace("-", "_"))
                .replace("{federation}", federation.replace("-", "_")))


@dataclass(frozen=True)
class MlflowSpec:
    model_name: str = ""
    experiment: str = ""
    tracking_uri: str = ""  # empty: MLFLOW_TRACKING_URI from the environment


@dataclass(frozen=True)
class DataSpec:
    dataset: str = "creditcard"
    seed: int = 0
    synthetic_rows: int = 20000


@dataclass(frozen=True)
class FederationSpec:
    federation: str
    coordinator_bucket: str
    clients: tuple[ClientSpec, ...]
    description: str = ""
    schedule: str | None = None
    # The first and last data intervals the schedule (and backfills) may cover.
    start_date: str = "2013-09-01"
    end_date: str | None = None
    aggregation: str = "fedavg"
    aggregation_params: dict = field(default_factory=dict)
    clip_norm: float | None = None  # server-side clipping of ||update - base|| before the strategy
    screening: ScreeningSpec = field(default_factory=ScreeningSpec)
    quorum: QuorumSpec = field(default_factory=QuorumSpec)
    staleness: StalenessSpec = field(default_factory=StalenessSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    gates: GatesSpec = field(default_factory=GatesSpec)
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    data: DataSpec = field(default_factory=DataSpec)
    security: SecuritySpec = field(default_factory=SecuritySpec)
    storage_endpoint_url: str = ""
    source: str = ""

    @property
    def dag_id(self) -> str:
        return f"fl_round__{self.federation.replace('-', '_')}"

    @property
    def model_name(self) -> str:
        return self.mlflow.model_name or f"{self.federation}-global"

    @property
    def experiment_name(self) -> str:
        return self.mlflow.experiment or f"fl/{self.federation}"

    @property
    def endpoint_url(self) -> str | None:
        """S3 endpoint: FL_S3_ENDPOINT_URL wins, so one file serves MinIO, moto and AWS."""
        return os.environ.get("FL_S3_ENDPOINT_URL") or self.storage_endpoint_url or None

    def client(self, client_id: str) -> ClientSpec:
        for c in self.clients:
            if c.id == client_id:
                return c
        raise KeyError(f"client '{client_id}' is not in federation '{self.federation}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(value: Any, expected: Any) -> Any:
    """Coerce YAML scalars to the annotated type; raise TypeError with a readable name."""
    options = get_args(expected)
    if type(None) in options:  # an optional setting: null switches it off
        if value is None:
            return None
        expected = next(option for option in options if option is not type(None))
    if expected is bool:
        if not isinstance(value, bool):
            raise TypeError("true or false")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError("a number")
        return float(value)
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError("a whole number")
        return value
    if expected is str:
        if not isinstance(value, str):
            raise TypeError("a string")
        return value
    if expected == tuple[int, ...]:
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise TypeError("a list of whole numbers")
        return tuple(value)
    raise AssertionError(f"unsupported field type {expected}")


def _section(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix, f"expected a mapping, got {type(raw).__name__}",
                          f"write '{prefix}:' followed by indented 'key: value' lines")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed fields: {', '.join(names)}"
            raise ConfigError(source, f"{prefix}.{key}", "unknown field", hint)
        try:
            values[key] = _check_type(value, hints[key])
        except TypeError as exc:
            raise ConfigError(source, f"{prefix}.{key}", f"expected {exc}, got {value!r}",
                              f"set '{prefix}.{key}' to {exc}") from None
    return cls(**values)


def _require(cond: bool, source: str, field_path: str, problem: str, fix: str) -> None:
    if not cond:
        raise ConfigError(source, field_path, problem, fix)


TOP_LEVEL = ("federation", "description", "schedule", "start_date", "end_date", "coordinator", "storage", "clients",
             "quorum", "staleness", "aggregation", "screening", "model", "training", "gates", "mlflow", "data",
             "security")


def parse_federation(raw: Any, source: str = "<federation>") -> FederationSpec:
    """Validate a parsed YAML document and build the spec."""
    _require(isinstance(raw, dict), source, "<root>", "the file is not a YAML mapping",
             "start the file with 'federation: <name>'")
    for key in raw:
        if key not in TOP_LEVEL:
            close = difflib.get_close_matches(str(key), TOP_LEVEL, n=1)
            raise ConfigError(source, str(key), "unknown field",
                              f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(TOP_LEVEL)}")

    name = raw.get("federation")
    _require(isinstance(name, str) and bool(ID_PATTERN.fullmatch(name)), source, "federation",
             f"{name!r} is not a valid federation name",
             "use 1-40 lowercase letters, digits and dashes, e.g. 'banks-eu'")

    coordinator = raw.get("coordinator") or {}
    _require(isinstance(coordinator, dict) and isinstance(coordinator.get("bucket"), str)
             and bool(BUCKET_URI_PATTERN.fullmatch(f"s3://{coordinator.get('bucket')}")),
             source, "coordinator.bucket", "missing or not a valid S3 bucket name",
             "set 'coordinator: {bucket: fl-coordinator}' (the coordinator's own bucket)")

    storage = raw.get("storage") or {}
    _require(isinstance(storage, dict) and set(storage) <= {"endpoint_url"}, source, "storage",
             "only 'endpoint_url' is allowed", "remove the other keys")
    endpoint = storage.get("endpoint_url") or ""
    _require(isinstance(endpoint, str), source, "storage.endpoint_url", "expected a URL string",
             "e.g. 'http://minio:9000', or leave it out for AWS")

    raw_clients = raw.get("clients")
    _require(isinstance(raw_clients, list) and len(raw_clients) > 0, source, "clients",
             "at least one client is required", "list clients as '- {id: bank-a, bucket: s3://bank-a}'")
    clients = []
    for i, item in enumerate(raw_clients):
        where = f"clients[{i}]"
        _require(isinstance(item, dict) and set(item) == {"id", "bucket"}, source, where,
                 "each client needs exactly 'id' and 'bucket'", "write '- {id: bank-a, bucket: s3://bank-a}'")
        _require(isinstance(item["id"], str) and bool(ID_PATTERN.fullmatch(item["id"])), source, f"{where}.id",
                 f"{item['id']!r} is not a valid client id",
                 "use 1-40 lowercase letters, digits and dashes (no slashes or dots)")
        _require(isinstance(item["bucket"], str) and bool(BUCKET_URI_PATTERN.fullmatch(item["bucket"])),
                 source, f"{where}.bucket", f"{item['bucket']!r} is not an S3 URI", "write it as 's3://bucket[/prefix]'")
        clients.append(ClientSpec(id=item["id"], bucket=item["bucket"].rstrip("/")))
    ids = [c.id for c in clients]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    _require(not dupes, source, "clients", f"duplicate client ids {dupes}", "give every client a unique id")

    aggregation, aggregation_params, clip_norm, min_updates = _parse_aggregation(raw.get("aggregation", "fedavg"),
                                                                                 source)
    _require(min_updates <= len(clients), source, "aggregation.params",
             f"{aggregation} with {aggregation_params} needs at least {min_updates} client updates, "
             f"but the federation has {len(clients)} clients", "lower f (or m), or add clients")
    schedule = raw.get("schedule")
    _require(schedule is None or isinstance(schedule, str), source, "schedule",
             "expected a cron expression or preset", "e.g. '@daily' or '0 3 * * *', or leave it out")

    dates = {}
    for key, default in (("start_date", "2013-09-01"), ("end_date", None)):
        value = raw.get(key, default)
        if isinstance(value, (datetime, date)):
            value = value.isoformat()
        if value is not None:
            try:
                datetime.fromisoformat(str(value))
            except ValueError:
                raise ConfigError(source, key, f"{value!r} is not a date", "write it as YYYY-MM-DD") from None
        dates[key] = None if value is None else str(value)
    if dates["end_date"] is not None:
        _require(dates["end_date"] > dates["start_date"], source, "end_date", "is not after start_date",
                 "set an end_date later than start_date, or leave it out")

    spec = FederationSpec(
        federation=name,
        description=str(raw.get("description", "")),
        schedule=schedule,
        start_date=dates["start_date"],
        end_date=dates["end_date"],
        coordinator_bucket=coordinator["bucket"],
        storage_endpoint_url=endpoint,
        clients=tuple(clients),
        aggregation=aggregation,
        aggregation_params=aggregation_params,
        clip_norm=clip_norm,
        screening=_section(ScreeningSpec, raw.get("screening"), source, "screening"),
        quorum=_section(QuorumSpec, raw.get("quorum"), source, "quorum"),
        staleness=_section(StalenessSpec, raw.get("staleness"), source, "staleness"),
        model=_section(ModelSpec, raw.get("model"), source, "model"),
        training=_section(TrainingSpec, raw.get("training"), source, "training"),
        gates=_section(GatesSpec, raw.get("gates"), source, "gates"),
        mlflow=_section(MlflowSpec, raw.get("mlflow"), source, "mlflow"),
        data=_section(DataSpec, raw.get("data"), source, "data"),
        security=_section(SecuritySpec, raw.get("security"), source, "security"),
        source=source,
    )
    _validate_values(spec, source)
    return spec


def _parse_aggregation(raw: Any, source: str) -> tuple[str, dict, float | None, int]:
    """`aggregation: krum`, or a mapping {strategy, params, clip_norm}."""
    where = "aggregation" if isinstance(raw, str) else "aggregation.strategy"
    if isinstance(raw, str):
        raw = {"strategy": raw}
    _require(isinstance(raw, dict) and set(raw) <= {"strategy", "params", "clip_norm"}, source, "aggregation",
             "expected a strategy name or a mapping with strategy, params, clip_norm",
             "e.g. 'aggregation: {strategy: krum, params: {f: 1}}'")
    name, params, clip = raw.get("strategy", "fedavg"), raw.get("params") or {}, raw.get("clip_norm")
    _require(name in STRATEGY_NAMES, source, where, f"unknown strategy {name!r}",
             f"choose one of {', '.join(STRATEGY_NAMES)}")
    _require(isinstance(params, dict), source, "aggregation.params", "expected a mapping", "e.g. '{f: 1}'")
    allowed = STRATEGY_PARAMS.get(name, ())
    for key, value in params.items():
        _require(key in allowed, source, f"aggregation.params.{key}", f"{name} has no parameter {key!r}",
                 f"allowed: {', '.join(allowed) or 'none'}")
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), source,
                 f"aggregation.params.{key}", f"expected a number, got {value!r}", "write a number")
    _require(clip is None or (isinstance(clip, (int, float)) and not isinstance(clip, bool) and clip > 0), source,
             "aggregation.clip_norm", f"{clip!r} is not a positive number", "e.g. 10.0, or leave it out")
    try:
        from fl_tasks.aggregation import build

        strategy = build(name, **params)
    except ValueError as exc:
        raise ConfigError(source, "aggregation.params", str(exc), "fix the parameter values") from None
    return name, dict(params), None if clip is None else float(clip), strategy.min_updates


def _validate_values(spec: FederationSpec, source: str) -> None:
    q, t, g = spec.quorum, spec.training, spec.gates
    _require(1 <= q.min_clients <= len(spec.clients), source, "quorum.min_clients",
             f"{q.min_clients} is outside 1..{len(spec.clients)} (the number of clients)",
             f"set it between 1 and {len(spec.clients)}")
    _require(q.round_timeout_minutes > 0, source, "quorum.round_timeout_minutes", "must be positive",
             "e.g. 30")
    _require(q.min_fraction is None or 0 < q.min_fraction <= 1, source, "quorum.min_fraction",
             f"{q.min_fraction} is outside (0, 1]", "e.g. 0.6 for three clients in five, or leave it out")
    _require(q.grace_period_minutes is None or q.grace_period_minutes >= 0, source, "quorum.grace_period_minutes",
             "must not be negative", "e.g. 5, or leave it out to wait until the deadline")
    st = spec.staleness
    _require(st.policy in STALENESS_POLICIES, source, "staleness.policy", f"unknown policy {st.policy!r}",
             f"choose one of {', '.join(STALENESS_POLICIES)}")
    _require(st.exponent >= 0, source, "staleness.exponent", "must not be negative", "e.g. 0.5")
    _require(st.max_staleness >= 1, source, "staleness.max_staleness", "must be at least 1", "e.g. 3")
    _require(q.poll_interval_seconds > 0, source, "quorum.poll_interval_seconds", "must be positive", "e.g. 10")
    _require(t.local_epochs >= 1, source, "training.local_epochs", "must be at least 1", "e.g. 1")
    _require(0 < t.learning_rate < 1, source, "training.learning_rate", "must be in (0, 1)", "e.g. 0.001")
    _require(t.batch_size >= 1, source, "training.batch_size", "must be at least 1", "e.g. 512")
    _require(t.proximal_mu >= 0, source, "training.proximal_mu", "must not be negative", "0 disables it")
    _require(t.codec == "fp32", source, "training.codec", f"unsupported codec {t.codec!r}", "use 'fp32'")
    _require(t.window in ("interval", "all"), source, "training.window", f"unknown window {t.window!r}",
             "use 'interval' (train on the run's data interval) or 'all'")
    for name in ("min_roc_auc", "min_pr_auc", "max_regression"):
        value = getattr(g, name)
        _require(0 <= value <= 1, source, f"gates.{name}", f"{value} is outside 0..1", "use a fraction, e.g. 0.9")
    _require(spec.model.factory == "fraud_mlp", source, "model.factory",
             f"unknown model factory {spec.model.factory!r}", "use 'fraud_mlp'")
    _require(spec.model.input_dim >= 1 and all(h >= 1 for h in spec.model.hidden), source, "model",
             "sizes must be positive", "e.g. input_dim: 30, hidden: [64, 32]")
    template = spec.security.signing_key_conn_id
    _require(template.count("{client}") == 1, source, "security.signing_key_conn_id",
             f"{template!r} does not contain '{{client}}' exactly once (each client needs its own key)",
             "e.g. 'fl_signing_{client}' or 'fl_{federation}_{client}'")
    filled = template.replace("{client}", "x").replace("{federation}", "x")
    _require(bool(CONN_ID_PATTERN.fullmatch(filled)), source, "security.signing_key_conn_id",
             f"{template!r} is not a usable Airflow connection id",
             "use letters, digits, underscores and the placeholders {client} and {federation} "
             "(ids must also work as AIRFLOW_CONN_<ID> variable names)")
    _require(spec.data.dataset in DATASETS, source, "data.dataset", f"unknown dataset {spec.data.dataset!r}",
             f"choose one of {', '.join(DATASETS)}")


def load_federation(path: str | os.PathLike) -> FederationSpec:
    """Read and validate one federation file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), "<file>", f"cannot be read ({exc.strerror})", "check the path") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "<file>"
        raise ConfigError(str(path), where, "is not valid YAML", "fix the syntax near that line") from None
    return parse_federation(raw, str(path))


def load_federations(folder: str | os.PathLike) -> list[FederationSpec]:
    """Every `*.yaml` in a folder, sorted by file name; names must be unique."""
    specs = [load_federation(p) for p in sorted(Path(folder).glob("*.yaml"))]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.federation in seen:
            raise ConfigError(spec.source, "federation", f"name {spec.federation!r} is also used by {seen[spec.federation]}",
                              "give each federation file a unique name")
        seen[spec.federation] = spec.source
    return specs
