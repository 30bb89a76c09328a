"""The bucket protocol: object keys, manifests with a strict schema, hashes, round ids.

For round R of federation F, in each client's bucket (under its optional prefix):

    <F>/rounds/<R>/global/model.safetensors   written by the coordinator
    <F>/rounds/<R>/global/manifest.json       written last: the commit marker
    <F>/rounds/<R>/update/update.safetensors  written by the client
    <F>/rounds/<R>/update/manifest.json       written last: the commit marker
    <F>/rounds/<R>/update/decline.json        instead of an update: "not this round, because ..."
    <F>/rounds/<R>/evaluation/<label>.safetensors  models to score (candidate, champion, ...)
    <F>/rounds/<R>/evaluation/request.json    written last: the evaluation request's commit marker
    <F>/rounds/<R>/evaluation/result.json     the silo's scores on its own evaluation share
    <F>/rounds/<R>/evaluation/decline.json    instead of scores: "not this evaluation, because ..."

A reader trusts a payload only when its manifest is committed and the payload's sha256
matches the manifest. Manifests are RFC 8259 JSON in UTF-8 without a byte-order mark, at
most MAX_MANIFEST_BYTES long, with exactly the fields of their kind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from fl_tasks.protocol.codec import CODEC_FORMS, Codec, CodecError
from fl_tasks.protocol.drift import DriftReport, DriftSchemaError, DriftSettings
from fl_tasks.protocol.personalization import PersonalizationSchemaError, PersonalizationSettings, PersonalReport

PROTOCOL_VERSION = 1
ROUND_ID_PATTERN = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# Client ids and federation names become object-key segments: no slashes, dots or case games.
NAME_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
MAX_MANIFEST_BYTES = 64 * 1024
# Names of the models an evaluation request asks a silo to score: candidate, champion, version-7.
MODEL_LABEL_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,39}$")


class ManifestError(ValueError):
    """A manifest is malformed or breaks the schema; the message names the field."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_round_id(round_id: str) -> str:
    if not isinstance(round_id, str) or not ROUND_ID_PATTERN.fullmatch(round_id):
        raise ValueError(f"round id {round_id!r} must match {ROUND_ID_PATTERN.pattern}")
    return round_id


def round_id_for_interval(start: datetime) -> str:
    """Scheduled and backfill rounds are named after their data interval start."""
    return start.strftime("%Y%m%dT%H%M%S")


def round_id_for_number(number: int) -> str:
    """Manual rounds get the next free number, zero-padded so that names sort in order."""
    return f"{number:06d}"


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p)


def round_prefix(prefix: str, federation: str, round_id: str) -> str:
    return _join(prefix, federation, "rounds", validate_round_id(round_id))


def global_model_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "global/model.safetensors")


def global_manifest_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "global/manifest.json")


def update_payload_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "update/update.safetensors")


def update_manifest_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "update/manifest.json")


def decline_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "update/decline.json")


def evaluation_model_key(prefix: str, federation: str, round_id: str, label: str) -> str:
    if not MODEL_LABEL_PATTERN.fullmatch(label):
        raise ValueError(f"model label {label!r} must match {MODEL_LABEL_PATTERN.pattern}")
    return _join(round_prefix(prefix, federation, round_id), f"evaluation/{label}.safetensors")


def evaluation_request_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "evaluation/request.json")


def evaluation_result_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "evaluation/result.json")


def evaluation_decline_key(prefix: str, federation: str, round_id: str) -> str:
    return _join(round_prefix(prefix, federation, round_id), "evaluation/decline.json")


def personal_weights_key(prefix: str, federation: str, round_id: str) -> str:
    """Where a silo puts its personal weights when the federation opts in (share_weights)."""
    return _join(round_prefix(prefix, federation, round_id), "evaluation/personal.safetensors")


def rounds_listing_prefix(prefix: str, federation: str) -> str:
    return _join(prefix, federation, "rounds") + "/"


# --- manifests -------------------------------------------------------------------------

def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # e.g. 1e999
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    body = dict(pairs)
    if len(body) != len(pairs):
        seen: set[str] = set()
        duplicated = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"duplicate keys {duplicated}")
    return body


def strict_json_loads(data: bytes):
    """RFC 8259 JSON only: UTF-8 without a byte-order mark (json.loads would also take
    UTF-16 and UTF-32), no NaN/Infinity, no numbers that overflow, no duplicate keys
    (readers that keep the first or the last value would see different manifests)."""
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("expected bytes")
    if data.startswith(b"\xef\xbb\xbf"):
        raise ValueError("starts with a byte-order mark; manifests are UTF-8 without one")
    text = bytes(data).decode("utf-8")  # UnicodeDecodeError is a ValueError: UTF-16 and friends end here
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys)


# Field annotations are strings (postponed evaluation); JSON numbers may stand for floats.
_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "dict": (dict,)}


@dataclass(frozen=True)
class _Manifest:
    kind: ClassVar[str] = ""

    def to_json(self) -> bytes:
        body = {"kind": self.kind, "protocol": PROTOCOL_VERSION, **dataclasses.asdict(self)}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "_Manifest":
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{cls.kind} manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        try:
            body = strict_json_loads(data)
        except RecursionError:
            raise ManifestError(f"{cls.kind} manifest is not valid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ManifestError(f"{cls.kind} manifest is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ManifestError(f"{cls.kind} manifest must be a JSON object")
        if body.pop("kind", None) != cls.kind:
            raise ManifestError(f"manifest field 'kind' must be {cls.kind!r}")
        protocol = body.pop("protocol", None)
        if type(protocol) is not int or protocol != PROTOCOL_VERSION:  # true and 1.0 are not 1
            raise ManifestError(f"manifest field 'protocol' must be {PROTOCOL_VERSION}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise ManifestError(f"{cls.kind} manifest has unknown fields {unknown}")
        values = {}
        for name, f in fields.items():
            if name not in body:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ManifestError(f"{cls.kind} manifest is missing field '{name}'")
                continue
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[f.type]):
                raise ManifestError(f"{cls.kind} manifest field '{name}' has type {type(value).__name__}, "
                                    f"expected {f.type}")
            values[name] = value
        manifest = cls(**values)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        raise NotImplementedError


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ManifestError(message)


def _is_codec(text: str) -> bool:
    try:
        Codec.parse(text)
    except CodecError:
        return False
    return True


def _check_personalization(schema: type[PersonalizationSettings] | type[PersonalReport], block: dict,
                           where: str) -> None:
    """An empty personalization block, or one that holds under `schema`."""
    if block:
        try:
            schema.from_dict(block, where)
        except PersonalizationSchemaError as exc:
            raise ManifestError(str(exc)) from None


def _check_drift(schema: type[DriftSettings] | type[DriftReport], block: dict) -> None:
    """An empty drift block, or one that holds under `schema`; the schema's message names the field."""
    if block:
        try:
            schema.from_dict(block)
        except DriftSchemaError as exc:
            raise ManifestError(str(exc)) from None


@dataclass(frozen=True)
class GlobalManifest(_Manifest):
    """What the coordinator publishes for a round; the client trains from it."""

    kind: ClassVar[str] = "global"
    federation: str
    round_id: str
    model_name: str
    model_version: str  # MLflow version of the base, or "seed" for the initial model
    task: dict  # entrypoint, version, params and params_sha256: the silo builds the same model
    contract: dict  # the data contract the silo checks its rows against (fl_tasks.contract)
    payload_sha256: str
    payload_bytes: int
    training: dict  # local_epochs, learning_rate, batch_size, proximal_mu, codec
    data_window: dict  # {"start": iso or null, "end": iso or null}
    deadline: str  # ISO-8601 UTC
    created_at: str
    # What each silo compares its training window with (fl_tasks.protocol.drift.DriftSettings);
    # empty: the silos compute no drift.
    drift: dict = field(default_factory=dict)
    # Differential privacy with the noise at the silos: {clip_norm, noise_stddev}, each silo
    # clips its change from the base to clip_norm and adds Gaussian noise of noise_stddev
    # before sending it; empty: the silo sends what it trained.
    privacy: dict = field(default_factory=dict)
    # Personalization (fl_tasks.protocol.personalization.PersonalizationSettings); empty: none.
    personalization: dict = field(default_factory=dict)

    def validate(self) -> None:
        _check(bool(ROUND_ID_PATTERN.fullmatch(self.round_id)), f"{self.kind} manifest field 'round_id' is not a valid round id")
        _check_personalization(PersonalizationSettings, self.personalization, "global manifest field 'personalization'")
        _check(bool(SHA256_PATTERN.fullmatch(self.payload_sha256)), "global manifest field 'payload_sha256' is not a sha256")
        _check_drift(DriftSettings, self.drift)
        _check(not self.privacy or (set(self.privacy) == {"clip_norm", "noise_stddev"} and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in self.privacy.values())
            and self.privacy["clip_norm"] > 0 and self.privacy["noise_stddev"] >= 0),
            "global manifest field 'privacy' must be empty or {clip_norm > 0, noise_stddev >= 0}")
        _check(self.payload_bytes > 0, "global manifest field 'payload_bytes' must be positive")
        _check(set(self.data_window) <= {"start", "end"}, "global manifest field 'data_window' allows start and end")
        _check({"entrypoint", "version", "params", "params_sha256"} <= set(self.task),
               "global manifest field 'task' needs entrypoint, version, params and params_sha256")
        try:
            datetime.fromisoformat(self.deadline)
        except ValueError:
            raise ManifestError("global manifest field 'deadline' is not an ISO-8601 time") from None


@dataclass(frozen=True)
class UpdateManifest(_Manifest):
    """What a client writes after training: the commit marker of its update."""

    kind: ClassVar[str] = "update"
    client_id: str
    federation: str
    round_id: str
    base_model_version: str
    base_sha256: str
    num_examples: int
    codec: str
    payload_sha256: str
    payload_bytes: int
    metrics: dict = field(default_factory=dict)  # local train/eval metrics, floats only
    # The silo's drift scores (fl_tasks.protocol.drift.DriftReport); empty: none this round
    # (no drift asked, no reference yet, or the silo could not measure it).
    drift: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    signature: str = ""
    created_at: str = ""

    MAX_EXAMPLES: ClassVar[int] = 10**12

    def validate(self) -> None:
        _check(bool(ROUND_ID_PATTERN.fullmatch(self.round_id)), f"{self.kind} manifest field 'round_id' is not a valid round id")
        _check(bool(NAME_PATTERN.fullmatch(self.client_id)),
               "update manifest field 'client_id' is not a valid client id")
        for name in ("base_sha256", "payload_sha256"):
            _check(bool(SHA256_PATTERN.fullmatch(getattr(self, name))), f"update manifest field '{name}' is not a sha256")
        _check(0 < self.num_examples < self.MAX_EXAMPLES,
               f"update manifest field 'num_examples' must be in 1..{self.MAX_EXAMPLES - 1}, got {self.num_examples}")
        _check(self.payload_bytes > 0, "update manifest field 'payload_bytes' must be positive")
        _check(_is_codec(self.codec), f"update manifest field 'codec' is unknown: {self.codec!r} (allowed: {CODEC_FORMS})")
        _check(self.signature == "" or bool(SHA256_PATTERN.fullmatch(self.signature)),
               "update manifest field 'signature' must be empty or a hex HMAC-SHA256 (64 lowercase hex digits)")
        _check_drift(DriftReport, self.drift)
        for name in ("metrics", "timings"):
            values = getattr(self, name)
            _check(all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                       for k, v in values.items()), f"update manifest field '{name}' must map names to numbers")
            _check(all(isinstance(v, int) or math.isfinite(v) for v in values.values()),
                   f"update manifest field '{name}' has a value that is not a finite number")


@dataclass(frozen=True)
class DeclineManifest(_Manifest):
    """A silo's signed "not this round, because ...": its data does not fit the contract, its
    installed task differs, its data source cannot be read. It is the silo's answer for the
    round: no update follows, and the coordinator stops waiting for it."""

    kind: ClassVar[str] = "decline"
    client_id: str
    federation: str
    round_id: str
    reason: str
    signature: str = ""
    created_at: str = ""

    MAX_REASON_CHARS: ClassVar[int] = 2000

    def validate(self) -> None:
        _check(bool(ROUND_ID_PATTERN.fullmatch(self.round_id)), "decline manifest field 'round_id' is not a valid round id")
        _check(bool(NAME_PATTERN.fullmatch(self.client_id)), "decline manifest field 'client_id' is not a valid client id")
        _check(0 < len(self.reason) <= self.MAX_REASON_CHARS,
               f"decline manifest field 'reason' must be 1..{self.MAX_REASON_CHARS} characters")
        _check(self.signature == "" or bool(SHA256_PATTERN.fullmatch(self.signature)),
               "decline manifest field 'signature' must be empty or a hex HMAC-SHA256 (64 lowercase hex digits)")


@dataclass(frozen=True)
class EvaluationRequest(_Manifest):
    """What the coordinator asks the silos that took part: score these models on your own
    evaluation share (the rows you never train on) and send back the metrics, nothing else."""

    kind: ClassVar[str] = "evaluation_request"
    federation: str
    round_id: str
    model_name: str
    models: dict  # label -> {"version": str, "sha256": str, "bytes": int}
    task: dict  # as in the global manifest: the silo builds the same model
    contract: dict
    holdout_fraction: float  # the share of a silo's rows held out of training, for evaluation
    data_window: dict  # {"start": iso or null, "end": iso or null}
    deadline: str
    created_at: str
    # As in the global manifest: the silo scores its personal (and local-only) model too.
    personalization: dict = field(default_factory=dict)

    MAX_MODELS: ClassVar[int] = 8

    def validate(self) -> None:
        _check(bool(ROUND_ID_PATTERN.fullmatch(self.round_id)), "evaluation_request manifest field 'round_id' is not "
                                                                 "a valid round id")
        _check(0 < len(self.models) <= self.MAX_MODELS,
               f"evaluation_request manifest field 'models' must name 1..{self.MAX_MODELS} models")
        for label, model in self.models.items():
            where = f"evaluation_request manifest field 'models.{label}'"
            _check(bool(MODEL_LABEL_PATTERN.fullmatch(label)), f"{where}: label must match {MODEL_LABEL_PATTERN.pattern}")
            _check(isinstance(model, dict) and set(model) == {"version", "sha256", "bytes"},
                   f"{where} must hold exactly version, sha256 and bytes")
            _check(isinstance(model["version"], str) and bool(SHA256_PATTERN.fullmatch(str(model["sha256"]))),
                   f"{where}: version must be a string and sha256 a sha256")
            _check(type(model["bytes"]) is int and model["bytes"] > 0, f"{where}: bytes must be a positive integer")
        _check(0 < self.holdout_fraction < 1, "evaluation_request manifest field 'holdout_fraction' must be in (0, 1)")
        _check_personalization(PersonalizationSettings, self.personalization,
                               "evaluation_request manifest field 'personalization'")
        _check(set(self.data_window) <= {"start", "end"}, "evaluation_request manifest field 'data_window' allows "
                                                          "start and end")
        _check({"entrypoint", "version", "params", "params_sha256"} <= set(self.task),
               "evaluation_request manifest field 'task' needs entrypoint, version, params and params_sha256")
        try:
            datetime.fromisoformat(self.deadline)
        except ValueError:
            raise ManifestError("evaluation_request manifest field 'deadline' is not an ISO-8601 time") from None


@dataclass(frozen=True)
class EvaluationManifest(_Manifest):
    """A silo's answer to an evaluation request: per model, the task's metrics on its
    evaluation share, and how many rows that share and its whole window held. Bound to the
    request (and so to the candidate's sha256) by `request_sha256`; signed like an update."""

    kind: ClassVar[str] = "evaluation"
    client_id: str
    federation: str
    round_id: str
    request_sha256: str
    num_examples: int  # rows scored (the evaluation share)
    rows_held: int  # rows the silo holds in the window: training share plus evaluation share
    scores: dict  # model label -> {metric: value}
    signature: str = ""
    created_at: str = ""
    # Its personal model, when the request asked for personalization (PersonalReport); else empty.
    personal: dict = field(default_factory=dict)

    MAX_EXAMPLES: ClassVar[int] = 10**12

    def validate(self) -> None:
        name = "evaluation manifest field"
        _check(bool(ROUND_ID_PATTERN.fullmatch(self.round_id)), f"{name} 'round_id' is not a valid round id")
        _check(bool(NAME_PATTERN.fullmatch(self.client_id)), f"{name} 'client_id' is not a valid client id")
        _check(bool(SHA256_PATTERN.fullmatch(self.request_sha256)), f"{name} 'request_sha256' is not a sha256")
        _check(0 < self.num_examples < self.MAX_EXAMPLES,
               f"{name} 'num_examples' must be in 1..{self.MAX_EXAMPLES - 1}, got {self.num_examples}")
        _check(self.num_examples <= self.rows_held < self.MAX_EXAMPLES,
               f"{name} 'rows_held' ({self.rows_held}) must be at least num_examples ({self.num_examples})")
        _check(0 < len(self.scores) <= EvaluationRequest.MAX_MODELS,
               f"{name} 'scores' must hold 1..{EvaluationRequest.MAX_MODELS} models")
        for label, metrics in self.scores.items():
            _check(bool(MODEL_LABEL_PATTERN.fullmatch(label)) and isinstance(metrics, dict) and bool(metrics),
                   f"{name} 'scores.{label}' must be a model label mapping metric names to numbers")
            _check(all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for k, v in metrics.items()),
                   f"{name} 'scores.{label}' has a value that is not a finite number")
        _check(self.signature == "" or bool(SHA256_PATTERN.fullmatch(self.signature)),
               f"{name} 'signature' must be empty or a hex HMAC-SHA256 (64 lowercase hex digits)")
        _check_personalization(PersonalReport, self.personal, f"{name} 'personal'")


@dataclass(frozen=True)
class AnswerKind:
    """One kind of question the coordinator asks every silo, and where the answer goes: the
    manifest that answers it, or a decline next to it."""

    name: str  # update | evaluation
    manifest: type
    answer_key: Callable[[str, str, str], str]
    decline_key: Callable[[str, str, str], str]


UPDATES = AnswerKind("update", UpdateManifest, update_manifest_key, decline_key)
EVALUATIONS = AnswerKind("evaluation", EvaluationManifest, evaluation_result_key, evaluation_decline_key)
ANSWER_KINDS: dict[str, AnswerKind] = {kind.name: kind for kind in (UPDATES, EVALUATIONS)}
