"""Generated insurance claims: a stand-in for an insurer's claims table, for demos and tests.

Real claims never leave an insurer, so the example ships a generator instead of a data set.
Each label is drawn from a softmax over hand-written scores (amount, policy age, claim
history, channel, product, police report, region), so the relationship is learnable but
noisy: no model can route every claim right, yet a trained one clearly beats the class prior.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

REGIONS = ("north", "south", "east", "west", "central", "islands")
CHANNELS = ("web", "phone", "agent", "partner")
PRODUCTS = ("auto", "home", "health", "travel")
CLASSES = ("fast_track", "standard", "investigate")

# The data set of the built-in fraud task covers these two days; the claims share its window
# so that a federation can replay the same backfill of rounds.
START = pd.Timestamp("2013-09-01T00:00:00", tz="UTC")
END = pd.Timestamp("2013-09-03T00:00:00", tz="UTC")

_REGION_SHARES = (0.2, 0.2, 0.18, 0.18, 0.16, 0.08)
_CHANNEL_SHARES = (0.4, 0.25, 0.2, 0.15)
_PRODUCT_SHARES = (0.35, 0.25, 0.25, 0.15)
_MEDIAN_AMOUNT = np.array([3000.0, 6000.0, 1500.0, 400.0])  # per product, in PRODUCTS order
_POLICE_REPORT_RATE = np.array([0.6, 0.3, 0.02, 0.1])  # per product


def synthetic_claims(rows: int, seed: int) -> pd.DataFrame:
    """`rows` claims with the columns of the claims data contract (federations/claims.yaml),
    the same for the same `seed`."""
    if rows < 0:
        raise ValueError(f"rows must be zero or more, got {rows}")
    rng = np.random.default_rng(seed)
    region = rng.choice(len(REGIONS), size=rows, p=_REGION_SHARES)
    channel = rng.choice(len(CHANNELS), size=rows, p=_CHANNEL_SHARES)
    product = rng.choice(len(PRODUCTS), size=rows, p=_PRODUCT_SHARES)
    amount = np.round(rng.lognormal(np.log(_MEDIAN_AMOUNT[product]), 0.8), 2)
    policy_age_days = np.floor(rng.exponential(900.0, size=rows)) + 1.0
    prior_claims = rng.poisson(np.where(product == PRODUCTS.index("auto"), 0.8, 0.5)).astype(np.float64)
    police_report = rng.random(rows) < _POLICE_REPORT_RATE[product]
    seconds = np.floor(rng.uniform(0.0, (END - START).total_seconds(), size=rows))

    size = (np.log1p(amount) - 7.5) / 1.0  # about -2 (a small travel claim) .. 3
    new_policy = policy_age_days < 90
    property_claim = np.isin(product, [PRODUCTS.index("auto"), PRODUCTS.index("home")])
    fast_track = (0.2 - 1.3 * size - 0.9 * prior_claims + 0.5 * (channel == CHANNELS.index("web"))
                  + 0.6 * (product == PRODUCTS.index("travel")) - 0.8 * new_policy)
    investigate = (-1.6 + 0.9 * size + 0.6 * prior_claims + 1.3 * new_policy
                   + 0.9 * (channel == CHANNELS.index("partner")) + 0.7 * (region == REGIONS.index("islands"))
                   + 0.9 * (property_claim & ~police_report))
    scores = np.column_stack([fast_track, np.zeros(rows), investigate])
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(probabilities, axis=1)
    cumulative[:, -1] = 1.0  # rounding must not push a draw past the last class
    label = (rng.random(rows)[:, None] > cumulative).sum(axis=1)

    return pd.DataFrame({
        "region": np.array(REGIONS, dtype=object)[region],
        "channel": np.array(CHANNELS, dtype=object)[channel],
        "product": np.array(PRODUCTS, dtype=object)[product],
        "police_report": police_report,
        "claim_amount": amount,
        "policy_age_days": policy_age_days,
        "prior_claims": prior_claims,
        "submitted_at": START + pd.to_timedelta(seconds, unit="s"),
        "triage": np.array(CLASSES, dtype=object)[label],
    })
