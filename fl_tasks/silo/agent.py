"""The silo agent (`fl-client`): answer each committed round with a locally trained update,
and each evaluation request with scores on its own evaluation share, or with a signed decline
that says why not.

It only ever reads the global model from its own bucket and writes back model weights and a
manifest; the silo's rows never leave it. For each round it:

1. reads the global manifest (strict, size-limited) and checks the round, federation and deadline;
2. checks that its installed task is the one the round names (entrypoint, version, params);
3. reads the round's data window from its data source and checks the rows against the
   federation's data contract;
4. when the round asks for drift, compares the rows it trains on with its reference window
   (fl_tasks.silo.drift, evidently); only the scores go into the update, the reference
   windows and evidently's HTML report stay in its state directory (`--state-dir`);
5. trains the task's model from the global weights and commits the update, manifest last,
   in the round's codec (`training.codec`, fl_tasks.protocol.codec); under topk the silo
   keeps what it did not send in its state directory and adds it to its next change
   (fl_tasks.silo.residual). With `training.optimizer_state: keep` it also keeps its
   optimiser's moments there between rounds (fl_tasks.silo.optimizer_state).

When 2 or 3 fail it writes no update: it commits a signed decline with the reason (e.g.
`column 'amount' missing`), which the coordinator shows and which never counts towards the
quorum.

When the federation evaluates on the silos, a share of the silo's rows (`holdout_fraction`,
drawn by row content, `fl_tasks.silo.holdout`) is never trained on. For an evaluation
request the agent scores each named model on that share and commits a signed evaluation
manifest holding only the metrics and the row counts.

With `personalization` (fl_tasks.silo.personal) the silo also keeps personal models in its
state directory: under fedbn its batch-norm tensors never leave it (the update carries the
rest), under ditto it trains a personal model beside the global one each round, and with
local_only a model on its rows alone. At an evaluation it scores its personal (and local-only)
model on the same share, serves whichever of personal and global wins, and reports only the
scores, the choice and the hashes (the weights too, with share_weights).

Subclasses may override `train_rows`, `reported_state` and `reported_evaluation` (the
simulator's attacks do); the production agent has no other behaviour.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_tasks import protocol
from fl_tasks.config import BUCKET_URI_PATTERN
from fl_tasks.contract import DataContract
from fl_tasks.protocol import (DeclineManifest, EvaluationManifest, EvaluationRequest, GlobalManifest, ManifestError,
                               UpdateManifest, sha256_hex)
from fl_tasks.protocol import signing
from fl_tasks.protocol.codec import Codec, CodecError, decode_state, encode_update
from fl_tasks.protocol.drift import DriftSettings
from fl_tasks.protocol.personalization import global_label
from fl_tasks.protocol.storage import ObjectStore, StorageUnavailable
from fl_tasks.silo.drift import (DriftError, ReferenceStore, default_state_dir, drift_folder, measure_drift,
                                 prune_reports, report_path)
from fl_tasks.silo.holdout import silo_salt, split_rows
from fl_tasks.silo.optimizer_state import OptimizerStateStore, optimizer_folder
from fl_tasks.silo.personal import (NoPersonalModel, PersonalEvaluation, SiloPersonalization, personal_folder, scored,
                                    settings_of)
from fl_tasks.silo.residual import ResidualStore, residual_folder
from fl_tasks.silo.sources import DataSource, DataSourceError, Window, open_source

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


class Decline(Exception):
    """This silo will not train this round; the message is the public reason."""


@dataclass
class SiloAgent:
    client_id: str
    federation: str
    bucket_uri: str
    source: DataSource
    store: ObjectStore
    signing_key: bytes | str | None = None  # signs each manifest (HMAC-SHA256) when set
    seed: int = 0
    answered: set[str] = field(default_factory=set)
    evaluated: set[str] = field(default_factory=set)
    # Drift reference windows and reports, kept only here; None: FL_CLIENT_STATE_DIR, else
    # ~/.fl-client/<client_id>.
    state_dir: Path | None = None
    keep_drift_reports: int = 30  # evidently's HTML reports kept in the state directory, newest first

    def __post_init__(self) -> None:
        if self.signing_key is not None:
            self.signing_key = signing.as_key(self.signing_key, f"the signing key of {self.client_id}")
        if not protocol.NAME_PATTERN.fullmatch(self.client_id):
            raise ValueError(f"client id {self.client_id!r} must match {protocol.NAME_PATTERN.pattern}")
        self.state_dir = Path(self.state_dir) if self.state_dir else default_state_dir(self.client_id)
        if self.keep_drift_reports < 1:
            raise ValueError(f"--keep-drift-reports {self.keep_drift_reports}: keep at least 1 report")
        match = BUCKET_URI_PATTERN.fullmatch(self.bucket_uri)
        if not match:
            raise ValueError(f"bucket {self.bucket_uri!r} must look like s3://bucket[/prefix]")
        self.bucket, self.prefix = match.group(1), (match.group(2) or "").strip("/")
        self._tasks: dict[str, Any] = {}

    def log(self, message: str) -> None:
        print(f"[{self.client_id}] {message}", flush=True)

    def key(self, which, round_id: str) -> str:
        return which(self.prefix, self.federation, round_id)

    @property
    def salt(self) -> str:
        return silo_salt(self.client_id, self.seed)

    def pending(self) -> tuple[list[str], list[str]]:
        """(rounds to train, evaluation requests to score): committed by the coordinator and
        not answered by us yet, oldest first."""
        listing = protocol.rounds_listing_prefix(self.prefix, self.federation)
        found: dict[str, set[str]] = {}  # object name within a round -> the rounds that hold it
        for key in self.store.list_keys(self.bucket, listing):
            round_id, _, rest = key[len(listing):].partition("/")
            found.setdefault(rest, set()).add(round_id)

        def unanswered(asked: str, answers: tuple[str, str], done: set[str]) -> list[str]:
            return sorted(found.get(asked, set()) - set().union(*(found.get(a, set()) for a in answers)) - done)

        return (unanswered("global/manifest.json", ("update/manifest.json", "update/decline.json"), self.answered),
                unanswered("evaluation/request.json", ("evaluation/result.json", "evaluation/decline.json"),
                           self.evaluated))

    def pending_rounds(self) -> list[str]:
        """Rounds with a committed global manifest and no answer from us yet, oldest first."""
        return self.pending()[0]

    # --- one round --------------------------------------------------------------------------
    def answer(self, round_id: str) -> bool:
        """Train on one round and commit the update; False when the round is skipped or declined."""
        self.answered.add(round_id)
        manifest, _ = self.read_request(round_id, protocol.global_manifest_key, GlobalManifest)
        if manifest is None:
            return False
        try:
            task = self.task_for(manifest)
            contract = DataContract.from_dict(manifest.contract)
            rows = self.read_rows(manifest, contract)
        except Decline as exc:
            self.decline(round_id, str(exc))
            return False
        started = time.perf_counter()
        payload = self.store.get_bytes(self.bucket, self.key(protocol.global_model_key, round_id),
                                       max_bytes=manifest.payload_bytes)
        if payload is None or sha256_hex(payload) != manifest.payload_sha256:
            self.log(f"round {round_id}: global payload missing or sha256 mismatch, skipped")
            return False
        fetch_seconds = time.perf_counter() - started
        return self.train_and_commit(manifest, task, rows, decode_state(payload), fetch_seconds)

    def read_request(self, round_id: str, which, kind: type) -> tuple[Any, bytes]:
        """What the coordinator asks of us this round (its global or evaluation-request
        manifest, strictly parsed) and its bytes; (None, bytes) when it names another round or
        federation or its deadline passed."""
        raw = self.store.get_bytes(self.bucket, self.key(which, round_id), max_bytes=protocol.MAX_MANIFEST_BYTES)
        manifest = kind.from_json(raw)
        if manifest.round_id != round_id or manifest.federation != self.federation:
            self.log(f"round {round_id}: {kind.kind} manifest names another round or federation, skipped")
            return None, raw
        if datetime.fromisoformat(manifest.deadline) <= datetime.now(timezone.utc):
            self.log(f"round {round_id}: {kind.kind} deadline {manifest.deadline} already passed, skipped")
            return None, raw
        return manifest, raw

    def task_for(self, manifest: GlobalManifest | EvaluationRequest):
        """The installed task, when it is the one the round names; Decline otherwise."""
        from fl_tasks.config import ConfigError
        from fl_tasks.tasks.api import TaskError, load_task, params_sha256

        wanted = manifest.task
        if params_sha256(wanted["params"]) != wanted["params_sha256"]:
            raise Decline("the round's task params do not match their sha256")
        contract = DataContract.from_dict(manifest.contract)
        cache_key = f"{wanted['entrypoint']}|{wanted['params_sha256']}|{contract.sha256}"
        if cache_key not in self._tasks:
            try:
                self._tasks[cache_key] = load_task(wanted["entrypoint"], wanted["params"], contract)
            except (TaskError, ConfigError) as exc:
                raise Decline(f"task {wanted['entrypoint']} is not usable here: {exc}") from None
        task = self._tasks[cache_key]
        if task.version != wanted["version"]:
            raise Decline(f"task {wanted['entrypoint']} version {task.version} is installed here, the round needs "
                          f"version {wanted['version']}")
        return task

    def read_rows(self, manifest: GlobalManifest | EvaluationRequest, contract: DataContract) -> "pd.DataFrame":
        """The round's data window from the data source, checked against the contract."""
        window = Window.from_manifest(manifest.data_window)
        try:
            rows = self.source.read(window, contract.event_time)
        except DataSourceError as exc:
            raise Decline(f"data source unreadable: {exc}") from None
        problems = contract.check(rows)
        if problems:
            raise Decline("; ".join(problems) + (f" (data window {window})" if window.start or window.end else ""))
        return rows

    def train_rows(self, rows: "pd.DataFrame", contract: DataContract) -> "pd.DataFrame":
        """The rows training sees (the production agent: all of them)."""
        return rows

    def reported_state(self, trained: dict[str, "np.ndarray"], base: dict[str, "np.ndarray"],
                       round_id: str) -> dict[str, "np.ndarray"]:
        """The model state the update carries (the production agent: what it trained)."""
        return trained

    def train_and_commit(self, manifest: GlobalManifest, task, rows: "pd.DataFrame", base: dict[str, "np.ndarray"],
                         fetch_seconds: float) -> bool:
        from fl_tasks.tasks.api import TrainingSettings, load_model_state, model_state

        round_id, t = manifest.round_id, manifest.training
        try:
            model = load_model_state(task.build_model(), base)
        except ValueError as exc:
            self.decline(round_id, f"the global model does not fit the installed task's model: {exc}")
            return False
        try:
            codec = Codec.parse(t["codec"])
        except CodecError as exc:  # a coordinator newer than this agent
            self.decline(round_id, f"this silo cannot send the round's training.codec: {exc}")
            return False
        personal = self.personalization(manifest.personalization)
        if personal is not None and personal.local:
            missing = personal.missing_local(base)
            if missing:
                self.decline(round_id, f"personalization.local_tensors names tensors the task's model does not "
                                       f"have: {missing[:10]}")
                return False
            # FedBN: the silo trains with its own normalisation, never with the base's (the seed's).
            model = load_model_state(model, personal.as_run_here(base))
        global_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
        keep_optimizer = t.get("optimizer_state", "reset") == "keep"
        settings = TrainingSettings(local_epochs=int(t["local_epochs"]), learning_rate=float(t["learning_rate"]),
                                    batch_size=int(t["batch_size"]), proximal_mu=float(t["proximal_mu"]),
                                    seed=self.seed + zlib.crc32(round_id.encode()) % 10_000,
                                    lr_schedule=str(t.get("lr_schedule", "constant")),
                                    optimizer_state=self.kept_optimizer_state(model) if keep_optimizer else None)
        rows, held_out = split_rows(rows, float(t.get("holdout_fraction", 0.0)), self.salt)
        # Before training: the drift block goes into this round's manifest. On the silo's own
        # rows, not on what a simulated attacker's train_rows makes of them.
        drift, kept = self.measure_round_drift(manifest, task.contract, rows)
        self.log(f"round {round_id}: training {settings.local_epochs} epoch(s) on {len(rows)} rows "
                 f"from base version {manifest.model_version}"
                 + (f" ({len(held_out)} rows held out for evaluation)" if len(held_out) else ""))
        result = task.train(model, self.train_rows(rows, task.contract), settings, global_state)
        trained = model_state(model)
        reported = self.reported_state(trained, base, round_id)
        if personal is not None:  # fedbn: no change in the local tensors, for clipping, noise and top-k
            reported = personal.reported(reported, base)
        if manifest.privacy:  # the federation puts its differential-privacy noise at the silos
            from fl_tasks.silo.privacy import noised_update

            reported = noised_update(reported, base, float(manifest.privacy["clip_norm"]),
                                     float(manifest.privacy["noise_stddev"]), task.tensor_ranges)
        # topk: what earlier rounds did not send is added to this round's change (error feedback).
        # The task's bounded tensors (a variance >= 0) travel exactly: rounded, they could cross the bound.
        exact = task.tensor_ranges
        # fedbn: the local tensors never leave the silo. The update is encoded against the base
        # less them (as the coordinator decodes it), and so is the top-k residual kept.
        shared_base = personal.shared(base) if personal is not None else base
        residual = self.residuals().load(codec, shared_base, exact) if codec.name == "topk" else None
        encoded = encode_update(personal.shared(reported) if personal is not None else reported, shared_base, codec,
                                residual, exact)
        update = encoded.payload
        self.store.put_bytes(self.bucket, self.key(protocol.update_payload_key, round_id), update)
        metrics = {k: float(v) for k, v in result.metrics.items() if k != "train_seconds"}
        commit = UpdateManifest(
            client_id=self.client_id, federation=self.federation, round_id=round_id,
            base_model_version=manifest.model_version, base_sha256=manifest.payload_sha256,
            num_examples=result.num_examples, codec=t["codec"], payload_sha256=sha256_hex(update),
            payload_bytes=len(update), metrics=metrics,
            timings={"fetch_seconds": fetch_seconds, "train_seconds": float(result.metrics.get("train_seconds", 0.0))},
            created_at=datetime.now(timezone.utc).isoformat(), drift=drift,
        )
        if drift and len(commit.to_json()) > protocol.MAX_MANIFEST_BYTES - 1024:  # room for the signature
            # The coordinator refuses a manifest over the limit: the update matters more than its scores.
            self.log(f"round {round_id}: drift scores of {len(drift['columns'])} columns would take the update "
                     f"manifest over {protocol.MAX_MANIFEST_BYTES} bytes; sent without them")
            commit = replace(commit, drift={})
        self.commit(round_id, protocol.update_manifest_key, commit)
        self.log(f"round {round_id}: update committed ({result.num_examples} examples, "
                 f"{', '.join(f'{k} {v:.4f}' for k, v in metrics.items())})")
        self.keep_references(round_id, kept)
        if encoded.residual is not None:  # only now: an update that was never committed sent nothing
            self.keep_residual(round_id, codec, encoded.residual)
        if keep_optimizer and result.optimizer_state:
            self.keep_optimizer_state(round_id, result.optimizer_state)
        if personal is not None:  # after the commit: the coordinator does not wait on personal models
            # On the silo's own training share (as drift), not on what a simulated attacker trains on.
            personal.after_round(task, round_id, trained, base, manifest.payload_sha256, manifest.model_version, rows,
                                 settings)
        return True

    # --- personalization -----------------------------------------------------------------------
    def personalization(self, block: dict[str, Any]) -> SiloPersonalization | None:
        """This federation's personalization at this silo, as the manifest's block asks; None when off."""
        settings = settings_of(block)
        if settings is None:
            return None
        return SiloPersonalization(settings, personal_folder(self.state_dir, self.federation), self.log)

    # --- error feedback (topk) ---------------------------------------------------------------
    def residuals(self) -> ResidualStore:
        return ResidualStore(residual_folder(self.state_dir, self.federation), self.log)

    def keep_residual(self, round_id: str, codec: Codec, residual: dict[str, "np.ndarray"]) -> None:
        try:
            self.residuals().save(codec, residual, round_id)
        except OSError as exc:  # a full disk costs the next round its residual, not the agent its loop
            self.log(f"round {round_id}: error feedback: could not keep the residual: {type(exc).__name__}: {exc}")

    # --- the optimiser's state ----------------------------------------------------------------
    def optimizer_states(self) -> OptimizerStateStore:
        return OptimizerStateStore(optimizer_folder(self.state_dir, self.federation), self.log)

    def kept_optimizer_state(self, model) -> dict[str, Any] | None:
        """The optimiser state kept after this silo's last round, when it fits `model`."""
        state = self.optimizer_states().load()
        shapes = [list(p.shape) for p in model.parameters() if p.requires_grad]
        if state is not None and state["shapes"] != shapes:
            self.log("optimizer state kept for a model of other shapes (the task changed); starting from a fresh "
                     "optimizer")
            return None
        return state

    def keep_optimizer_state(self, round_id: str, state: dict[str, Any]) -> None:
        try:
            self.optimizer_states().save(state, round_id)
        except OSError as exc:  # a full disk costs the next round its moments, not the agent its loop
            self.log(f"round {round_id}: could not keep the optimizer state: {type(exc).__name__}: {exc}")

    # --- drift ------------------------------------------------------------------------------
    def measure_round_drift(self, manifest: GlobalManifest, contract: DataContract,
                            rows: "pd.DataFrame") -> tuple[dict[str, Any], "pd.DataFrame | None"]:
        """(the update's drift block, the drift columns of `rows` to keep as reference windows
        once the update is committed). The block is empty when the round asks for no drift,
        when this silo has no reference yet (its first window becomes one), and when drift
        cannot be measured here: that is logged, and the round goes on without scores."""
        if not manifest.drift:
            return {}, None
        round_id, kept = manifest.round_id, None
        try:
            settings = DriftSettings.from_dict(manifest.drift)
            kept = rows[[c for c in settings.columns if c in rows.columns]].copy()
            reference = self.drift_reference(settings, manifest, contract)
            if reference is None:
                self.log(f"round {round_id}: drift: no {settings.reference} reference window other than this "
                         "round's own yet; no scores this round")
                return {}, kept
            frame, label = reference
            where = report_path(self.state_dir, self.federation, round_id)
            report = measure_drift(frame, rows, settings, label, where, contract)
            prune_reports(where.parent, self.keep_drift_reports)
        except Exception as exc:  # whatever evidently or the state directory raise: drift never stops a round
            self.log(f"round {round_id}: drift not measured, no scores sent: {type(exc).__name__}: {exc}")
            return {}, kept
        drifted = sorted(name for name, column in report.columns.items() if column.drifted)
        self.log(f"round {round_id}: drift against the {report.reference}: {report.drifted_share:.0%} of "
                 f"{len(report.columns)} columns drifted"
                 + (f" ({', '.join(drifted[:10])}{', ...' if len(drifted) > 10 else ''})" if drifted else "")
                 + (", the data drifted" if report.dataset_drifted else "") + f"; report in {where}")
        return report.as_dict(), kept

    def references(self) -> ReferenceStore:
        return ReferenceStore(drift_folder(self.state_dir, self.federation) / "references")

    def drift_reference(self, settings: DriftSettings, manifest: GlobalManifest,
                        contract: DataContract) -> tuple["pd.DataFrame", str] | None:
        """(the reference rows, what they are in words), or None when there is no reference
        yet other than this round's own window."""
        if settings.reference == "fixed":
            window = Window.from_manifest(settings.reference_window)
            if window == Window.from_manifest(manifest.data_window):
                return None  # the fixed window is this round's: nothing to compare with
            try:
                frame = self.source.read(window, contract.event_time)
            except DataSourceError as exc:
                raise DriftError(f"the fixed reference window {window} is unreadable: {exc}") from None
            if frame.empty:
                raise DriftError(f"the fixed reference window {window} holds no rows here")
            start, end = (settings.reference_window.get(side) for side in ("start", "end"))
            return frame, f"fixed window {start or '-inf'}..{end or '+inf'}"
        store = self.references()
        reference = store.first() if settings.reference == "first" else store.previous(manifest.round_id)
        if reference is None or reference.round_id == manifest.round_id:
            return None
        missing = [c for c in settings.columns if c not in reference.columns]
        if missing:
            raise DriftError(f"the {reference.label} was kept without column(s) {missing}; delete "
                             f"{reference.path} and its .json record to take the next window as the reference")
        return reference.frame(), reference.label

    def keep_references(self, round_id: str, rows: "pd.DataFrame | None") -> None:
        """Keep the committed round's window: as the `first` reference once, and as the
        `previous` one always (whichever the federation uses now, it may switch later)."""
        if rows is None:
            return
        try:
            store = self.references()
            store.keep_previous(round_id, rows)
            if store.keep_first(round_id, rows):
                self.log(f"round {round_id}: drift: kept this window ({len(rows)} rows) as the first reference")
        except Exception as exc:  # a full disk costs the next round its scores; it must not stop the agent's loop
            self.log(f"round {round_id}: drift: could not keep this window as a reference: {type(exc).__name__}: {exc}")

    def decline(self, round_id: str, reason: str, which=protocol.decline_key) -> None:
        """Commit a signed decline: the coordinator stops waiting for this silo this round
        (or, with `which=protocol.evaluation_decline_key`, for its evaluation)."""
        reason = reason[:DeclineManifest.MAX_REASON_CHARS]
        self.commit(round_id, which, DeclineManifest(
            client_id=self.client_id, federation=self.federation, round_id=round_id, reason=reason,
            created_at=datetime.now(timezone.utc).isoformat()))
        what = "evaluation" if which is protocol.evaluation_decline_key else "round"
        self.log(f"round {round_id}: {what} declined: {reason}")

    # --- one evaluation request -------------------------------------------------------------
    def evaluate(self, round_id: str) -> bool:
        """Score the requested models on this silo's evaluation share and commit the scores;
        False when the request is skipped or declined. With personalization, the personal (and
        local-only) model is scored too (`personal_evaluation`)."""
        self.evaluated.add(round_id)
        request, raw = self.read_request(round_id, protocol.evaluation_request_key, EvaluationRequest)
        if request is None:
            return False
        try:
            task = self.task_for(request)
            rows = self.read_rows(request, DataContract.from_dict(request.contract))
            train, held = split_rows(rows, request.holdout_fraction, self.salt)
            if held.empty:
                raise Decline(f"no rows in this silo's evaluation share ({len(rows)} rows, holdout_fraction "
                              f"{request.holdout_fraction:g})")
            personal = self.personalization(request.personalization)
            states = {label: self.requested_model(round_id, label, model) for label, model in request.models.items()}
            # fedbn: a FedBN model only runs with a silo's own normalisation, so each model is
            # scored as this silo would run it (its local tensors in place, once it has some).
            scores = {label: self.score_state(task, label, personal.as_run_here(state) if personal else state, held)
                      for label, state in states.items()}
        except Decline as exc:
            self.decline(round_id, str(exc), protocol.evaluation_decline_key)
            return False
        evaluation = self.personal_evaluation(request, task, personal, states, scores, train, held)
        manifest = self.reported_evaluation(EvaluationManifest(
            client_id=self.client_id, federation=self.federation, round_id=round_id, request_sha256=sha256_hex(raw),
            num_examples=len(held), rows_held=len(rows), scores=scores,
            created_at=datetime.now(timezone.utc).isoformat(),
            personal=evaluation.report.as_dict() if evaluation else {}), task)
        self.commit(round_id, protocol.evaluation_result_key, manifest)
        self.log(f"round {round_id}: evaluation committed ({manifest.num_examples} rows): " + "; ".join(
            f"{label} " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            for label, metrics in manifest.scores.items()))
        if evaluation is not None and manifest.personal:  # the choice is recorded once it was sent
            try:
                personal.record_serving(evaluation.record)
            except OSError as exc:  # a full disk costs the history a line, not the agent its loop
                self.log(f"round {round_id}: personalization: could not record the serving choice in "
                         f"{personal.history}: {type(exc).__name__}: {exc}")
        return True

    def personal_evaluation(self, request: EvaluationRequest, task, personal: SiloPersonalization | None,
                            states: dict[str, dict[str, "np.ndarray"]], scores: dict[str, dict[str, float]],
                            train: "pd.DataFrame", held: "pd.DataFrame") -> PersonalEvaluation | None:
        """The personal block of this evaluation (with `share_weights`, its weights are in the
        bucket already), or None: personalization off, no personal model yet, or it failed.
        Whatever goes wrong here is logged, and the global scores are sent without the block."""
        if personal is None:
            return None
        round_id = request.round_id
        label = global_label(request.models)
        try:
            if label is None:
                raise NoPersonalModel(f"the request names neither of the models a personal one starts from "
                                      f"(candidate, champion), only {sorted(request.models)}")
            seed = self.seed + zlib.crc32(round_id.encode()) % 10_000
            evaluation = personal.evaluate(task, round_id, label, states[label], request.models[label]["sha256"],
                                           scores[label], train, held, seed)
            if personal.settings.share_weights:  # before the manifest: it commits what it names
                self.store.put_bytes(self.bucket, self.key(protocol.personal_weights_key, round_id), evaluation.weights)
                evaluation = replace(evaluation, report=replace(evaluation.report,
                                                                weights_bytes=len(evaluation.weights)))
        except StorageUnavailable:  # S3 away: the evaluation is tried again next poll, as a whole
            raise
        except NoPersonalModel as exc:
            self.log(f"round {round_id}: personalization ({personal.settings.strategy}): no personal scores "
                     f"sent: {exc}")
            return None
        except Exception as exc:  # noqa: BLE001 - personalization never stops the global evaluation
            self.log(f"round {round_id}: personalization ({personal.settings.strategy}) failed, no personal scores "
                     f"sent: {type(exc).__name__}: {exc}")
            return None
        self.log(f"round {round_id}: {evaluation.summary(task, label, scores[label])}")
        return evaluation

    def requested_model(self, round_id: str, label: str, model: dict[str, Any]) -> dict[str, "np.ndarray"]:
        """The weights of one requested model, checked against the request; Decline when they
        are missing, do not match their sha256 or are not safetensors."""
        payload = self.store.get_bytes(self.bucket, protocol.evaluation_model_key(
            self.prefix, self.federation, round_id, label), max_bytes=int(model["bytes"]))
        if payload is None or sha256_hex(payload) != model["sha256"]:
            raise Decline(f"model '{label}' is missing or does not match its sha256")
        try:
            return decode_state(payload)
        except CodecError as exc:
            raise Decline(f"model '{label}' is not readable: {exc}") from None

    def score_state(self, task, label: str, state: dict[str, "np.ndarray"], rows: "pd.DataFrame") -> dict[str, float]:
        """The task's metrics of one model's weights on `rows`; Decline when it cannot be scored."""
        try:
            return scored(task, state, rows)
        except ValueError as exc:  # e.g. a share with a single class: no ROC-AUC
            raise Decline(f"model '{label}' cannot be scored on this silo's evaluation share: {exc}") from None

    def reported_evaluation(self, manifest: EvaluationManifest, task) -> EvaluationManifest:
        """The evaluation the silo commits (the production agent: what it measured)."""
        return manifest

    def commit(self, round_id: str, which, manifest) -> None:
        if self.signing_key is not None:
            manifest = signing.sign_manifest(manifest, self.signing_key)
        # The manifest goes last: until it exists the coordinator ignores the payload.
        self.store.put_bytes(self.bucket, self.key(which, round_id), manifest.to_json(), "application/json")

    # --- the loop ---------------------------------------------------------------------------
    def run(self, poll_seconds: float = 2.0, max_rounds: int | None = None, idle_exit_seconds: float | None = None) -> int:
        """Poll until stopped; returns the number of rounds answered with an update."""
        answered, idle_since = 0, time.monotonic()
        while max_rounds is None or answered < max_rounds:
            try:
                rounds, evaluations = self.pending()
            except StorageUnavailable as exc:  # S3 away: the agent waits for it, it does not die
                self.log(f"S3 unavailable, polling again in {poll_seconds:g}s: {exc}")
                rounds, evaluations = [], []
            # Evaluations first: they take seconds, and a round's promotion waits on them.
            for work, done, act in ((evaluations, self.evaluated, self.evaluate), (rounds, self.answered, self.answer)):
                for round_id in work:
                    try:
                        if act(round_id) and done is self.answered:
                            answered += 1  # max_rounds counts rounds trained
                    except (ValueError, KeyError, ManifestError) as exc:  # a bad manifest must not stop the agent
                        self.log(f"round {round_id}: skipped: {exc}")
                    except StorageUnavailable as exc:  # the manifest goes last: a retry starts over cleanly
                        done.discard(round_id)
                        self.log(f"round {round_id}: S3 unavailable, trying again next poll: {exc}")
            pending = rounds or evaluations
            if pending:
                idle_since = time.monotonic()
            elif idle_exit_seconds is not None and time.monotonic() - idle_since > idle_exit_seconds:
                break
            time.sleep(poll_seconds)
        return answered


def build_parser() -> argparse.ArgumentParser:
    """The `fl-client` command line (also used to check the flags in docker-compose.yaml)."""
    parser = argparse.ArgumentParser(prog="fl-client", description=__doc__.splitlines()[0])
    parser.add_argument("--client-id", required=True, help="this silo's id, as in the federation file")
    parser.add_argument("--federation", required=True, help="federation name")
    parser.add_argument("--bucket", required=True, help="this silo's bucket, s3://bucket[/prefix]")
    parser.add_argument("--data", required=True,
                        help="local rows: a .parquet or .csv file, or a SQLAlchemy database URL "
                             "(with --sql-table or --sql-query)")
    parser.add_argument("--sql-table", default=None, help="with a database URL: the table of rows")
    parser.add_argument("--sql-query", default=None,
                        help="with a database URL: a query using :window_start and :window_end")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: FL_S3_ENDPOINT_URL or AWS)")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--max-rounds", type=int, default=None, help="exit after answering this many rounds")
    parser.add_argument("--idle-exit-seconds", type=float, default=None, help="exit after this long with no work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signing-key-file", default=None,
                        help="file holding this silo's signing key (default: the FL_SIGNING_KEY variable; "
                             "neither: manifests go unsigned)")
    parser.add_argument("--state-dir", default=None,
                        help="where this silo keeps its drift reference windows and reports, its top-k "
                             "residual, its optimizer state and its personal models, never sent anywhere "
                             "(default: the FL_CLIENT_STATE_DIR variable, else ~/.fl-client/<client-id>)")
    parser.add_argument("--keep-drift-reports", type=int, default=30,
                        help="how many of evidently's HTML drift reports (megabytes each) to keep in the state "
                             "directory; older ones are deleted")
    return parser


def read_signing_key(path: str | None) -> str | None:
    """The key from --signing-key-file (surrounding whitespace stripped), else FL_SIGNING_KEY."""
    if path:
        with open(path) as handle:
            return handle.read().strip()
    return os.environ.get("FL_SIGNING_KEY") or None


def agent_from_args(args: argparse.Namespace, agent_class: type[SiloAgent] = SiloAgent, **extra: Any) -> SiloAgent:
    """The agent a command line describes; ValueError/OSError with a readable message."""
    source = open_source(args.data, args.sql_table, args.sql_query)
    return agent_class(args.client_id, args.federation, args.bucket, source, ObjectStore(args.endpoint_url),
                       read_signing_key(args.signing_key_file), args.seed, state_dir=args.state_dir,
                       keep_drift_reports=args.keep_drift_reports, **extra)


def serve(agent: SiloAgent, args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    agent.log(f"serving federation {args.federation} from {args.bucket} with rows from {agent.source.describe()}; "
              f"manifests {'signed' if agent.signing_key else 'unsigned'}; drift state in {agent.state_dir}")
    try:
        agent.run(args.poll_seconds, args.max_rounds, args.idle_exit_seconds)
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        agent = agent_from_args(args)
    except (OSError, ValueError, KeyError) as exc:
        print(f"fl-client: {exc}", file=sys.stderr)
        return 2
    return serve(agent, args)


if __name__ == "__main__":
    sys.exit(main())
