"""Federation spec: one YAML file per federation, loaded into validated, frozen objects.

A bad file fails at load time with the file, the dotted field and the fix, so that a typo
never surfaces halfway through a round. The per-round settings take their defaults and
bounds from `fl_tasks.settings`; the task is named here and imported where it runs
(`FederationSpec.load_task`), so that reading a file never imports torch.
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

from fl_tasks.aggregation.parameters import STRATEGY_NAMES, STRATEGY_PARAMS, min_updates, strategy_values
from fl_tasks.contract import COLUMN_TYPES, LABEL_TYPES, Column, DataContract
from fl_tasks.protocol import NAME_PATTERN as ID_PATTERN
from fl_tasks.protocol.drift import REFERENCES as DRIFT_REFERENCES, DriftSettings
from fl_tasks.protocol.personalization import PersonalizationSettings
from fl_tasks.settings import ROUND_SETTINGS, SETTINGS_BY_PATH, default

BUCKET_URI_PATTERN = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/([A-Za-z0-9._/-]*))?$")
ENTRYPOINT_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
# An Airflow connection id (also usable as an AIRFLOW_CONN_<ID> variable name).
CONN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_]{1,200}$")


class ConfigError(ValueError):
    """A federation file is invalid; the message names the file, the field and the fix."""

    def __init__(self, source: str, field_path: str, problem: str, fix: str):
        self.source, self.field_path, self.problem, self.fix = source, field_path, problem, fix
        super().__init__(f"{source}: field '{field_path}': {problem}. Fix: {fix}")


@dataclass(frozen=True)
class ClientSpec:
    id: str
    bucket: str  # s3://bucket[/prefix]
    # A silo's bucket often lives in another organisation's account or on its own endpoint:
    # these override the federation's `storage` settings for this client's objects.
    aws_conn_id: str | None = None
    endpoint_url: str | None = None
    # The most examples this silo can have (its declared size): a larger count is rejected.
    max_examples: int | None = None

    @property
    def bucket_name(self) -> str:
        return BUCKET_URI_PATTERN.fullmatch(self.bucket).group(1)

    @property
    def prefix(self) -> str:
        return (BUCKET_URI_PATTERN.fullmatch(self.bucket).group(2) or "").strip("/")


@dataclass(frozen=True)
class QuorumSpec:
    min_clients: int = default("quorum.min_clients")
    min_fraction: float | None = default("quorum.min_fraction")  # quorum = max(min_clients, ceil(fraction * clients))
    round_timeout_minutes: float = default("quorum.round_timeout_minutes")
    # Once the quorum is in, wait this long for stragglers, then close (never past the
    # deadline); null: keep the round open until the deadline or until every client commits.
    grace_period_minutes: float | None = default("quorum.grace_period_minutes")
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
class TaskSpec:
    """The federation's task (fl_tasks.tasks.api): `module:Class`, its params, the seed of the
    first round's model, and optionally a model the team already runs to start from instead."""

    entrypoint: str = "fl_tasks.tasks.fraud:FraudTask"
    params: dict = field(default_factory=dict)
    seed: int = 0
    # models:/<name>/<version>, models:/<name>@<alias> or s3://.../weights.safetensors
    warm_start: str | None = None


OPTIMIZER_STATES = ("keep", "reset")


@dataclass(frozen=True)
class TrainingSpec:
    local_epochs: int = default("training.local_epochs")
    learning_rate: float = default("training.learning_rate")
    batch_size: int = 512
    proximal_mu: float = 0.0
    # How updates travel (fl_tasks.protocol.codec): fp32 | fp16 | bf16 | int8 | int8:channel | topk:<fraction>
    codec: str = "fp32"
    # constant | cosine: the learning rate over each round's local steps (fl_tasks.tasks.training)
    lr_schedule: str = "constant"
    # keep: each silo keeps its optimiser's moments between rounds (fl_tasks.silo.optimizer_state);
    # reset: a fresh optimiser every round
    optimizer_state: str = "keep"
    # "interval": scheduled and backfill rounds train on their run's data interval only;
    # "all": every round retrains on all local data.
    window: str = "interval"


@dataclass(frozen=True)
class GatesSpec:
    # metric -> threshold: at least this, or at most for a metric where lower is better
    thresholds: dict = field(default_factory=dict)
    # largest drop of the task's primary metric allowed against the champion
    max_regression: float = default("gates.max_regression")


@dataclass(frozen=True)
class ScreeningSpec:
    """Statistical checks on top of the structural ones (null: off)."""

    max_update_norm: float | None = None  # absolute bound on ||update - base||
    # Relative to the round's median norm: a scaled or sign-flipped update is many times the
    # others' size, honest silos of different sizes stay within a few times of each other.
    max_norm_ratio: float | None = 5.0
    min_cosine: float | None = None  # direction against the mean of the other updates
    # On by default, nearly free when nobody attacks (see the README's failure modes):
    max_abs_value: float = 1e6  # any weight's magnitude, whatever else is off
    min_norm_ratio: float | None = 0.01  # free riders: norm below this x the round's median
    max_example_growth: float | None = 10.0  # num_examples over this x the silo's recent median


CONN_ID_PLACEHOLDERS = ("{client}", "{federation}")


@dataclass(frozen=True)
class SecuritySpec:
    """Update signatures (HMAC-SHA256, one key per client; see fl_tasks.protocol.signing)."""

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
class SimulationSpec:
    """Only for fl-simulate, `make demo` and the tests: which of the task's example data sets
    the simulated silos split, and how."""

    source: str = "synthetic"  # a name the task's example_data knows
    rows: int = 20000
    seed: int = 0


@dataclass(frozen=True)
class DriftSpec:
    """Drift at the silos (evidently): each round every silo compares the window it trains on
    with a reference window over `columns` (default: the contract's features) and sends the
    scores with its update. `action`: what the coordinator does with a silo whose data
    drifted: off (recorded only), warn (recorded and alerted) or block (no promotion)."""

    reference: str = "first"  # first | previous | fixed
    reference_window: dict = field(default_factory=dict)  # {start, end} for `fixed`
    columns: tuple[str, ...] = ()
    drift_share: float = 0.5  # evidently's share of drifted columns at which a silo's data drifted
    method: str | None = None  # evidently's per-column test (e.g. psi, wasserstein); None: its choice
    threshold: float | None = None
    action: str = "warn"

    def settings(self, contract: DataContract) -> DriftSettings:
        """What the global manifest asks of each silo."""
        window = {k: v.isoformat() if isinstance(v, (date, datetime)) else str(v) for k, v in self.reference_window.items()}
        return DriftSettings(self.reference, window,
                             self.columns or tuple(c.name for c in contract.features), self.drift_share,
                             self.method, self.threshold)


@dataclass(frozen=True)
class MonitoringSpec:
    """The monitoring DAG `fl_monitor__<F>`: on its schedule it reads the latest drift table
    and the champion's federated figures, and starts a round (an asset event) when the share
    of drifted silos reaches `max_drifted_share` or a champion figure crosses `min_metrics`."""

    schedule: str | None = None  # e.g. '@hourly'; null: runs only when triggered
    max_drifted_share: float | None = 0.5
    min_metrics: dict = field(default_factory=dict)  # metric -> the champion's floor (ceiling when lower is better)
    cooldown_minutes: float = 60.0  # no new request this soon after the last one


@dataclass(frozen=True)
class AlertsSpec:
    """When to alert (null: never for that figure) and where: the task log always; e-mail
    through an Airflow SMTP connection and a webhook (an Airflow HTTP connection) when set."""

    min_participation: float | None = 0.6  # committed updates / silos
    max_latency_p95_seconds: float | None = None
    max_metric_drop: float | None = 0.02  # candidate's primary metric below the champion's by more
    on_rollback: bool = True
    email_to: tuple[str, ...] = ()
    smtp_conn_id: str = "smtp_default"
    webhook_conn_id: str | None = None


@dataclass(frozen=True)
class CircuitBreakerSpec:
    """After this many consecutive rounds that failed or rolled back, the next round refuses
    to dispatch until an operator resets the breaker (null: never)."""

    max_consecutive_failures: int | None = 3


PRIVACY_NOISE = ("coordinator", "silos")
PRIVACY_SAMPLING = ("poisson", "fixed", "all")
PRIVACY_ACCOUNTANTS = ("rdp", "pld")
# Strategies that average: client-level DP bounds each silo's share of one mean.
PRIVATE_STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class PrivacySpec:
    """Client-level differential privacy, DP-FedAvg (McMahan et al. 2018): each round samples
    the silos, clips each update's change from the base to `clip_norm`, adds Gaussian noise
    of standard deviation noise_multiplier x clip_norm to their sum (at the coordinator, or
    split across the silos), and divides by the expected number of silos. Every released
    round is an event in the federation's privacy ledger (fl_tasks.coordinator.privacy)."""

    clip_norm: float = 1.0  # C, on ||update - base||
    noise_multiplier: float = 1.0  # z: noise std z x C on the sum of the clipped updates
    noise: str = "coordinator"  # coordinator | silos (each sampled silo adds its share)
    sampling: str = "poisson"  # poisson (each silo with sample_rate) | fixed (sample_size silos) | all
    sample_rate: float = 1.0
    sample_size: int | None = None
    delta: float = 1e-5
    max_epsilon: float | None = None  # dispatch stops before a round would spend past it; null: no limit
    accountant: str = "rdp"  # rdp | pld (dp-accounting's)

    def expected_silos(self, population: int) -> float:
        """The fixed denominator of the noisy mean: the expected number of sampled silos."""
        if self.sampling == "poisson":
            return self.sample_rate * population
        return float(self.sample_size if self.sampling == "fixed" else population)


@dataclass(frozen=True)
class PersonalizationSpec:
    """Personal models at the silos (fl_tasks.protocol.personalization, fl_tasks.silo.personal):
    each silo scores its personal model beside the global one in the federated evaluation,
    serves whichever wins on its own rows, and reports the lineage. The weights stay at the
    silo unless `share_weights` opts in (then they are logged to the coordinator's MLflow)."""

    strategy: str = "finetune"  # finetune | fedbn | ditto
    # The rest default to the protocol's values (PersonalizationSettings, where they are explained).
    layers: str = PersonalizationSettings.layers  # finetune: all | head
    epochs: int = PersonalizationSettings.epochs
    learning_rate: float | None = None  # None: training.learning_rate
    batch_size: int = PersonalizationSettings.batch_size
    ditto_lambda: float = PersonalizationSettings.ditto_lambda
    local_only: bool = PersonalizationSettings.local_only
    share_weights: bool = PersonalizationSettings.share_weights


DEFAULT_MIN_SILOS = 2  # evaluations a round needs unless the file says otherwise (1 with a single client)


@dataclass(frozen=True)
class FederatedEvaluationSpec:
    """The gates on the silos' own data: each silo that took part scores the candidate and the
    champion on its evaluation share, the rows it never trains on. All but holdout_fraction
    are per-round settings (fl_tasks.settings)."""

    holdout_fraction: float = 0.2  # share of each silo's rows kept out of training
    min_silos: int = default("evaluation.federated.min_silos")
    timeout_minutes: float = default("evaluation.federated.timeout_minutes")
    statistic: str = default("evaluation.federated.statistic")  # mean | median
    max_silo_regression: float | None = default("evaluation.federated.max_silo_regression")


@dataclass(frozen=True)
class EvaluationSpec:
    """Where the quality gates get their numbers: the silos (`federated`, on unless set to
    false), the coordinator's own labelled rows (`coordinator_data`), or both."""

    federated: FederatedEvaluationSpec | None = field(default_factory=FederatedEvaluationSpec)
    # A URI of rows the coordinator owns (s3://... or a local .parquet/.csv), read through the
    # data contract; empty: none.
    coordinator_data: str = ""

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(name for name, on in (("federated", self.federated is not None),
                                           ("coordinator", bool(self.coordinator_data))) if on)


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
    task: TaskSpec = field(default_factory=TaskSpec)
    contract: DataContract | None = None
    aggregation: str = default("aggregation.strategy")
    aggregation_params: dict = field(default_factory=dict)
    clip_norm: float | None = None  # server-side clipping of ||update - base|| before the strategy
    # No silo's share of a weighted strategy's weights above this; the excess goes to the others.
    max_weight_share: float | None = 0.5
    # Sharded aggregation (fl_tasks.aggregation.sharded): the round's model is aggregated in this
    # many slices by mapped tasks, each reading only its byte ranges of every update; 1: one task.
    shards: int = 1
    screening: ScreeningSpec = field(default_factory=ScreeningSpec)
    quorum: QuorumSpec = field(default_factory=QuorumSpec)
    staleness: StalenessSpec = field(default_factory=StalenessSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    gates: GatesSpec = field(default_factory=GatesSpec)
    mlflow: MlflowSpec = field(default_factory=MlflowSpec)
    simulation: SimulationSpec = field(default_factory=SimulationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    security: SecuritySpec = field(default_factory=SecuritySpec)
    drift: DriftSpec | None = field(default_factory=DriftSpec)  # None: the silos compute no drift
    monitoring: MonitoringSpec = field(default_factory=MonitoringSpec)
    alerts: AlertsSpec = field(default_factory=AlertsSpec)
    circuit_breaker: CircuitBreakerSpec = field(default_factory=CircuitBreakerSpec)
    privacy: PrivacySpec | None = None  # None: no differential privacy
    personalization: PersonalizationSpec | None = None  # None: the silos serve the global model
    storage_endpoint_url: str = ""
    storage_aws_conn_id: str | None = None  # Airflow connection for the coordinator's S3 access
    source: str = ""

    def _airflow_name(self, kind: str) -> str:
        """`fl_<kind>__<federation>`, dashes as underscores: Airflow's DAG and asset names."""
        return f"fl_{kind}__{self.federation.replace('-', '_')}"

    @property
    def dag_id(self) -> str:
        return self._airflow_name("round")

    @property
    def evaluation_dag_id(self) -> str:
        return self._airflow_name("evaluate")

    @property
    def monitor_dag_id(self) -> str:
        return self._airflow_name("monitor")

    @property
    def retrain_asset_name(self) -> str:
        """The asset whose events start a round (the monitoring DAG emits them), and its URI."""
        return self._airflow_name("retrain")

    @property
    def retrain_asset_uri(self) -> str:
        return f"x-fl://{self.federation}/retrain"

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

    def round_defaults(self) -> dict[str, Any]:
        """The file's value of every per-round setting (fl_tasks.settings), by name."""
        values = {"aggregation.strategy": self.aggregation, "aggregation.params": dict(self.aggregation_params)}
        for setting in ROUND_SETTINGS:
            if setting.path not in values:
                found: Any = self
                for name in setting.path.split("."):
                    found = getattr(found, name)
                    if found is None:  # a section switched off (federated evaluation): the built-in default
                        found = setting.default
                        break
                values[setting.path] = found
        return {SETTINGS_BY_PATH[path].name: value for path, value in values.items()}

    def load_task(self):
        """The task object (imports the task's module: torch and all). Raises ConfigError
        naming `task.entrypoint` or `task.params` when it does not import or fit the API."""
        from fl_tasks.tasks.api import TaskError, import_task_class, load_task

        field_path = "task.entrypoint"  # until the class imports and fits the API; then its params
        try:
            import_task_class(self.task.entrypoint)
            field_path = "task.params"
            return load_task(self.task.entrypoint, self.task.params, self.contract)
        except TaskError as exc:
            raise ConfigError(self.source, field_path, str(exc).split("; ")[0],
                              "; ".join(str(exc).split("; ")[1:]) or "fix the task") from None

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
    if expected is dict:
        if not isinstance(value, dict):
            raise TypeError("a mapping")
        return dict(value)
    if expected == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise TypeError("a list of names")
        return tuple(value)
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
             "quorum", "staleness", "aggregation", "screening", "task", "training", "gates", "mlflow", "data",
             "simulation", "evaluation", "security", "drift", "monitoring", "alerts", "circuit_breaker",
             "privacy", "personalization")
CLIENT_FIELDS = ("id", "bucket", "aws_conn_id", "endpoint_url", "max_examples")


def parse_federation(raw: Any, source: str = "<federation>") -> FederationSpec:
    """Validate a parsed YAML document and build the spec."""
    _require(isinstance(raw, dict), source, "<root>", "the file is not a YAML mapping",
             "start the file with 'federation: <name>'")
    for key in raw:
        _require(key != "validation", source, "validation", "the section was renamed",
                 "write 'evaluation: {coordinator_data: <your URI>}' (and 'federated: false' to gate on those "
                 "rows alone)")
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
    _require(isinstance(storage, dict) and set(storage) <= {"endpoint_url", "aws_conn_id"}, source, "storage",
             "only 'endpoint_url' and 'aws_conn_id' are allowed", "remove the other keys")
    endpoint = storage.get("endpoint_url") or ""
    _require(isinstance(endpoint, str), source, "storage.endpoint_url", "expected a URL string",
             "e.g. 'http://minio:9000', or leave it out for AWS")
    _check_conn_id(storage.get("aws_conn_id"), source, "storage.aws_conn_id")

    raw_clients = raw.get("clients")
    _require(isinstance(raw_clients, list) and len(raw_clients) > 0, source, "clients",
             "at least one client is required", "list clients as '- {id: bank-a, bucket: s3://bank-a}'")
    clients = []
    for i, item in enumerate(raw_clients):
        where = f"clients[{i}]"
        _require(isinstance(item, dict) and {"id", "bucket"} <= set(item) <= set(CLIENT_FIELDS), source, where,
                 f"each client needs 'id' and 'bucket' (and may set {', '.join(CLIENT_FIELDS[2:])})",
                 "write '- {id: bank-a, bucket: s3://bank-a}'")
        _require(isinstance(item["id"], str) and bool(ID_PATTERN.fullmatch(item["id"])), source, f"{where}.id",
                 f"{item['id']!r} is not a valid client id",
                 "use 1-40 lowercase letters, digits and dashes (no slashes or dots)")
        _require(isinstance(item["bucket"], str) and bool(BUCKET_URI_PATTERN.fullmatch(item["bucket"])),
                 source, f"{where}.bucket", f"{item['bucket']!r} is not an S3 URI", "write it as 's3://bucket[/prefix]'")
        _check_conn_id(item.get("aws_conn_id"), source, f"{where}.aws_conn_id")
        _require(item.get("endpoint_url") is None or isinstance(item["endpoint_url"], str), source,
                 f"{where}.endpoint_url", "expected a URL string", "e.g. 'https://s3.bank-a.example', or leave it out")
        size = item.get("max_examples")
        _require(size is None or (isinstance(size, int) and not isinstance(size, bool) and size >= 1), source,
                 f"{where}.max_examples", f"{size!r} is not a positive whole number",
                 "the most rows this client can train on, e.g. 250000, or leave it out")
        clients.append(ClientSpec(id=item["id"], bucket=item["bucket"].rstrip("/"), aws_conn_id=item.get("aws_conn_id"),
                                  endpoint_url=item.get("endpoint_url"), max_examples=size))
    ids = [c.id for c in clients]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    _require(not dupes, source, "clients", f"duplicate client ids {dupes}", "give every client a unique id")

    aggregation, aggregation_params, clip_norm, max_weight_share, min_updates, shards = _parse_aggregation(
        raw.get("aggregation", default("aggregation.strategy")), source)
    _require(min_updates <= len(clients), source, "aggregation.params",
             f"{aggregation} with {aggregation_params} needs at least {min_updates} client updates, "
             f"but the federation has {len(clients)} clients", "lower f (or m), or add clients")
    schedule = raw.get("schedule")
    _require(schedule is None or isinstance(schedule, str), source, "schedule",
             "expected a cron expression or preset", "e.g. '@daily' or '0 3 * * *', or leave it out")

    dates = {}
    for key, fallback in (("start_date", "2013-09-01"), ("end_date", None)):
        value = raw.get(key, fallback)
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
        storage_aws_conn_id=storage.get("aws_conn_id"),
        task=_parse_task(raw.get("task"), source),
        contract=_parse_contract(raw.get("data"), source),
        clients=tuple(clients),
        aggregation=aggregation,
        aggregation_params=aggregation_params,
        clip_norm=clip_norm,
        max_weight_share=max_weight_share,
        shards=shards,
        screening=_section(ScreeningSpec, raw.get("screening"), source, "screening"),
        quorum=_section(QuorumSpec, raw.get("quorum"), source, "quorum"),
        staleness=_section(StalenessSpec, raw.get("staleness"), source, "staleness"),
        training=_section(TrainingSpec, raw.get("training"), source, "training"),
        gates=_section(GatesSpec, raw.get("gates"), source, "gates"),
        mlflow=_section(MlflowSpec, raw.get("mlflow"), source, "mlflow"),
        simulation=_section(SimulationSpec, raw.get("simulation"), source, "simulation"),
        evaluation=_parse_evaluation(raw.get("evaluation"), source, len(clients)),
        security=_section(SecuritySpec, raw.get("security"), source, "security"),
        drift=None if raw.get("drift", {}) is False else _section(DriftSpec, raw.get("drift"), source, "drift"),
        monitoring=_section(MonitoringSpec, raw.get("monitoring"), source, "monitoring"),
        alerts=_section(AlertsSpec, raw.get("alerts"), source, "alerts"),
        circuit_breaker=_section(CircuitBreakerSpec, raw.get("circuit_breaker"), source, "circuit_breaker"),
        privacy=None if raw.get("privacy") in (None, False) else _section(PrivacySpec, raw["privacy"], source,
                                                                          "privacy"),
        personalization=None if raw.get("personalization") in (None, False) else _section(
            PersonalizationSpec, raw["personalization"], source, "personalization"),
        source=source,
    )
    _validate_values(spec, source)
    return spec


def _parse_aggregation(raw: Any, source: str) -> tuple[str, dict, float | None, float | None, int, int]:
    """`aggregation: krum`, or a mapping {strategy, params, clip_norm, max_weight_share, shards}."""
    where = "aggregation" if isinstance(raw, str) else "aggregation.strategy"
    if isinstance(raw, str):
        raw = {"strategy": raw}
    _require(isinstance(raw, dict) and set(raw) <= {"strategy", "params", "clip_norm", "max_weight_share", "shards"},
             source, "aggregation",
             "expected a strategy name or a mapping with strategy, params, clip_norm, max_weight_share, shards",
             "e.g. 'aggregation: {strategy: krum, params: {f: 1}}'")
    name, params, clip = raw.get("strategy", default("aggregation.strategy")), raw.get("params") or {}, raw.get("clip_norm")
    share = raw.get("max_weight_share", 0.5)
    shards = raw.get("shards", 1)
    _require(isinstance(shards, int) and not isinstance(shards, bool) and shards >= 1, source, "aggregation.shards",
             f"{shards!r} is not a whole number >= 1",
             "e.g. 4 to aggregate a large model in 4 mapped tasks, or 1 (the default) for one task")
    _require(share is None or (isinstance(share, (int, float)) and not isinstance(share, bool) and 0 < share <= 1),
             source, "aggregation.max_weight_share", f"{share!r} is not a share in (0, 1]",
             "e.g. 0.5, or null to let example counts alone decide the weights")
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
        values = strategy_values(name, params)
    except ValueError as exc:
        raise ConfigError(source, "aggregation.params", str(exc), "fix the parameter values") from None
    return (name, dict(params), None if clip is None else float(clip), None if share is None else float(share),
            min_updates(name, values), shards)


def _parse_evaluation(raw: Any, source: str, num_clients: int) -> EvaluationSpec:
    """`evaluation: {federated: {...} | true | false, coordinator_data: URI}`; federated is on by
    default, with `min_silos` 2 (1 in a one-client federation)."""
    if raw is None:
        raw = {}
    _require(isinstance(raw, dict) and set(raw) <= {"federated", "coordinator_data"}, source, "evaluation",
             "allowed fields: federated, coordinator_data", "e.g. 'evaluation: {federated: {min_silos: 3}}'")
    federated = raw.get("federated", {})
    if federated is True:
        federated = {}
    if isinstance(federated, dict) and "min_silos" not in federated:
        federated = {**federated, "min_silos": min(DEFAULT_MIN_SILOS, num_clients)}
    data = raw.get("coordinator_data") or ""
    _require(isinstance(data, str), source, "evaluation.coordinator_data", f"expected a URI, got {data!r}",
             "e.g. 's3://fl-coordinator/banks/holdout.parquet'")
    return EvaluationSpec(
        federated=None if federated in (False, None) else _section(FederatedEvaluationSpec, federated, source,
                                                                    "evaluation.federated"),
        coordinator_data=data)


def _check_conn_id(value: Any, source: str, field_path: str) -> None:
    _require(value is None or (isinstance(value, str) and bool(CONN_ID_PATTERN.fullmatch(value))), source, field_path,
             f"{value!r} is not an Airflow connection id", "use letters, digits and underscores, e.g. 'aws_bank_a'")


def _parse_task(raw: Any, source: str) -> TaskSpec:
    task = _section(TaskSpec, raw, source, "task")
    _require(bool(ENTRYPOINT_PATTERN.fullmatch(task.entrypoint)), source, "task.entrypoint",
             f"{task.entrypoint!r} is not 'module:Class'", "e.g. 'fraud_banks.task:FraudTask'")
    _require(task.warm_start is None or re.fullmatch(r"models:/[^/@]+(/\d+|@[A-Za-z0-9_-]+)", task.warm_start)
             is not None or BUCKET_URI_PATTERN.fullmatch(task.warm_start) is not None, source, "task.warm_start",
             f"{task.warm_start!r} is neither an MLflow model version nor an s3:// weights URI",
             "write 'models:/<name>/<version>', 'models:/<name>@<alias>' or 's3://bucket/path/weights.safetensors'")
    return task


def _parse_column(raw: Any, source: str, where: str, types: tuple[str, ...]) -> list[Column]:
    """One contract entry: {name, type, ...}, or {names: [...], type, ...} for several columns."""
    allowed = {"name", "names", "type", "categories", "max_missing_share", "max_unknown_share"}
    _require(isinstance(raw, dict), source, where, "expected a mapping",
             "write '{name: amount, type: numeric}'")
    unknown = sorted(set(raw) - allowed)
    _require(not unknown, source, f"{where}.{unknown[0] if unknown else ''}", "unknown field",
             f"allowed fields: {', '.join(sorted(allowed))}")
    names = raw.get("names", [raw.get("name")]) if "names" in raw else [raw.get("name")]
    _require(("name" in raw) != ("names" in raw), source, where, "needs exactly one of 'name' or 'names'",
             "write '{name: amount, type: numeric}' or '{names: [v1, v2], type: numeric}'")
    _require(isinstance(names, list) and names and all(isinstance(n, str) and n for n in names), source,
             f"{where}.{'names' if 'names' in raw else 'name'}", "expected column names", "e.g. 'amount'")
    kind = raw.get("type")
    _require(kind in types, source, f"{where}.type", f"unknown column type {kind!r}", f"choose one of {', '.join(types)}")
    categories = raw.get("categories", [])
    _require(isinstance(categories, list) and all(isinstance(c, str) for c in categories), source,
             f"{where}.categories", "expected a list of strings", "e.g. [web, pos, atm]")
    _require((kind == "categorical") == bool(categories), source, f"{where}.categories",
             "categorical columns need their categories, other types have none",
             "list the known values of a categorical column, e.g. categories: [web, pos, atm]")
    shares = {}
    for key in ("max_missing_share", "max_unknown_share"):
        value = raw.get(key, 0.0)
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1, source,
                 f"{where}.{key}", f"{value!r} is not a share between 0 and 1", "e.g. 0.01")
        shares[key] = float(value)
    return [Column(name=name, type=kind, categories=tuple(categories), **shares) for name in names]


def _parse_contract(raw: Any, source: str) -> DataContract:
    """`data: {contract: {label, event_time, features, allow_extra_columns, min_rows}}`."""
    fix = "declare 'data: {contract: {label: ..., event_time: ..., features: [...]}}' (see the README)"
    _require(isinstance(raw, dict) and set(raw) == {"contract"}, source, "data",
             "expected exactly 'contract' (the columns every silo's rows must have)", fix)
    contract = raw["contract"]
    allowed = ("label", "event_time", "features", "allow_extra_columns", "min_rows")
    _require(isinstance(contract, dict), source, "data.contract", "expected a mapping", fix)
    for key in contract:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            raise ConfigError(source, f"data.contract.{key}", "unknown field",
                              f"did you mean '{close[0]}'?" if close else f"allowed fields: {', '.join(allowed)}")
    label = contract.get("label")
    if isinstance(label, str):
        label = {"name": label, "type": "boolean"}
    [label_column] = _parse_column(label, source, "data.contract.label", LABEL_TYPES) if label is not None else \
        _parse_column({}, source, "data.contract.label", LABEL_TYPES)
    features = contract.get("features")
    _require(isinstance(features, list) and features, source, "data.contract.features",
             "at least one feature column is required", "list them as '- {name: amount, type: numeric}'")
    columns = [c for i, item in enumerate(features)
               for c in _parse_column(item, source, f"data.contract.features[{i}]", COLUMN_TYPES)]
    event_time = contract.get("event_time")
    _require(event_time is None or (isinstance(event_time, str) and event_time), source, "data.contract.event_time",
             "expected a column name", "name the timestamp column that data windows select on, or leave it out")
    names = [c.name for c in columns] + [label_column.name] + ([event_time] if event_time else [])
    dupes = sorted({n for n in names if names.count(n) > 1})
    _require(not dupes, source, "data.contract", f"columns {dupes} are declared twice", "name each column once")
    extra, min_rows = contract.get("allow_extra_columns", False), contract.get("min_rows", 2)
    _require(isinstance(extra, bool), source, "data.contract.allow_extra_columns", "expected true or false",
             "true lets silos have columns the contract does not name")
    _require(isinstance(min_rows, int) and not isinstance(min_rows, bool) and min_rows >= 1, source,
             "data.contract.min_rows", f"{min_rows!r} is not a positive whole number", "e.g. 2")
    return DataContract(label=label_column, features=tuple(columns), event_time=event_time,
                        allow_extra_columns=extra, min_rows=min_rows)


def _check_codec(text: str, source: str) -> None:
    """`training.codec` names an update codec (fl_tasks.protocol.codec)."""
    from fl_tasks.protocol.codec import CODEC_FORMS, Codec, CodecError

    try:
        Codec.parse(text)
    except CodecError as exc:
        raise ConfigError(source, "training.codec", str(exc).split("; allowed:")[0],
                          f"use one of {CODEC_FORMS}; see the README's 'Compressed updates'") from None


def _validate_values(spec: FederationSpec, source: str) -> None:
    q, t = spec.quorum, spec.training
    for name, value in spec.round_defaults().items():
        setting = next(s for s in ROUND_SETTINGS if s.name == name)
        problem = setting.problem(value, len(spec.clients))
        _require(problem is None, source, setting.path, problem or "",
                 f"set '{setting.path}' to {setting.allowed(len(spec.clients))} ({setting.description})")
    for metric, threshold in spec.gates.thresholds.items():
        _require(isinstance(threshold, (int, float)) and not isinstance(threshold, bool), source,
                 f"gates.thresholds.{metric}", f"expected a number, got {threshold!r}",
                 "write the metric's threshold, e.g. 'pr_auc: 0.3'")
    st = spec.staleness
    _require(st.policy in STALENESS_POLICIES, source, "staleness.policy", f"unknown policy {st.policy!r}",
             f"choose one of {', '.join(STALENESS_POLICIES)}")
    _require(st.exponent >= 0, source, "staleness.exponent", "must not be negative", "e.g. 0.5")
    _require(st.max_staleness >= 1, source, "staleness.max_staleness", "must be at least 1", "e.g. 3")
    _require(q.poll_interval_seconds > 0, source, "quorum.poll_interval_seconds", "must be positive", "e.g. 10")
    _require(t.batch_size >= 1, source, "training.batch_size", "must be at least 1", "e.g. 512")
    _require(t.proximal_mu >= 0, source, "training.proximal_mu", "must not be negative", "0 disables it")
    _check_codec(t.codec, source)
    if spec.shards > 1:
        _require(t.codec == "fp32", source, "aggregation.shards",
                 f"sharded aggregation reads byte ranges of full-weight updates, and training.codec is {t.codec!r}",
                 "set training.codec: fp32, or aggregation.shards: 1")
        _require(spec.privacy is None, source, "aggregation.shards", "private rounds (the privacy section) are not "
                 "sharded", "remove aggregation.shards (or set it to 1), or remove the privacy section")
        _require(spec.personalization is None or spec.personalization.strategy != "fedbn", source,
                 "aggregation.shards", "fedbn updates leave out the silos' local tensors, which sharded "
                 "aggregation reads by byte range", "set aggregation.shards: 1 with personalization.strategy: fedbn")
    from fl_tasks.tasks.api import LR_SCHEDULES

    _require(t.lr_schedule in LR_SCHEDULES, source, "training.lr_schedule", f"unknown schedule {t.lr_schedule!r}",
             f"choose one of {', '.join(LR_SCHEDULES)}")
    _require(t.optimizer_state in OPTIMIZER_STATES, source, "training.optimizer_state",
             f"unknown value {t.optimizer_state!r}", "keep (the silos keep Adam's moments between rounds) or reset")
    _require(t.window in ("interval", "all"), source, "training.window", f"unknown window {t.window!r}",
             "use 'interval' (train on the run's data interval) or 'all'")
    _require(t.window == "all" or spec.contract.event_time is not None, source, "training.window",
             "'interval' needs an event-time column in the data contract",
             "set data.contract.event_time, or training.window: all")
    _require(spec.simulation.rows >= 10, source, "simulation.rows", "must be at least 10", "e.g. 20000")
    ev = spec.evaluation
    _require(bool(ev.sources), source, "evaluation", "no source for the quality gates: federated evaluation is off "
             "and no coordinator_data is set", "remove 'federated: false', or set 'evaluation.coordinator_data'")
    _require(not ev.coordinator_data or ev.coordinator_data.startswith("s3://")
             or ("://" not in ev.coordinator_data and ev.coordinator_data.endswith((".parquet", ".csv"))),
             source, "evaluation.coordinator_data",
             f"{ev.coordinator_data!r} is neither an s3:// URI nor a .parquet or .csv file",
             "e.g. 's3://fl-coordinator/banks/holdout/validation.parquet'")
    if ev.federated is not None:
        _require(0 < ev.federated.holdout_fraction < 1, source, "evaluation.federated.holdout_fraction",
                 "must be between 0 and 1", "e.g. 0.2 (a fifth of each silo's rows is kept for evaluation)")
    _validate_observability(spec, source)
    if spec.privacy is not None:
        _validate_privacy(spec, spec.privacy, source)
    if spec.personalization is not None:
        _validate_personalization(spec, spec.personalization, source)
    template = spec.security.signing_key_conn_id
    _require(template.count("{client}") == 1, source, "security.signing_key_conn_id",
             f"{template!r} does not contain '{{client}}' exactly once (each client needs its own key)",
             "e.g. 'fl_signing_{client}' or 'fl_{federation}_{client}'")
    filled = template.replace("{client}", "x").replace("{federation}", "x")
    _require(bool(CONN_ID_PATTERN.fullmatch(filled)), source, "security.signing_key_conn_id",
             f"{template!r} is not a usable Airflow connection id",
             "use letters, digits, underscores and the placeholders {client} and {federation} "
             "(ids must also work as AIRFLOW_CONN_<ID> variable names)")


DRIFT_ACTIONS = ("off", "warn", "block")


def _validate_observability(spec: FederationSpec, source: str) -> None:
    """drift, monitoring, alerts and circuit_breaker."""
    d = spec.drift
    if d is not None:
        _require(d.reference in DRIFT_REFERENCES, source, "drift.reference", f"unknown reference {d.reference!r}",
                 f"choose one of {', '.join(DRIFT_REFERENCES)}")
        _require(set(d.reference_window) <= {"start", "end"}, source, "drift.reference_window",
                 "allowed fields: start, end", "e.g. '{start: 2013-09-01, end: 2013-09-02}'")
        for key, value in d.reference_window.items():
            try:
                datetime.fromisoformat(str(value))
            except ValueError:
                raise ConfigError(source, f"drift.reference_window.{key}", f"{value!r} is not a date or time",
                                  "write it as YYYY-MM-DD or an ISO-8601 time") from None
        _require((d.reference == "fixed") == bool(d.reference_window), source, "drift.reference_window",
                 "is needed with reference 'fixed', and only then",
                 "set 'reference: fixed' with 'reference_window: {start: ..., end: ...}', or remove the window")
        _require(d.reference != "fixed" or spec.contract.event_time is not None, source, "drift.reference",
                 "'fixed' selects rows by event time, and the data contract names no event_time column",
                 "set data.contract.event_time, or use reference 'first' or 'previous'")
        known = {c.name for c in spec.contract.features}
        unknown = [c for c in d.columns if c not in known]
        _require(not unknown, source, "drift.columns", f"{unknown} are not feature columns of the data contract",
                 f"name columns among: {', '.join(sorted(known))}")
        _require(0 < d.drift_share <= 1, source, "drift.drift_share", "must be in (0, 1]",
                 "e.g. 0.5: a silo's data drifted when half its columns did")
        _require(d.action in DRIFT_ACTIONS, source, "drift.action", f"unknown action {d.action!r}",
                 f"choose one of {', '.join(DRIFT_ACTIONS)}")
    m = spec.monitoring
    _require(m.max_drifted_share is None or 0 < m.max_drifted_share <= 1, source, "monitoring.max_drifted_share",
             "must be in (0, 1]", "e.g. 0.5: start a round when half the silos' data drifted")
    for metric, floor in m.min_metrics.items():
        _require(isinstance(floor, (int, float)) and not isinstance(floor, bool), source,
                 f"monitoring.min_metrics.{metric}", f"expected a number, got {floor!r}", "e.g. 'pr_auc: 0.3'")
    _require(m.cooldown_minutes >= 0, source, "monitoring.cooldown_minutes", "must not be negative", "e.g. 60")
    a = spec.alerts
    _require(a.min_participation is None or 0 < a.min_participation <= 1, source, "alerts.min_participation",
             "must be in (0, 1]", "e.g. 0.6, or null for no participation alert")
    _require(a.max_latency_p95_seconds is None or a.max_latency_p95_seconds > 0, source,
             "alerts.max_latency_p95_seconds", "must be positive", "e.g. 600, or null")
    _require(a.max_metric_drop is None or a.max_metric_drop >= 0, source, "alerts.max_metric_drop",
             "must not be negative", "e.g. 0.02, or null")
    _check_conn_id(a.smtp_conn_id, source, "alerts.smtp_conn_id")
    _check_conn_id(a.webhook_conn_id, source, "alerts.webhook_conn_id")
    _require(all("@" in address for address in a.email_to), source, "alerts.email_to", "expects e-mail addresses",
             "e.g. '[ml-platform@bank.example]'")
    k = spec.circuit_breaker.max_consecutive_failures
    _require(k is None or k >= 1, source, "circuit_breaker.max_consecutive_failures", "must be at least 1",
             "e.g. 3, or null to never stop dispatching")


def _validate_personalization(spec: FederationSpec, p: PersonalizationSpec, source: str) -> None:
    from fl_tasks.protocol.personalization import LAYERS, STRATEGIES

    _require(p.strategy in STRATEGIES, source, "personalization.strategy", f"unknown strategy {p.strategy!r}",
             f"choose one of {', '.join(STRATEGIES)}")
    _require(p.layers in LAYERS, source, "personalization.layers", f"unknown value {p.layers!r}",
             "all (fine-tune every layer) or head (the last layer only)")
    _require(1 <= p.epochs <= 100, source, "personalization.epochs", "must be in 1..100", "e.g. 1")
    _require(p.learning_rate is None or 0 < p.learning_rate < 1, source, "personalization.learning_rate",
             "must be in (0, 1)", "e.g. 0.001, or leave it out for training.learning_rate")
    _require(p.batch_size >= 1, source, "personalization.batch_size", "must be at least 1", "e.g. 64")
    _require(p.ditto_lambda >= 0, source, "personalization.ditto_lambda", "must not be negative", "e.g. 0.1")
    _require(spec.evaluation.federated is not None, source, "personalization",
             "personal models are scored in the federated evaluation, which is off",
             "remove 'evaluation.federated: false', or remove personalization")


def _validate_privacy(spec: FederationSpec, p: PrivacySpec, source: str) -> None:
    n = len(spec.clients)
    _require(p.clip_norm > 0, source, "privacy.clip_norm", "must be positive",
             "e.g. 1.0: the largest change from the base one silo's update may make")
    _require(p.noise_multiplier > 0, source, "privacy.noise_multiplier", "must be positive",
             "e.g. 1.0; fl-privacy noise finds the value for a target epsilon")
    _require(p.noise in PRIVACY_NOISE, source, "privacy.noise", f"unknown noise placement {p.noise!r}",
             f"choose one of {', '.join(PRIVACY_NOISE)}")
    _require(p.sampling in PRIVACY_SAMPLING, source, "privacy.sampling", f"unknown sampling {p.sampling!r}",
             f"choose one of {', '.join(PRIVACY_SAMPLING)}")
    _require(0 < p.sample_rate <= 1, source, "privacy.sample_rate", "must be in (0, 1]",
             "e.g. 0.5: each silo takes part in a round with probability one half")
    _require(p.sampling == "poisson" or p.sample_rate == 1.0, source, "privacy.sample_rate",
             f"applies to poisson sampling only, the file sets sampling {p.sampling!r}",
             "remove sample_rate, or set sampling: poisson")
    _require((p.sampling == "fixed") == (p.sample_size is not None), source, "privacy.sample_size",
             "is needed with sampling 'fixed', and only then", "e.g. 'sampling: fixed' with 'sample_size: 3'")
    _require(p.sample_size is None or 1 <= p.sample_size <= n, source, "privacy.sample_size",
             f"must be in 1..{n} (the federation's silos)", f"e.g. {max(1, n // 2)}")
    _require(0 < p.delta < 1, source, "privacy.delta", "must be in (0, 1)",
             "e.g. 1e-5, well below 1 / the number of silos")
    _require(p.max_epsilon is None or p.max_epsilon > 0, source, "privacy.max_epsilon", "must be positive",
             "e.g. 8.0, or null for no budget")
    _require(p.accountant in PRIVACY_ACCOUNTANTS, source, "privacy.accountant", f"unknown accountant {p.accountant!r}",
             f"choose one of {', '.join(PRIVACY_ACCOUNTANTS)}")
    _require(not (p.accountant == "pld" and p.sampling == "fixed"), source, "privacy.accountant",
             "dp-accounting's PLD accountant has no fixed-size sampling",
             "use accountant: rdp, or sampling: poisson")
    _require(spec.aggregation in PRIVATE_STRATEGIES, source, "aggregation.strategy",
             f"{spec.aggregation} does not average the updates, so the privacy section cannot bound a silo's share",
             f"set aggregation: fedavg (or one of {', '.join(PRIVATE_STRATEGIES[1:])}) with privacy")
    expected = p.expected_silos(n)
    _require(expected >= spec.quorum.min_clients, source, "privacy.sample_rate" if p.sampling == "poisson"
             else "privacy.sample_size", f"samples {expected:g} silos a round on average, fewer than "
             f"quorum.min_clients {spec.quorum.min_clients}", "sample more silos, or lower quorum.min_clients")


def federations_dir() -> Path:
    """The folder of federation files: $FL_FEDERATIONS_DIR, else the checkout's `federations/`.
    The DAG file and the Federation page read the same one."""
    return Path(os.environ.get("FL_FEDERATIONS_DIR", Path(__file__).resolve().parent.parent / "federations"))


def error_dag_id(source: str) -> str:
    """The DAG a federation file that does not load becomes: `fl_config_error__<file name>`."""
    return f"fl_config_error__{''.join(c if c.isalnum() else '_' for c in Path(source).stem)}"


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


@dataclass(frozen=True)
class FederationScan:
    """What a folder of federation files holds: the files that load, and why the others do not."""

    specs: list[FederationSpec]
    errors: list[ConfigError]


def scan_federations(folder: str | os.PathLike) -> FederationScan:
    """Every `*.yaml` in a folder, sorted by file name. A file that does not load, or reuses
    another file's federation name, is reported, never raised: one broken file must not
    take the other federations down."""
    specs, errors, seen = [], [], {}
    for path in sorted(Path(folder).glob("*.yaml")):
        try:
            spec = load_federation(path)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if spec.federation in seen:
            errors.append(ConfigError(spec.source, "federation", f"name {spec.federation!r} is also used by "
                                      f"{seen[spec.federation]}", "give each federation file a unique name"))
            continue
        seen[spec.federation] = spec.source
        specs.append(spec)
    return FederationScan(specs, errors)


def load_federations(folder: str | os.PathLike) -> list[FederationSpec]:
    """Every federation file in a folder; the first that does not load raises ConfigError."""
    scan = scan_federations(folder)
    if scan.errors:
        raise scan.errors[0]
    return scan.specs
