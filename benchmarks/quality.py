"""Model quality on unequal silos: federated against centralized, the default defence, and
personalized models against global and local-only ones.

The real fraud data (fl_tasks.simulation.datasets.unequal_split) split like real banks: one
bank with 75% of the rows at a 1.5% fraud rate, four small ones with 4-9% of the rows each at
5-12% fraud and amounts in other units (regional drift). Each bank's rows are split into
training, validation (where a silo picks the model it serves) and test rows. Every run goes
through the library's own code: the task's training loop, the aggregation strategies, the
coordinator's screening and weight cap, the silo's personalization (fl_tasks.silo.personal).

Tables (medians over seeds; each seed redraws the split and the training):

- `global`: test ROC-AUC and PR-AUC on the pooled test rows (every bank's test rows) of the
  centralized model (trained on every bank's training rows; the best epoch on the pooled
  validation rows, its strongest form) and of each federated setting;
- `server`: the server optimisers' learning rate `eta` swept on this split, with the pooled
  validation PR-AUC that would pick it;
- `defence`: the default screening and aggregation against plain FedAvg, clean, with one
  bank sending its update sign-flipped x10, and with one sending a sign-flipped update scaled
  to the honest updates' median norm (inside every norm screen);
- `per_silo`: each bank's test ROC-AUC and PR-AUC of its local-only model, the global model
  and each personalization strategy, and of the model it serves (global or personal, picked
  on its validation rows).

    .venv/bin/python benchmarks/quality.py [--seeds 3] [--rounds 30] [--workers 2]
        [--only global,defence,personal] [--output benchmarks/results-quality.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Server learning rates swept on this split (10 and 20 rounds of `--epochs` local epochs).
SERVER_ETAS = {"fedavgm": (0.3, 1.0), "fedadam": (0.003, 0.01, 0.03, 0.1), "fedyogi": (0.003, 0.01, 0.03, 0.1)}
ATTACKER = "bank-north"  # a small bank: an attacker holding 75% of the data is the federation
ATTACKS = ("clean", "sign_flip_x10", "sign_flip_in_norm")
# Aggregation settings compared for the default defence: (strategy, params, screening on).
DEFENCES = {
    "fedavg (no screening)": ("fedavg", {}, False),
    "fedavg + default screening": ("fedavg", {}, True),
    "median + screening": ("median", {}, True),
    "trimmed_mean + screening": ("trimmed_mean", {"beta": 0.2}, True),
    # Krum rules need n >= 2f + 3 = 5 updates: they cannot run after a screen drops one of five.
    "multi_krum (no screening)": ("multi_krum", {"f": 1}, False),
    "weighted_median + screening": ("weighted_median", {}, True),
    "weighted_trimmed_mean + screening": ("weighted_trimmed_mean", {"beta": 0.2}, True),
    "weighted_multi_krum (no screening)": ("weighted_multi_krum", {"f": 1}, False),
    "centered_clipping + screening": ("centered_clipping", {}, True),
}


class Federation:
    """The benchmark's banks, task and settings for one seed."""

    def __init__(self, seed: int, batch_norm: bool = False) -> None:
        import pandas as pd
        import torch

        from fl_tasks.config import load_federation
        from fl_tasks.simulation.datasets import creditcard_frame, unequal_split
        from fl_tasks.tasks.api import load_task

        torch.set_num_threads(1)
        self.spec = load_federation(REPO / "federations" / "banks.yaml")
        params = {**self.spec.task.params, "batch_norm": batch_norm}
        self.task = load_task(self.spec.task.entrypoint, params, self.spec.contract)
        self.silos = unequal_split(creditcard_frame(), self.spec.contract.label.name, seed=seed)
        self.test = pd.concat([s.test for s in self.silos])
        self.validation = pd.concat([s.validation for s in self.silos])
        self.seed = seed

    def settings(self, epochs: int, round_number: int, index: int, optimizer_state=None, lr: float | None = None,
                 mu: float = 0.0):
        from fl_tasks.tasks.api import TrainingSettings

        return TrainingSettings(epochs, lr or self.spec.training.learning_rate, self.spec.training.batch_size,
                                proximal_mu=mu, seed=self.seed * 100_000 + round_number * 100 + index,
                                optimizer_state=optimizer_state)

    def scores(self, model, rows) -> dict[str, float]:
        return {k: float(v) for k, v in self.task.evaluate(model, rows).items()}


def centralized(seed: int, epochs: int) -> dict:
    """All training rows in one place; the epoch with the best pooled validation PR-AUC."""
    import pandas as pd

    from fl_tasks.tasks.api import load_model_state, model_state

    fed = Federation(seed)
    model = fed.task.seeded_model(fed.spec.task.seed)
    rows = pd.concat([s.train for s in fed.silos])
    best, best_state, state = -1.0, None, None
    for epoch in range(epochs):
        state = fed.task.train(model, rows, fed.settings(1, epoch, 0, state), model.state_dict()).optimizer_state
        score = fed.scores(model, fed.validation)["pr_auc"]
        if score > best:
            best, best_state = score, model_state(model)
    model = load_model_state(fed.task.build_model(), best_state)
    return {"setting": "centralized", "seed": seed, **fed.scores(model, fed.test)}


def in_norm_sign_flip(trained, base, honest: list) -> dict:
    """The honest updates' mean change, reversed and scaled to their median norm: an update no
    norm screen tells from an honest one."""
    import numpy as np

    from fl_tasks.aggregation.checks import floating_names
    from fl_tasks.aggregation.clip import update_norm

    names = floating_names(base)
    mean = {n: np.mean([h[n].astype(np.float64) - base[n] for h in honest], axis=0) for n in names}
    norm = float(np.sqrt(sum(float((v ** 2).sum()) for v in mean.values())))
    target = statistics.median(update_norm(h, base) for h in honest)
    out = dict(trained)
    for n in names:
        out[n] = (base[n] - mean[n] * (target / max(norm, 1e-12))).astype(base[n].dtype)
    return out


def federated(seed: int, rounds: int, epochs: int, strategy: str = "fedavg", params: dict | None = None,
              keep_optimizer: bool = True, screening: bool = True, attack: str = "clean", label: str = "",
              personal: bool = False, batch_norm: bool = False) -> dict:
    """One federation of `rounds` rounds through the library's training, screening, weight cap
    and strategy. With `personal`, the silos also keep their local-only and Ditto models each
    round, fine-tune the final global model, and pick what they serve (fl_tasks.silo.personal)."""
    from fl_tasks.aggregation import build
    from fl_tasks.aggregation.mean import cap_shares
    from fl_tasks.coordinator import screening as screening_rules
    from fl_tasks.tasks.api import load_model_state, model_state
    from robustness import default_defence

    fed = Federation(seed, batch_norm)
    spec, task = fed.spec, fed.task
    aggregator = build(strategy, **(params or {}))
    model = task.seeded_model(spec.task.seed)
    optimizer: dict = {}
    local_bn: dict = {}  # FedBN: each silo's batch-norm tensors, never sent
    bn_names = task.normalization_tensors(model) if batch_norm and personal else []
    tracks = PersonalTracks(fed, model_state(model)) if personal else None
    rejected, started = 0, time.perf_counter()
    for number in range(rounds):
        base = model_state(model)
        updates, honest = [], []
        for index, silo in enumerate(fed.silos):
            start = {**base, **local_bn.get(silo.name, {})}
            local = load_model_state(task.build_model(), start)
            result = task.train(local, silo.train, fed.settings(epochs, number, index, optimizer.get(silo.name)
                                                                if keep_optimizer else None), local.state_dict())
            optimizer[silo.name] = result.optimizer_state
            trained = model_state(local)
            if bn_names:
                local_bn[silo.name] = {n: trained[n] for n in bn_names}
                trained = {**trained, **{n: base[n] for n in bn_names}}
            updates.append((silo.name, trained, result.num_examples))
            if silo.name != ATTACKER:
                honest.append(trained)
            if tracks:
                tracks.round(silo, index, number, epochs, base)
        updates = [(attacked(attack, state, base, honest, number) if name == ATTACKER else state, n)
                   for name, state, n in updates]
        if screening:
            weighted, dropped = default_defence(spec, updates, base, epochs, screening_rules, cap_shares, task)
        else:
            weighted, dropped = list(zip([s for s, _ in updates], cap_shares([n for _, n in updates],
                                                                             spec.max_weight_share))), 0
        rejected += dropped
        try:
            model = load_model_state(task.build_model(), aggregator.aggregate(base, iter(weighted)))
        except ValueError as exc:  # e.g. Krum with too few updates left after screening
            return {"setting": label or strategy, "seed": seed, "attack": attack, "error": f"round {number}: {exc}"}
    out = {"setting": label or strategy, "seed": seed, "attack": attack, **fed.scores(model, fed.test),
           "validation_pr_auc": fed.scores(model, fed.validation)["pr_auc"],
           "rejected_updates": rejected, "seconds": time.perf_counter() - started}
    if tracks:
        out["per_silo"] = tracks.finish(model, local_bn)
    return out


def attacked(attack: str, state, base, honest, number: int):
    from fl_tasks.simulation.attacks import SIGN_FLIP, poison_model

    if attack == "sign_flip_x10":
        return poison_model(SIGN_FLIP, state, base, 10.0, f"{number:06d}")
    if attack == "sign_flip_in_norm":
        return in_norm_sign_flip(state, base, honest)
    return state


class PersonalTracks:
    """Per silo, beside the federation, as fl_tasks.silo.personal trains them: the local-only
    model (from the seed model, on its own rows only, its own Adam moments) and Ditto's
    personal model (pulled towards each round's base); at the end, the final global model
    fine-tuned on the silo's training rows (all layers, and the head only). Personalization
    settings: the federation file's defaults (fl_tasks.config.PersonalizationSpec)."""

    def __init__(self, fed: Federation, seed_state: dict) -> None:
        from fl_tasks.config import PersonalizationSpec
        from fl_tasks.protocol.personalization import PersonalizationSettings

        self.fed = fed
        self.local_only = {s.name: dict(seed_state) for s in fed.silos}
        self.local_opt: dict = {}
        self.ditto = {s.name: dict(seed_state) for s in fed.silos}
        spec = PersonalizationSpec()
        common = {"epochs": spec.epochs, "learning_rate": fed.spec.training.learning_rate,
                  "batch_size": spec.batch_size, "ditto_lambda": spec.ditto_lambda}
        self.personal = {layers: PersonalizationSettings("finetune", layers=layers, **common)
                         for layers in ("all", "head")}
        self.personal["ditto"] = PersonalizationSettings("ditto", **common)

    def round(self, silo, index: int, number: int, epochs: int, base: dict) -> None:
        from fl_tasks.silo import personal

        fed = self.fed
        self.local_only[silo.name], result = personal.train_from(
            fed.task, self.local_only[silo.name], silo.train,
            fed.settings(epochs, number, index, self.local_opt.get(silo.name)))
        self.local_opt[silo.name] = result.optimizer_state
        self.ditto[silo.name] = personal.ditto_step(fed.task, self.ditto[silo.name], base, silo.train,
                                                    fed.settings(epochs, number, index), self.personal["ditto"])

    def finish(self, model, local_bn: dict) -> dict:
        from fl_tasks.silo import personal
        from fl_tasks.tasks.api import model_state

        fed, task = self.fed, self.fed.task
        final = model_state(model)
        table = {}
        for index, silo in enumerate(fed.silos):
            if local_bn:  # FedBN's personal model: the shared weights with the silo's own batch norm
                models = {"fedbn": {**final, **local_bn[silo.name]}}
            else:
                models = {"local_only": self.local_only[silo.name], "global": final,
                          "finetune_all": personal.finetuned(task, final, silo.train, self.personal["all"], index),
                          "finetune_head": personal.finetuned(task, final, silo.train, self.personal["head"], index),
                          "ditto": self.ditto[silo.name]}
            table[silo.name] = {name: {"test": personal.scored(task, state, silo.test),
                                       "validation": personal.scored(task, state, silo.validation)}
                                for name, state in models.items()}
        return table




def run_all(jobs: list[tuple], workers: int) -> list[dict]:
    from fl_tasks.simulation.datasets import creditcard_frame

    creditcard_frame()  # fetch and cache once, before the workers start
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(function, **kwargs) for function, kwargs in jobs]
        results = []
        for number, future in enumerate(futures, 1):
            results.append(future.result())
            print(f"[{number}/{len(futures)}] {results[-1]['setting']} seed {results[-1]['seed']} "
                  f"{results[-1].get('attack', '')}", file=sys.stderr, flush=True)
        return results


def medians(runs: list[dict], keys=("roc_auc", "pr_auc")) -> dict:
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0], "failed_runs": len(errors)}
    return {f"median_{k}": statistics.median(r[k] for r in runs) for k in keys} | {
        "runs": [{k: r[k] for k in ("seed", *keys) if k in r} for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", default="global,server,defence,personal")
    parser.add_argument("--output", type=Path, help="also write the JSON here; the tables of the parts not run "
                                                     "are kept from the file")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    seeds, r, e = range(args.seeds), args.rounds, args.epochs
    jobs: list[tuple] = []
    if "global" in parts:
        for seed in seeds:
            jobs += [(centralized, {"seed": seed, "epochs": r * e}),
                     (federated, {"seed": seed, "rounds": 10, "epochs": 1, "keep_optimizer": False,
                                  "label": "fedavg, 10 rounds x 1 epoch, fresh Adam each round (before)"}),
                     (federated, {"seed": seed, "rounds": 10, "epochs": e,
                                  "label": f"fedavg, 10 rounds x {e} epochs, silos keep Adam"}),
                     (federated, {"seed": seed, "rounds": 10, "epochs": e, "strategy": "fedadam",
                                  "label": f"fedadam, 10 rounds x {e} epochs, silos keep Adam"}),
                     (federated, {"seed": seed, "rounds": r, "epochs": e, "keep_optimizer": False,
                                  "label": f"fedavg, {r} rounds x {e} epochs, fresh Adam each round"}),
                     (federated, {"seed": seed, "rounds": r, "epochs": e,
                                  "label": f"fedavg, {r} rounds x {e} epochs, silos keep Adam (default)"}),
                     (federated, {"seed": seed, "rounds": r, "epochs": e, "strategy": "fedadam",
                                  "label": f"fedadam, {r} rounds x {e} epochs, silos keep Adam"}),
                     (federated, {"seed": seed, "rounds": r, "epochs": e, "strategy": "fedavgm",
                                  "label": f"fedavgm, {r} rounds x {e} epochs, silos keep Adam"})]
    if "server" in parts:
        for strategy, etas in SERVER_ETAS.items():
            for eta in etas:
                for rounds in (10, 20):
                    jobs += [(federated, {"seed": seed, "rounds": rounds, "epochs": e, "strategy": strategy,
                                          "params": {"eta": eta}, "label": f"{strategy} eta {eta}, {rounds} rounds"})
                             for seed in seeds]
    if "defence" in parts:
        for label, (strategy, params, screening) in DEFENCES.items():
            for attack in ATTACKS:
                jobs += [(federated, {"seed": seed, "rounds": r, "epochs": e, "strategy": strategy, "params": params,
                                      "screening": screening, "attack": attack, "label": label}) for seed in seeds]
    if "personal" in parts:
        for seed in seeds:
            jobs += [(federated, {"seed": seed, "rounds": r, "epochs": e, "personal": True, "label": "personal"}),
                     (federated, {"seed": seed, "rounds": r, "epochs": e, "personal": True, "batch_norm": True,
                                  "label": "personal (fedbn, batch norm on)"})]
    results = run_all(jobs, args.workers)
    document = {"benchmark": "quality", "setting": {
        "dataset": "creditcard (ULB), unequal_split: 12,000 rows, banks of 75/9/7/5/4% at 1.5/5/8/10/12% fraud",
        "rounds": r, "local_epochs": e, "seeds": args.seeds, "attacker": ATTACKER,
        "personalization": "the federation file's defaults (fl_tasks.config.PersonalizationSpec)",
        "metric": "test rows (pooled: every bank's; per silo: its own), never trained on or picked on"}}
    if args.output and args.output.exists():
        kept = json.loads(args.output.read_text())
        if kept.get("setting") == document["setting"]:
            document = {**kept, **document}
    document.update(tables(results))
    document["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count()}
    text = json.dumps(document, indent=2)
    if args.output:
        args.output.write_text(text + "\n")
    print(text)


def tables(results: list[dict]) -> dict:
    out: dict = {}
    by: dict = {}
    for result in results:
        by.setdefault((result["setting"], result.get("attack", "clean")), []).append(result)
    central = by.get(("centralized", "clean"))
    if central:
        reference = medians(central)
        out["global"] = {"centralized": reference}
        for (setting, attack), runs in by.items():
            if attack == "clean" and setting.startswith(("fedavg,", "fedadam", "fedavgm")):
                row = medians(runs)
                row["roc_points_below_centralized"] = 100 * (reference["median_roc_auc"] - row["median_roc_auc"])
                row["pr_points_below_centralized"] = 100 * (reference["median_pr_auc"] - row["median_pr_auc"])
                out["global"][setting] = row
    server = {setting: runs for (setting, attack), runs in by.items() if " eta " in setting}
    if server:
        out["server"] = {setting: {**medians(runs, ("roc_auc", "pr_auc", "validation_pr_auc"))}
                         for setting, runs in server.items()}
    clean_fedavg = by.get(("fedavg (no screening)", "clean"))
    if clean_fedavg:
        reference = statistics.median(r["roc_auc"] for r in clean_fedavg)
        out["defence"] = {}
        for label in DEFENCES:
            row = {}
            for attack in ATTACKS:
                if (label, attack) in by:
                    cell = medians(by[(label, attack)])
                    if "error" not in cell:
                        cell["roc_points_below_clean_fedavg"] = 100 * (reference - cell["median_roc_auc"])
                        cell["rejected_updates"] = [r["rejected_updates"] for r in by[(label, attack)]]
                    row[attack] = cell
            out["defence"][label] = row
    personal_runs = by.get(("personal", "clean"), []) + by.get(("personal (fedbn, batch norm on)", "clean"), [])
    if personal_runs:
        out["per_silo"] = per_silo_table(personal_runs)
    return out


def per_silo_table(runs: list[dict]) -> dict:
    """Per bank and model: median test ROC-AUC and PR-AUC over seeds, and for each
    personalization strategy the model the bank serves (personal or global, whichever has the
    better validation PR-AUC, as a silo picks)."""
    merged: dict = {}  # (seed, silo) -> model -> {"test", "validation"}
    for run in runs:
        for silo, models in run["per_silo"].items():
            merged.setdefault((run["seed"], silo), {}).update(models)
    cells: dict = {}
    for (_, silo), models in sorted(merged.items()):
        global_ = models["global"]
        for name, scores in models.items():
            cells.setdefault(silo, {}).setdefault(name, []).append(scores["test"])
            if name not in ("global", "local_only"):
                pick = scores if scores["validation"]["pr_auc"] > global_["validation"]["pr_auc"] else global_
                cells[silo].setdefault(f"served ({name})", []).append(pick["test"])
    return {silo: {name: {k: statistics.median(s[k] for s in scores) for k in ("roc_auc", "pr_auc")}
                   for name, scores in models.items()} for silo, models in cells.items()}


if __name__ == "__main__":
    main()
