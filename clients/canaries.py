"""Canary users for the one-run audit: extra synthetic rows in both parties' tables, never real users.

Why: the audit (fedscore/audit/one_run.py, Steinke, Nasr and Jagielski 2023) needs many users whose secret bit is
independently random and known to the auditor. Two secrets per canary: its label, drawn uniformly at random by the
lender from its CSPRNG (never from the seed: the payment holder knows the seed, and a replayable canary would audit
nothing), audits the label guarantee against the payment holder; whether it trains at all, a fair coin from a keyed
hash of its ID under the secret the two parties share (so both agree, and an outsider cannot tell), audits the
released model against an outsider. Both parties add the same canary IDs (a prefix no real ID may carry; a table
that has one is refused), so PSI aligns them like any user; both put them in the training split or in none
(SPLIT_EXCLUDED), so validation and test metrics, which the run reports, never see them. Their features come from
the party's public schema alone (uniform over each column's declared levels, or over its declared bounds in the
column's transformed scale), never from a user's values: a canary built from real values would put that user in two
rows and double what one user can change in every release. The generator is seeded with the run's seed (the
features are not secret).
"""

from __future__ import annotations

import hashlib
import hmac

import numpy as np

from fedscore.shared.data.party_data import PartyTable
from fedscore.shared.data.schema import ColumnSchema
from fedscore.shared.data.tables import DataError
from fedscore.shared.model.parts import seeded
from fedscore.shared.protocol.splits import SPLIT_TRAIN

PREFIX = "~canary~"
SPLIT_EXCLUDED = -1  # a split code no model trains or evaluates on (the lender-only baseline leaves canaries out)


def canary_ids(n: int) -> list[str]:
    return [f"{PREFIX}{i:06d}" for i in range(n)]


def is_canary(ids: list[str] | np.ndarray) -> np.ndarray:
    return np.array([str(i).startswith(PREFIX) for i in ids], dtype=bool)


def with_canaries(table: PartyTable, n: int, seed: int, party: str) -> PartyTable:
    """The table plus `n` canary rows at the end (or the table itself when n is 0)."""
    if n == 0:
        return table
    clash = is_canary(table.ids)
    if clash.any():
        raise DataError(f"{table.source}: column id: row {int(np.argmax(clash))} starts with {PREFIX!r}, the prefix "
                        "reserved for audit canaries")
    if table.schema is None:
        raise DataError(f"{table.source}: no schema: canaries are drawn from the declared bounds")
    rng = np.random.default_rng(seeded(seed, party, "canary-features"))
    declared = {c.name: c for c in table.schema.columns}
    values = np.column_stack([_draw(declared[name], n, rng) for name in table.columns])
    return PartyTable(ids=[*table.ids, *canary_ids(n)], columns=table.columns,
                      values=np.concatenate([table.values, values]), source=table.source, schema=table.schema,
                      report={**table.report, "canaries": n})


def _draw(column: ColumnSchema, n: int, rng: np.random.Generator) -> np.ndarray:
    """n values of one column from its declaration only."""
    if column.levels is not None:
        return rng.choice(np.asarray(column.levels, dtype=np.float64), size=n)
    assert column.lower is not None and column.upper is not None  # the schema requires them
    if column.transform == "log":  # uniform in signed log1p, the scale the model sees
        low, high = (float(np.sign(b) * np.log1p(abs(b))) for b in (column.lower, column.upper))
        u = rng.uniform(low, high, size=n)
        values = np.sign(u) * np.expm1(np.abs(u))
    else:
        values = rng.uniform(column.lower, column.upper, size=n)
    return np.round(values) if column.type == "integer" else values


def canary_labels(n: int) -> np.ndarray:
    """Uniform 0/1 labels from a fresh OS-keyed CSPRNG (always, even in the replayable test mode)."""
    from fedscore.shared.privacy.secure_random import NoiseSource

    return NoiseSource().bernoulli((n,), 0.5).numpy().astype(np.float32)


def included(ids: list[str] | np.ndarray, secret: bytes) -> np.ndarray:
    """Each canary trains with probability 1/2: the low bit of HMAC-SHA256(secret, ID)."""
    return np.array([hmac.new(secret, b"canary-included:" + str(i).encode(), hashlib.sha256).digest()[0] & 1 == 1
                     for i in ids], dtype=bool)


def canary_split(split: np.ndarray, ids: list[str] | np.ndarray, secret: bytes) -> np.ndarray:
    """Included canaries train, the others are in no split; none validates or tests, so the metrics exclude them."""
    split = split.copy()
    canary = is_canary(ids)
    keep = included(np.asarray(ids)[canary], secret)
    split[np.flatnonzero(canary)] = np.where(keep, SPLIT_TRAIN, SPLIT_EXCLUDED)
    return split
