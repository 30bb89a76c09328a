"""The federation's privacy budget: a ledger of released rounds, and the accountant that reads it.

Google's `dp-accounting` (the RDP or PLD accountant) does the accounting; it keeps no state,
so every round whose noisy aggregate was released appends one event to a ledger in the
coordinator's bucket (`<F>/privacy/ledger.json`), and the accountant is rebuilt from the
ledger whenever epsilon is needed.

What counts: a round spends its budget once its noisy candidate is stored, whatever
happens next. A rolled-back round's candidate was still registered in MLflow and sent to the
silos for evaluation, so its noise was released; a round that fails before the aggregate
(quorum missed, every update rejected, the budget check) spends nothing. Re-running the
aggregate step draws the same noise (its seed is kept with the round), so a round is never
counted twice. Each event names the round's base and its round, so the ledger follows the
champion's lineage through promotions and rollbacks.

Sampling and neighbours: Poisson sampling and `all` (every silo, q = 1) use add-or-remove
neighbouring federations (one silo's data in or out), sensitivity C. Fixed-size sampling
keeps the number of silos public, so neighbours replace one silo, whose sensitivity is 2C:
the accountant sees noise multiplier z / 2.

    fl-privacy epsilon federations/banks.yaml         # what the ledger has spent (needs S3 access)
    fl-privacy noise --epsilon 8 --rounds 50 --sample-rate 0.5 --silos 10
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_tasks.config import FederationSpec, PrivacySpec
    from fl_tasks.protocol.storage import ObjectStore


class PrivacyError(ValueError):
    """The ledger cannot be accounted (an event the accountant cannot take, a mixed ledger)."""


@dataclass(frozen=True)
class PrivacyEvent:
    """One released round: a sampled Gaussian mechanism on the silos' clipped updates."""

    round_id: str
    noise_multiplier: float  # z: noise std / clip norm on the sum
    sampling: str  # poisson | fixed | all
    population: int  # silos in the federation when the round was sampled
    sample_rate: float | None = None  # poisson: each silo's probability
    sample_size: int | None = None  # fixed: how many silos
    base_version: str = ""  # the model the round started from (its lineage)
    base_round_id: str | None = None
    released_at: str = ""

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> "PrivacyEvent":
        return cls(**{k: v for k, v in body.items() if k in cls.__dataclass_fields__})

    def key(self) -> tuple:
        """What the accountant sees: events with the same key compose as one self-composed event."""
        return (self.noise_multiplier, self.sampling, self.population, self.sample_rate, self.sample_size)


def round_event(privacy: Mapping[str, Any], round_id: str, base_version: str = "", base_round_id: str | None = None,
                released_at: str = "") -> PrivacyEvent:
    """The event a round spends; `privacy` is its plan's privacy record (the federation's
    privacy settings and the population)."""
    sampling = privacy["sampling"]
    return PrivacyEvent(round_id=round_id, noise_multiplier=float(privacy["noise_multiplier"]), sampling=sampling,
                        population=int(privacy["population"]),
                        sample_rate=float(privacy["sample_rate"]) if sampling == "poisson" else None,
                        sample_size=privacy["sample_size"] if sampling == "fixed" else None,
                        base_version=base_version, base_round_id=base_round_id, released_at=released_at)


def _dp_event(event: PrivacyEvent):
    import dp_accounting

    if event.sampling == "fixed":
        # Replace-one neighbours: one silo's update can move the sum by 2C.
        gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier / 2)
        return dp_accounting.SampledWithoutReplacementDpEvent(event.population, event.sample_size, gaussian)
    gaussian = dp_accounting.GaussianDpEvent(event.noise_multiplier)
    if event.sampling == "all" or event.sample_rate == 1.0:
        return gaussian
    return dp_accounting.PoissonSampledDpEvent(event.sample_rate, gaussian)


def _accountant(kind: str, replace_one: bool):
    import dp_accounting
    from dp_accounting import pld, rdp

    logging.getLogger("absl").setLevel(logging.ERROR)  # RDP warns on orders it skips; the answer is still sound
    relation = dp_accounting.NeighboringRelation.REPLACE_ONE if replace_one else \
        dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if kind == "pld":
        if replace_one:
            raise PrivacyError("the PLD accountant has no fixed-size sampling; use accountant: rdp")
        return pld.PLDAccountant(relation)
    return rdp.RdpAccountant(neighboring_relation=relation)


def epsilon(events: list[PrivacyEvent], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of every event composed, by dp-accounting (0.0 for no events)."""
    if not events:
        return 0.0
    replace_one = {e.sampling == "fixed" for e in events}
    if len(replace_one) > 1:
        raise PrivacyError("the ledger mixes fixed-size sampling (replace-one neighbours) with poisson or all "
                           "(add-or-remove neighbours), which no accountant composes; keep one kind of sampling "
                           "for a federation's lineage")
    import dp_accounting

    counts: dict[tuple, tuple[PrivacyEvent, int]] = {}
    for event in events:
        first, count = counts.get(event.key(), (event, 0))
        counts[event.key()] = (first, count + 1)
    account = _accountant(accountant, replace_one.pop())
    for event, count in counts.values():
        dp_event = _dp_event(event)
        if not account.supports(dp_event):
            raise PrivacyError(f"the {accountant} accountant cannot account round {event.round_id}'s event {dp_event}")
        account.compose(dp_accounting.SelfComposedDpEvent(dp_event, count) if count > 1 else dp_event)
    return float(account.get_epsilon(delta))


def noise_multiplier_for(target_epsilon: float, delta: float, rounds: int, population: int,
                         sampling: str = "poisson", sample_rate: float = 1.0, sample_size: int | None = None,
                         accountant: str = "rdp") -> float:
    """The smallest noise multiplier z (to 3 decimals) whose `rounds` rounds stay within
    `target_epsilon` at `delta`, found by dp-accounting's calibration."""
    import dp_accounting

    if rounds < 1:
        raise PrivacyError(f"rounds must be at least 1, got {rounds}")

    def events(z: float) -> list[PrivacyEvent]:
        return [PrivacyEvent("plan", z, sampling, population, sample_rate if sampling == "poisson" else None,
                             sample_size if sampling == "fixed" else None)]

    def make_event(z: float):
        return dp_accounting.SelfComposedDpEvent(_dp_event(events(z)[0]), rounds)

    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant, sampling == "fixed"), make_event, target_epsilon, delta,
        dp_accounting.LowerEndpointAndGuess(0.05, 2.0), tol=1e-3))


@dataclass(frozen=True)
class Budget:
    """Where a federation stands: what its ledger spent, and what the next round would."""

    spent: float  # epsilon of the ledger
    after_next: float  # epsilon once the next round is released
    rounds: int  # events in the ledger
    delta: float
    max_epsilon: float | None

    @property
    def exceeded(self) -> bool:
        return self.max_epsilon is not None and self.after_next > self.max_epsilon

    def refusal(self) -> str:
        return (f"privacy budget: this round would bring epsilon to {self.after_next:.3f} at delta {self.delta:g}, "
                f"over privacy.max_epsilon {self.max_epsilon:g} (spent {self.spent:.3f} over {self.rounds} released "
                "rounds). Nothing was sent to the silos and no budget was spent. Fix: stop training this "
                "federation, or raise privacy.max_epsilon or privacy.noise_multiplier (fl-privacy noise finds one "
                "for a target epsilon)")


class PrivacyLedger:
    """The federation's released rounds, in the coordinator's bucket. One event per round: a
    re-run of a round's aggregate step finds its event and adds nothing."""

    def __init__(self, store: "ObjectStore", bucket: str, federation: str):
        self.store, self.bucket, self.federation = store, bucket, federation

    @property
    def key(self) -> str:
        return f"{self.federation}/privacy/ledger.json"

    def events(self) -> list[PrivacyEvent]:
        data = self.store.get_bytes(self.bucket, self.key)
        return [] if data is None else [PrivacyEvent.from_dict(e) for e in json.loads(data)["events"]]

    def record(self, event: PrivacyEvent) -> list[PrivacyEvent]:
        events = self.events()
        if any(e.round_id == event.round_id for e in events):
            return events
        events.append(event)
        body = {"federation": self.federation, "events": [asdict(e) for e in events]}
        self.store.put_bytes(self.bucket, self.key, json.dumps(body, indent=1).encode(), "application/json")
        return events

    def budget(self, privacy: Mapping[str, Any], next_event: PrivacyEvent) -> Budget:
        """Spent so far and after `next_event`, under the plan's privacy record (delta,
        accountant, max_epsilon)."""
        events = [e for e in self.events() if e.round_id != next_event.round_id]
        delta, accountant = float(privacy["delta"]), privacy["accountant"]
        return Budget(spent=epsilon(events, delta, accountant), after_next=epsilon(events + [next_event], delta,
                                                                                   accountant),
                      rounds=len(events), delta=delta, max_epsilon=privacy["max_epsilon"])


def draw_silos(spec: "PrivacySpec", clients: list[str]) -> list[str]:
    """This round's silos under the sampling rule, drawn with the operating system's randomness
    (the draw must not be predictable, or sampling amplifies nothing)."""
    import secrets

    rng = secrets.SystemRandom()
    if spec.sampling == "all":
        return list(clients)
    if spec.sampling == "fixed":
        picked = set(rng.sample(clients, spec.sample_size))
        return [c for c in clients if c in picked]
    return [c for c in clients if rng.random() < spec.sample_rate]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-privacy", description="Differential-privacy budgets of federations.")
    commands = parser.add_subparsers(dest="command", required=True)
    noise = commands.add_parser("noise", help="the noise multiplier for a target epsilon over planned rounds")
    noise.add_argument("--epsilon", type=float, required=True)
    noise.add_argument("--delta", type=float, default=1e-5)
    noise.add_argument("--rounds", type=int, required=True)
    noise.add_argument("--silos", type=int, required=True, help="silos in the federation")
    noise.add_argument("--sampling", choices=("poisson", "fixed", "all"), default="poisson")
    noise.add_argument("--sample-rate", type=float, default=1.0)
    noise.add_argument("--sample-size", type=int)
    noise.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    spent = commands.add_parser("epsilon", help="what a federation's ledger has spent")
    spent.add_argument("federation_file")
    args = parser.parse_args(argv)
    try:
        if args.command == "noise":
            z = noise_multiplier_for(args.epsilon, args.delta, args.rounds, args.silos, args.sampling,
                                     args.sample_rate, args.sample_size, args.accountant)
            print(json.dumps({"noise_multiplier": round(math.ceil(z * 1000) / 1000, 3), "epsilon": args.epsilon,
                              "delta": args.delta, "rounds": args.rounds, "silos": args.silos,
                              "sampling": args.sampling, "accountant": args.accountant}))
            return 0
        from fl_tasks.config import load_federation
        from fl_tasks.protocol.storage import ObjectStore

        spec = load_federation(args.federation_file)
        print(json.dumps(ledger_status(spec, ObjectStore(spec.endpoint_url)), indent=1))
        return 0
    except (PrivacyError, ValueError) as exc:
        print(f"fl-privacy: {exc}", file=sys.stderr)
        return 2


def ledger_status(spec: "FederationSpec", store: "ObjectStore") -> dict[str, Any]:
    """The federation's spent epsilon and its ledger, for people and for the CLI."""
    if spec.privacy is None:
        raise PrivacyError(f"{spec.source}: field 'privacy': the federation has no privacy section. Fix: add one")
    events = PrivacyLedger(store, spec.coordinator_bucket, spec.federation).events()
    p = spec.privacy
    return {"federation": spec.federation, "epsilon": epsilon(events, p.delta, p.accountant), "delta": p.delta,
            "max_epsilon": p.max_epsilon, "rounds": len(events), "events": [asdict(e) for e in events]}


if __name__ == "__main__":
    sys.exit(main())
