"""Personal models at the silo (`personalization` in the federation file, carried as
fl_tasks.protocol.personalization.PersonalizationSettings in the global manifest and in the
evaluation request).

Every strategy runs here, on the silo's own rows; only scores, hashes and lineage leave it
(`PersonalReport`), unless the federation opts in to `share_weights`. What a silo keeps lives
in its state directory, each set of tensors an atomic KeptTensors pair (fl_tasks.silo.kept):

    <state_dir>/<federation>/personal/
        fedbn_local.*          fedbn: its own batch-norm tensors, as last trained
        ditto.*                ditto: its personal model v, and the base it was last pulled towards
        local_only.*           local_only: the model trained on its rows alone
        local_only_optimizer/  ... and that model's Adam moments
        personal.*             the personal model of the last evaluation
        serving.jsonl          one line per evaluation: which model it serves, the scores, the hashes

Strategies:

    finetune  at each evaluation, the global model (the request's candidate, else its champion)
              fine-tuned `epochs` epochs on the silo's training share (all layers, or only
              `Task.head_parameters`), with a fresh optimiser at `learning_rate`.
    fedbn     the batch-norm tensors (`local_tensors`) never leave the silo (Li et al. 2021):
              each round trains from the global model with the silo's own kept tensors in
              place, and the update carries everything else. A FedBN model only runs with a
              silo's own normalisation (the base's values are just the seed's), so at an
              evaluation every requested model is scored with them substituted; the personal
              model is the global one run that way (the two score alike, and a tie keeps
              "global": the global model as this silo runs it).
    ditto     a personal model v trained beside the global one (Li et al. 2021): each round,
              `epochs` epochs on F_k(v) + lambda/2 ||v - w||^2, w the round's base.

With `local_only`, each silo also trains, every round, a model on its own rows alone, from the
first round's base (the shared seed model) and never again from global weights: the baseline
that federation and personalization must beat.

At each evaluation the silo serves whichever of its personal model and the global one scores
better on its evaluation share (the primary metric; a tie keeps the global model), and appends
that choice to serving.jsonl.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_tasks.protocol import sha256_hex
from fl_tasks.protocol.codec import encode_state
from fl_tasks.protocol.personalization import PersonalizationSettings, PersonalReport
from fl_tasks.silo.kept import KeptTensors, state_folder
from fl_tasks.silo.optimizer_state import OptimizerStateStore

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from fl_tasks.tasks.api import Task, TrainingSettings

State = dict[str, "np.ndarray"]


class NoPersonalModel(Exception):
    """This silo has no personal model to report this time (e.g. ditto before its first
    round); the message says why. The evaluation goes on without the personal block."""


def personal_folder(state_dir: Path, federation: str) -> Path:
    return state_folder(state_dir, federation, "personal")


def settings_of(block: Mapping[str, Any]) -> PersonalizationSettings | None:
    """The manifest's personalization block parsed; None when it is empty (personalization off)."""
    return PersonalizationSettings.from_dict(dict(block)) if block else None


def without(state: Mapping[str, "np.ndarray"], names: Collection[str]) -> State:
    """`state` less the tensors `names`: what a FedBN update encodes (and the base it is encoded against)."""
    drop = set(names)
    return {name: value for name, value in state.items() if name not in drop}


def mismatch(tensors: Mapping[str, "np.ndarray"], like: Mapping[str, "np.ndarray"]) -> str | None:
    """Why `tensors` cannot stand in for `like` (other names, shapes or dtypes); None when they can."""
    import numpy as np

    if set(tensors) != set(like):
        return f"tensor names differ: {sorted(set(tensors) ^ set(like))[:10]}"
    for name, value in tensors.items():
        ref = np.asarray(like[name])
        if np.shape(value) != ref.shape or np.asarray(value).dtype != ref.dtype:
            return f"tensor '{name}' is {np.shape(value)} {np.asarray(value).dtype}, expected {ref.shape} {ref.dtype}"
    return None


def better(task: "Task", personal: Mapping[str, float], global_: Mapping[str, float]) -> str:
    """Which model the silo serves: "personal" when it beats the global one on the task's
    primary metric (in that metric's direction), else "global" (a tie keeps the shared model)."""
    metric = task.primary
    return "personal" if metric.better(float(personal[metric.name]), float(global_[metric.name])) else "global"


# --- training a model from a state ------------------------------------------------------------

def _torch_state(state: Mapping[str, "np.ndarray"]) -> dict[str, Any]:
    import numpy as np
    import torch

    return {name: torch.from_numpy(np.array(value, copy=True)) for name, value in state.items()}


def train_from(task: "Task", start: Mapping[str, "np.ndarray"], rows: "pd.DataFrame", settings: "TrainingSettings",
               anchor: Mapping[str, "np.ndarray"] | None = None, only: Collection[str] | None = None
               ) -> tuple[State, Any]:
    """(the trained state, the TrainResult) of the task's model loaded with `start` and trained
    on `rows`. `anchor`: what the proximal term pulls towards (default: `start`). `only`: the
    parameters that train (the rest are frozen, and every other tensor, batch-norm statistics
    included, comes back as in `start`)."""
    import numpy as np

    from fl_tasks.tasks.api import load_model_state, model_state

    model = load_model_state(task.build_model(), start)
    if only is not None:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in only)
    result = task.train(model, rows, settings, _torch_state(anchor if anchor is not None else start))
    trained = model_state(model)
    if only is not None:
        # In train mode batch norm updates its running statistics even when frozen: put the
        # body back exactly, so that a head-only model differs from its start in the head alone.
        trained = {name: trained[name] if name in only else np.array(start[name], copy=True) for name in trained}
    return trained, result


def ditto_step(task: "Task", v: Mapping[str, "np.ndarray"], base: Mapping[str, "np.ndarray"], rows: "pd.DataFrame",
               round_settings: "TrainingSettings", settings: PersonalizationSettings) -> State:
    """One round of Ditto's personal objective F_k(v) + lambda/2 ||v - w||^2 (w: the round's
    base): `settings.epochs` epochs at `settings.learning_rate` from v, a fresh optimiser, the
    proximal term pulling towards w (lambda = 0: plain local training from v)."""
    training = replace(round_settings, local_epochs=settings.epochs, learning_rate=settings.learning_rate,
                       batch_size=settings.batch_size, proximal_mu=settings.ditto_lambda, lr_schedule="constant",
                       optimizer_state=None)
    trained, _ = train_from(task, v, rows, training, anchor=base)
    return trained


def finetuned(task: "Task", global_state: Mapping[str, "np.ndarray"], rows: "pd.DataFrame",
              settings: PersonalizationSettings, seed: int) -> State:
    """The global model fine-tuned on `rows` (the silo's training share): `settings.epochs`
    epochs at `settings.learning_rate` with a fresh optimiser, every layer or only the head."""
    from fl_tasks.tasks.api import TrainingSettings, load_model_state

    only = None
    if settings.layers == "head":
        only = set(task.head_parameters(load_model_state(task.build_model(), global_state)))
        if not only:
            raise ValueError(f"task {type(task).__name__} names no head parameters to fine-tune "
                             "(Task.head_parameters is empty); use personalization.layers: all")
    training = TrainingSettings(local_epochs=settings.epochs, learning_rate=settings.learning_rate,
                                batch_size=settings.batch_size, seed=seed)
    trained, _ = train_from(task, global_state, rows, training, only=only)
    return trained


# --- what one evaluation reports --------------------------------------------------------------

@dataclass(frozen=True)
class PersonalEvaluation:
    """One evaluation's personalization: the report for the manifest, the personal weights
    (safetensors, `report.personal_sha256`), and the history record of the choice."""

    report: PersonalReport
    weights: bytes
    record: dict[str, Any]

    def summary(self, task: "Task", label: str, global_scores: Mapping[str, float]) -> str:
        metric = task.primary_metric
        local = self.report.scores.get("local_only")
        return (f"personalization ({self.report.strategy}): personal {metric} "
                f"{self.report.scores['personal'][metric]:.4f}"
                + (f", local-only {metric} {local[metric]:.4f}" if local else "")
                + f", global ({label}) {metric} {float(global_scores[metric]):.4f}; serving {self.report.serving}")


# --- the silo's personalization ---------------------------------------------------------------

class SiloPersonalization:
    """One federation's personalization at one silo: `settings` from the round's manifest,
    what it keeps in `folder`. Nothing here sends anything; the agent does."""

    def __init__(self, settings: PersonalizationSettings, folder: Path, log: Callable[[str], None] = print) -> None:
        self.settings, self.folder, self.log = settings, Path(folder), log
        self.local = tuple(settings.local_tensors)  # fedbn's; empty otherwise
        self.fedbn_local = KeptTensors(self.folder, "fedbn_local")
        self.ditto = KeptTensors(self.folder, "ditto")
        self.local_only = KeptTensors(self.folder, "local_only")
        self.personal = KeptTensors(self.folder, "personal")
        self.history = self.folder / "serving.jsonl"

    def local_only_optimizer(self) -> OptimizerStateStore:
        return OptimizerStateStore(self.folder / "local_only_optimizer", self.log)

    def fitting(self, kept: KeptTensors, like: Mapping[str, "np.ndarray"], what: str
                ) -> tuple[State, dict[str, Any]] | None:
        """(tensors, record) of `kept` when they fit `like`; None when nothing is kept yet, or
        what is kept cannot be read or belongs to another model (both logged)."""
        if not kept.exists():
            return None
        try:
            tensors, record = kept.load()
        except (OSError, ValueError) as exc:
            self.log(f"personalization: {what} in {kept.tensors} not used, it cannot be read: "
                     f"{type(exc).__name__}: {exc}")
            return None
        problem = mismatch(tensors, like)
        if problem:
            self.log(f"personalization: {what} in {kept.tensors} not used, it was kept for another model "
                     f"(the task changed?): {problem}")
            return None
        return tensors, record

    # --- fedbn ---------------------------------------------------------------------------
    def missing_local(self, state: Mapping[str, "np.ndarray"]) -> list[str]:
        """The local tensors the manifest names that the model does not have."""
        return [name for name in self.local if name not in state]

    def kept_local(self, like: Mapping[str, "np.ndarray"]) -> State | None:
        """The silo's own local tensors (fedbn), when it has some that fit `like`'s."""
        if not self.local or self.missing_local(like):
            return None
        kept = self.fitting(self.fedbn_local, {name: like[name] for name in self.local}, "the FedBN local tensors")
        return kept[0] if kept else None

    def as_run_here(self, state: Mapping[str, "np.ndarray"]) -> State:
        """`state` as this silo runs it: under fedbn with its own local tensors in place (a
        FedBN model only runs with a silo's own normalisation); as it is otherwise, and while
        the silo has no local tensors yet."""
        local = self.kept_local(state)
        return {**state, **local} if local else dict(state)

    def reported(self, reported: Mapping[str, "np.ndarray"], base: Mapping[str, "np.ndarray"]) -> State:
        """The reported state with every local tensor back at the base's value: no change there
        for clipping, noise or the top-k residual to see (they are stripped before encoding)."""
        return {**reported, **{name: base[name].copy() for name in self.local}}

    def shared(self, state: Mapping[str, "np.ndarray"]) -> State:
        """What leaves the silo: `state` less the local tensors."""
        return without(state, self.local)

    # --- after a committed training round ---------------------------------------------------
    def after_round(self, task: "Task", round_id: str, trained: Mapping[str, "np.ndarray"],
                    base: Mapping[str, "np.ndarray"], base_sha256: str, base_version: str, rows: "pd.DataFrame",
                    round_settings: "TrainingSettings") -> None:
        """Keep what this round's personalization keeps, once its update is committed: fedbn's
        trained local tensors, ditto's next v, the next local-only model. Each is logged when it
        fails and never stops the agent: the global update is already sent."""
        steps = [("keep the FedBN local tensors", lambda: self.keep_local(round_id, trained, base_sha256))] \
            if self.local else []
        if self.settings.strategy == "ditto":
            steps.append(("train the Ditto personal model",
                          lambda: self.ditto_round(task, round_id, base, base_sha256, base_version, rows,
                                                   round_settings)))
        if self.settings.local_only:
            steps.append(("train the local-only model",
                          lambda: self.local_only_round(task, round_id, base, base_sha256, rows, round_settings)))
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - personal models never stop the agent's loop
                self.log(f"round {round_id}: personalization: could not {what}: {type(exc).__name__}: {exc}")

    def keep_local(self, round_id: str, trained: Mapping[str, "np.ndarray"], base_sha256: str) -> None:
        self.fedbn_local.save({name: trained[name] for name in self.local},
                              {"round_id": round_id, "base_sha256": base_sha256})

    def ditto_round(self, task: "Task", round_id: str, base: Mapping[str, "np.ndarray"], base_sha256: str,
                    base_version: str, rows: "pd.DataFrame", round_settings: "TrainingSettings") -> None:
        """v <- v trained on Ditto's personal objective towards this round's base; the first
        time v starts from the base."""
        kept = self.fitting(self.ditto, base, "the Ditto personal model")
        v = kept[0] if kept else dict(base)
        trained = ditto_step(task, v, base, rows, round_settings, self.settings)
        # Lineage: the base v was last pulled towards is "the global model it came from".
        self.ditto.save(trained, {"round_id": round_id, "base_sha256": base_sha256, "base_version": base_version,
                                  "ditto_lambda": self.settings.ditto_lambda,
                                  "rounds": (kept[1].get("rounds", 0) if kept else 0) + 1})
        self.log(f"round {round_id}: personalization: Ditto personal model trained {self.settings.epochs} epoch(s) "
                 f"towards base {base_sha256[:12]} (lambda {self.settings.ditto_lambda:g})")

    def local_only_round(self, task: "Task", round_id: str, base: Mapping[str, "np.ndarray"], base_sha256: str,
                         rows: "pd.DataFrame", round_settings: "TrainingSettings") -> None:
        """The local-only model trained one more round on the silo's rows, from itself (the first
        time from this round's base, the shared seed), with its own Adam moments. It never
        takes global weights after that."""
        kept = self.fitting(self.local_only, base, "the local-only model")
        start, record = kept if kept else (dict(base), {"seed_sha256": base_sha256, "rounds": 0})
        moments = self.local_only_optimizer()
        training = replace(round_settings, proximal_mu=0.0, optimizer_state=moments.load() if kept else None)
        trained, result = train_from(task, start, rows, training)
        self.local_only.save(trained, {"round_id": round_id, "seed_sha256": record.get("seed_sha256", base_sha256),
                                       "rounds": int(record.get("rounds", 0)) + 1})
        if result.optimizer_state:
            moments.save(result.optimizer_state, round_id)

    # --- at an evaluation -------------------------------------------------------------------
    def personal_model(self, task: "Task", global_state: Mapping[str, "np.ndarray"], global_sha256: str,
                       rows: "pd.DataFrame", seed: int) -> tuple[State, str]:
        """(the personal model's state, the sha256 of the global model it came from).
        NoPersonalModel when there is none to report yet."""
        strategy = self.settings.strategy
        if strategy == "finetune":
            if rows.empty:
                raise NoPersonalModel("no rows in this silo's training share to fine-tune on")
            return finetuned(task, global_state, rows, self.settings, seed), global_sha256
        if strategy == "fedbn":
            local = self.kept_local(global_state)
            if local is None:
                raise NoPersonalModel("no FedBN local tensors kept yet (this silo has not trained a round)")
            return {**global_state, **local}, global_sha256
        kept = self.fitting(self.ditto, global_state, "the Ditto personal model")
        if kept is None:
            raise NoPersonalModel("no Ditto personal model kept yet (this silo has not trained a round)")
        return kept[0], str(kept[1]["base_sha256"])

    def local_only_scores(self, task: "Task", like: Mapping[str, "np.ndarray"], held: "pd.DataFrame"
                          ) -> dict[str, float] | None:
        """The local-only model's metrics on the evaluation share; None when it is off or none is kept yet."""
        if not self.settings.local_only:
            return None
        kept = self.fitting(self.local_only, like, "the local-only model")
        return None if kept is None else scored(task, kept[0], held)

    def evaluate(self, task: "Task", round_id: str, label: str, global_state: Mapping[str, "np.ndarray"],
                 global_sha256: str, global_scores: Mapping[str, float], train: "pd.DataFrame",
                 held: "pd.DataFrame", seed: int) -> PersonalEvaluation:
        """The personal model of this evaluation, scored on the evaluation share `held` next to
        the global model's `global_scores` (the requested model `label`, as this silo runs it),
        and the choice of the one to serve. `train` is the training share: fine-tuning never
        sees `held`. Keeps the personal weights; NoPersonalModel when there are none yet."""
        personal, lineage = self.personal_model(task, global_state, global_sha256, train, seed)
        scores = {"personal": scored(task, personal, held)}
        local_only = self.local_only_scores(task, global_state, held)
        if local_only is not None:
            scores["local_only"] = local_only
        serving = better(task, scores["personal"], global_scores)
        weights = encode_state(personal)
        digest = sha256_hex(weights)
        report = PersonalReport(strategy=self.settings.strategy, scores=scores, serving=serving,
                                global_sha256=lineage, personal_sha256=digest)
        PersonalReport.from_dict(report.as_dict())  # a block the coordinator would refuse is not sent
        kept = self.personal.save(personal, {"round_id": round_id, "strategy": self.settings.strategy,
                                             "global_sha256": lineage})
        if kept != digest:  # the report names the kept weights; it must not name other bytes
            raise ValueError(f"the kept personal weights hash to {kept}, the report's to {digest}")
        record = {"round_id": round_id, "created_at": datetime.now(timezone.utc).isoformat(),
                  "strategy": self.settings.strategy, "serving": serving,
                  "global": {"label": label, "sha256": global_sha256, "scores": dict(global_scores)},
                  "personal": {"sha256": digest, "global_sha256": lineage, "scores": scores["personal"]},
                  **({"local_only": {"scores": local_only}} if local_only is not None else {})}
        return PersonalEvaluation(report, weights, record)

    def record_serving(self, record: Mapping[str, Any]) -> None:
        """Append the evaluation's choice to serving.jsonl (one JSON object a line; a line cut
        short by a crash is the last and unparseable, and readers skip it)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.history, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def scored(task: "Task", state: Mapping[str, "np.ndarray"], rows: "pd.DataFrame") -> dict[str, float]:
    """The task's metrics of the model with `state` on `rows`."""
    from fl_tasks.tasks.api import load_model_state

    model = load_model_state(task.build_model(), state)
    return {name: float(value) for name, value in task.evaluate(model, rows).items()}


def serving_history(folder: Path) -> list[dict[str, Any]]:
    """The serving records in `folder`, oldest first (a line cut short by a crash is skipped)."""
    path = Path(folder) / "serving.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records
