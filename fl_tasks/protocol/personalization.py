"""Personalization, as both sides see it: what the coordinator asks each silo to do
(`PersonalizationSettings`, carried in the global manifest and the evaluation request) and
what a silo reports back about its personal model (`PersonalReport`, carried in its evaluation
manifest). Only metrics, hashes and lineage travel; the personal and local-only weights stay
in the silo's state directory unless the federation opts in (`share_weights`).

Strategies (computed at the silo, fl_tasks.silo.personal):

    finetune  the round's global model, fine-tuned on the silo's training rows (all layers or the head)
    fedbn     batch-norm tensors stay at the silo: never sent, never averaged (Li et al. 2021, FedBN)
    ditto     a personal model trained beside the global one, pulled towards it with strength
              lambda (Li et al. 2021, Ditto)
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

STRATEGIES = ("finetune", "fedbn", "ditto")
LAYERS = ("all", "head")
SERVED = ("global", "personal")
# Which requested model is "the global model" a personal one starts from and is compared with, in order.
GLOBAL_LABELS = ("candidate", "champion")
MAX_TENSORS = 4096
MAX_TEXT = 200
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def global_label(labels: Collection[str]) -> str | None:
    """The requested model a personal one starts from and is compared with, on both sides: the
    candidate, else the champion; None when the request names neither."""
    return next((label for label in GLOBAL_LABELS if label in labels), None)


class PersonalizationSchemaError(ValueError):
    """A personalization block that breaks the schema; the message names the field."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise PersonalizationSchemaError(message)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PersonalizationSettings:
    """What every silo does for its personal model.

    `local_tensors`: the tensors that never leave a silo (fedbn: every batch-norm tensor of the
    task's model); the coordinator fills them from the base and screens the rest. `epochs`,
    `learning_rate` and `batch_size`: the personal model's training (finetune: once per
    evaluation; ditto: each round). `local_only`: each silo also keeps training a model on its own rows alone, the
    baseline personalization must beat. `share_weights`: the silos send their personal weights
    with their evaluation, for the coordinator's MLflow.
    """

    strategy: str
    layers: str = "all"
    # epochs, batch_size and ditto_lambda: from benchmarks/quality.py (one epoch barely moves a
    # small bank's model, and a weak pull leaves Ditto's model behind the global one).
    epochs: int = 5
    learning_rate: float = 0.001
    # Small batches: a silo's personal training is a few epochs on its own rows, and a small
    # silo gets a step or two an epoch at the federation's batch size.
    batch_size: int = 64
    ditto_lambda: float = 1.0
    local_only: bool = True
    share_weights: bool = False
    local_tensors: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "local_tensors": list(self.local_tensors)}

    @classmethod
    def from_dict(cls, body: dict[str, Any], where: str = "manifest field 'personalization'"
                  ) -> "PersonalizationSettings":
        _check(isinstance(body, dict) and set(body) == set(cls.__dataclass_fields__),
               f"{where} must hold exactly {sorted(cls.__dataclass_fields__)}")
        _check(body["strategy"] in STRATEGIES, f"{where}.strategy must be one of {list(STRATEGIES)}")
        _check(body["layers"] in LAYERS, f"{where}.layers must be one of {list(LAYERS)}")
        _check(type(body["epochs"]) is int and 1 <= body["epochs"] <= 100, f"{where}.epochs must be in 1..100")
        _check(_number(body["learning_rate"]) and 0 < body["learning_rate"] < 1,
               f"{where}.learning_rate must be in (0, 1)")
        _check(type(body["batch_size"]) is int and 1 <= body["batch_size"] <= 1_000_000,
               f"{where}.batch_size must be in 1..1000000")
        _check(_number(body["ditto_lambda"]) and body["ditto_lambda"] >= 0, f"{where}.ditto_lambda must be >= 0")
        for name in ("local_only", "share_weights"):
            _check(isinstance(body[name], bool), f"{where}.{name} must be true or false")
        tensors = body["local_tensors"]
        _check(isinstance(tensors, list) and len(tensors) <= MAX_TENSORS
               and all(isinstance(t, str) and 0 < len(t) <= MAX_TEXT for t in tensors)
               and len(set(tensors)) == len(tensors), f"{where}.local_tensors must name distinct tensors")
        _check((body["strategy"] == "fedbn") == bool(tensors),
               f"{where}.local_tensors must name the batch-norm tensors under fedbn, and none otherwise")
        return cls(**{**body, "local_tensors": tuple(tensors)})


@dataclass(frozen=True)
class PersonalReport:
    """One silo's personalization this round, on its evaluation share: the scores of its
    personal and (optionally) local-only models, which of global and personal it serves, and
    the personal model's lineage (the global model it came from, by sha256, and its own)."""

    strategy: str
    scores: dict  # "personal" and, with local_only, "local_only" -> {metric: value}
    serving: str  # global | personal: whichever scored better on the primary metric
    global_sha256: str  # the global model the personal one was made from (the round's candidate)
    personal_sha256: str  # of the personal weights (safetensors), kept at the silo
    weights_bytes: int = 0  # > 0 when the silo shared its personal weights (share_weights)
    extra: dict = field(default_factory=dict)  # reserved; must be empty

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, body: dict[str, Any], where: str = "evaluation manifest field 'personal'") -> "PersonalReport":
        _check(isinstance(body, dict) and set(body) == set(cls.__dataclass_fields__),
               f"{where} must hold exactly {sorted(cls.__dataclass_fields__)}")
        _check(body["strategy"] in STRATEGIES, f"{where}.strategy must be one of {list(STRATEGIES)}")
        scores = body["scores"]
        _check(isinstance(scores, dict) and "personal" in scores and set(scores) <= {"personal", "local_only"},
               f"{where}.scores must hold personal and optionally local_only")
        for label, metrics in scores.items():
            _check(isinstance(metrics, dict) and 0 < len(metrics) <= 64 and all(
                isinstance(k, str) and 0 < len(k) <= MAX_TEXT and _number(v) for k, v in metrics.items()),
                f"{where}.scores.{label} must map metric names to finite numbers")
        _check(body["serving"] in SERVED, f"{where}.serving must be one of {list(SERVED)}")
        for name in ("global_sha256", "personal_sha256"):
            _check(isinstance(body[name], str) and bool(SHA256.fullmatch(body[name])), f"{where}.{name} is not a sha256")
        _check(type(body["weights_bytes"]) is int and 0 <= body["weights_bytes"] < 2**40,
               f"{where}.weights_bytes must be a byte count")
        _check(body["extra"] == {}, f"{where}.extra must be empty")
        return cls(**body)
