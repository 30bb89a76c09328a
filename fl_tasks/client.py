"""The silo runtime (`fl-client`): answer each committed round with a locally trained update.

It only ever reads the global model from its own bucket and writes back model weights and
a manifest; the silo's rows never leave the machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from fl_tasks import protocol, signing
from fl_tasks.behaviours import BEHAVIOURS, DROPOUT, STRAGGLER, poison_data, poison_model
from fl_tasks.codec import decode_state, encode_state
from fl_tasks.config import BUCKET_URI_PATTERN, ModelSpec
from fl_tasks.datasets import Table
from fl_tasks.protocol import GlobalManifest, UpdateManifest, sha256_hex
from fl_tasks.storage import ObjectStore, StorageUnavailable



@dataclass
class ClientRuntime:
    client_id: str
    federation: str
    bucket_uri: str
    data: Table
    store: ObjectStore
    behaviour: str = "honest"
    delay_seconds: float = 0.0
    seed: int = 0
    attack_scale: float = 10.0
    signing_key: bytes | str | None = None  # signs each update manifest (HMAC-SHA256) when set

    def __post_init__(self) -> None:
        if self.signing_key is not None:
            self.signing_key = signing.as_key(self.signing_key, f"the signing key of {self.client_id}")
        if not protocol.NAME_PATTERN.fullmatch(self.client_id):
            raise ValueError(f"client id {self.client_id!r} must match {protocol.NAME_PATTERN.pattern}")
        match = BUCKET_URI_PATTERN.fullmatch(self.bucket_uri)
        if not match:
            raise ValueError(f"bucket {self.bucket_uri!r} must look like s3://bucket[/prefix]")
        self.bucket, self.prefix = match.group(1), (match.group(2) or "").strip("/")
        if self.behaviour not in BEHAVIOURS:
            raise ValueError(f"behaviour {self.behaviour!r} must be one of {', '.join(BEHAVIOURS)}")
        self.answered: set[str] = set()

    def log(self, message: str) -> None:
        print(f"[{self.client_id}] {message}", flush=True)

    def pending_rounds(self) -> list[str]:
        """Rounds with a committed global manifest and no update from us yet, oldest first."""
        listing = protocol.rounds_listing_prefix(self.prefix, self.federation)
        rounds = set()
        for key in self.store.list_keys(self.bucket, listing):
            round_id, _, rest = key[len(listing):].partition("/")
            if rest == "global/manifest.json" and round_id not in self.answered:
                rounds.add(round_id)
        return sorted(r for r in rounds if not self.store.exists(
            self.bucket, protocol.update_manifest_key(self.prefix, self.federation, r)))

    def answer(self, round_id: str) -> bool:
        """Train on one round and commit the update; False when the round is skipped."""
        self.answered.add(round_id)
        raw = self.store.get_bytes(self.bucket, protocol.global_manifest_key(self.prefix, self.federation, round_id))
        manifest = GlobalManifest.from_json(raw)
        if manifest.round_id != round_id or manifest.federation != self.federation:
            self.log(f"round {round_id}: manifest names another round or federation, skipped")
            return False
        if datetime.fromisoformat(manifest.deadline) <= datetime.now(timezone.utc):
            self.log(f"round {round_id}: deadline {manifest.deadline} already passed, skipped")
            return False
        if self.behaviour == DROPOUT:
            self.log(f"round {round_id}: dropping out (simulated)")
            return False
        started = time.perf_counter()
        payload = self.store.get_bytes(self.bucket, protocol.global_model_key(self.prefix, self.federation, round_id),
                                       max_bytes=manifest.payload_bytes)
        if payload is None or sha256_hex(payload) != manifest.payload_sha256:
            self.log(f"round {round_id}: global payload missing or sha256 mismatch, skipped")
            return False
        fetch_seconds = time.perf_counter() - started
        window = manifest.data_window
        rows = self.data.window(np.datetime64(window["start"][:19], "s") if window.get("start") else None,
                                np.datetime64(window["end"][:19], "s") if window.get("end") else None)
        if len(rows) < 2:
            self.log(f"round {round_id}: no local rows in data window {window}, skipped")
            return False

        from fl_tasks.models import build_model, load_numpy_state, state_to_numpy
        from fl_tasks.training import train_local

        spec = ModelSpec(factory=manifest.model["factory"], input_dim=int(manifest.model["input_dim"]),
                         hidden=tuple(manifest.model["hidden"]), batch_norm=bool(manifest.model["batch_norm"]))
        base = decode_state(payload)
        model = load_numpy_state(build_model(spec), base)
        t = manifest.training
        self.log(f"round {round_id}: training {t['local_epochs']} epoch(s) on {len(rows)} rows "
                 f"from base version {manifest.model_version}")
        metrics = train_local(model, poison_data(self.behaviour, rows), epochs=int(t["local_epochs"]), learning_rate=float(t["learning_rate"]),
                              batch_size=int(t["batch_size"]), proximal_mu=float(t["proximal_mu"]),
                              seed=self.seed + zlib.crc32(round_id.encode()) % 10_000)
        if self.behaviour == STRAGGLER and self.delay_seconds > 0:
            self.log(f"round {round_id}: straggling for {self.delay_seconds:.0f}s (simulated)")
            time.sleep(self.delay_seconds)
        update = encode_state(poison_model(self.behaviour, state_to_numpy(model), base, self.attack_scale, round_id),
                              t["codec"])
        self.store.put_bytes(self.bucket, protocol.update_payload_key(self.prefix, self.federation, round_id), update)
        commit = UpdateManifest(
            client_id=self.client_id, federation=self.federation, round_id=round_id,
            base_model_version=manifest.model_version, base_sha256=manifest.payload_sha256,
            num_examples=len(rows), codec=t["codec"], payload_sha256=sha256_hex(update), payload_bytes=len(update),
            metrics={k: v for k, v in metrics.items() if k != "train_seconds"},
            timings={"fetch_seconds": fetch_seconds, "train_seconds": metrics["train_seconds"]},
            created_at=datetime.now(timezone.utc).isoformat(),
        )
        if self.signing_key is not None:
            commit = signing.sign_manifest(commit, self.signing_key)
        # The manifest goes last: until it exists the coordinator ignores the payload.
        self.store.put_bytes(self.bucket, protocol.update_manifest_key(self.prefix, self.federation, round_id),
                             commit.to_json(), "application/json")
        self.log(f"round {round_id}: update committed (loss {metrics['train_loss']:.4f}, {len(rows)} examples)")
        return True

    def run(self, poll_seconds: float = 2.0, max_rounds: int | None = None, idle_exit_seconds: float | None = None) -> int:
        """Poll until stopped; returns the number of rounds answered."""
        answered, idle_since = 0, time.monotonic()
        while max_rounds is None or answered < max_rounds:
            try:
                pending = self.pending_rounds()
            except StorageUnavailable as exc:  # S3 away: the agent waits for it, it does not die
                self.log(f"S3 unavailable, polling again in {poll_seconds:g}s: {exc}")
                pending = []
            for round_id in pending:
                try:
                    answered += self.answer(round_id)
                except (ValueError, KeyError) as exc:  # a bad manifest must not stop the agent
                    self.log(f"round {round_id}: skipped: {exc}")
                except StorageUnavailable as exc:  # the manifest goes last: a retry starts over cleanly
                    self.answered.discard(round_id)
                    self.log(f"round {round_id}: S3 unavailable, trying again next poll: {exc}")
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
    parser.add_argument("--data", required=True, help="local training rows (.npz written by fl-simulate)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: FL_S3_ENDPOINT_URL or AWS)")
    parser.add_argument("--poll-seconds", type=float, default=2.0)
    parser.add_argument("--max-rounds", type=int, default=None, help="exit after answering this many rounds")
    parser.add_argument("--idle-exit-seconds", type=float, default=None, help="exit after this long with no work")
    parser.add_argument("--behaviour", choices=BEHAVIOURS, default="honest", help="simulated behaviour")
    parser.add_argument("--attack-scale", type=float, default=10.0,
                        help="k of sign_flip/scaled, noise std of noise/colluding")
    parser.add_argument("--delay-seconds", type=float, default=0.0, help="straggler delay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signing-key-file", default=None,
                        help="file holding this silo's signing key (default: the FL_SIGNING_KEY variable; "
                             "neither: updates go unsigned)")
    return parser


def read_signing_key(path: str | None) -> str | None:
    """The key from --signing-key-file (surrounding whitespace stripped), else FL_SIGNING_KEY."""
    if path:
        with open(path) as handle:
            return handle.read().strip()
    return os.environ.get("FL_SIGNING_KEY") or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        data = Table.load(args.data)
        runtime = ClientRuntime(args.client_id, args.federation, args.bucket, data, ObjectStore(args.endpoint_url),
                                args.behaviour, args.delay_seconds, args.seed, args.attack_scale,
                                read_signing_key(args.signing_key_file))
    except (OSError, ValueError, KeyError) as exc:
        print(f"fl-client: {exc}", file=sys.stderr)
        return 2
    runtime.log(f"serving federation {args.federation} from {args.bucket} with {len(data)} local rows; "
                f"updates {'signed' if runtime.signing_key else 'unsigned'}")
    try:
        runtime.run(args.poll_seconds, args.max_rounds, args.idle_exit_seconds)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
