"""Monthly limit management (`fedscore score --book`): re-score the borrowers on the book each month and propose
limit changes under the scorecard policy, with a hysteresis (issue 21).

The book (ROOT/book.parquet: the borrowers' IDs) keeps each borrower's application columns at the lender
(month 1's applicants file); each month the payment holder's snapshot gives their current payment part and coarse
signals. Every month from the book's opening (month 1) to the asked one is scored with the same model and policy
(shared/scoring/scorecard.py: points, tiers, limits, review, reason codes), and the book's limits are replayed
month by month: the limit a borrower holds is what the policy below decided last month, not last month's raw policy
limit. Why a replay rather than a state file: the result is a function of the data and the model alone (no file
that can go stale or be lost between runs), at the cost of scoring K months (about a second each for 1,500
borrowers).

Why a hysteresis: tiers move a lot from month to month (on the synthetic book only ~40% keep theirs), so a policy
that follows each month's tier swings limits up and down. A borrower's limit remembers the tier it was set at, and
- cut    to the policy limit when recent spending turned anomalous (recent_spend_anomaly: at once), or the tier is
         CUT_DROP_TIERS or more below the tier the limit was set at, or has been below it CUT_AFTER_MONTHS months in
         a row (a one-month one-tier dip is held);
- raise  to the policy limit after RAISE_AFTER_MONTHS months in a row of stable spending, no anomaly and the tier
         not below the one the limit was set at (never more than RAISE_CAP times the current limit in one month);
         a closed line (limit 0) is proposed for reopening at the policy limit, always flagged for manual review,
         only once its tier has been above the closing tier and its spending stable RAISE_AFTER_MONTHS months in a
         row (before that it is held, not flagged: a one-month recovery is not news);
- hold   otherwise (a change in spend level alone, the policy's other input, never moves a limit).
A cut or a raise sets the limit's tier to this month's and restarts both counts.
A manual-review flag follows the policy (tiers in review_tiers, anomalies), any cut of more than half the limit and
any reopening. The replay assumes every proposal was carried out (a reviewed one included): the month after, the
book holds the proposed limit.
Each row carries its reason codes: the policy's reason for the action, then the model's reasons for the score.
One model scores every month of the replay (the one given): after a promotion the book is replayed under the new
champion, as if it had held the book from the start.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fedscore.shared.data.tables import DataError

RAISE_CAP = 1.25
CUT_DROP_TIERS = 2  # a fall of this many tiers below the limit's tier is cut at once
CUT_AFTER_MONTHS = 2  # a smaller fall is cut once it has lasted this many months in a row
RAISE_AFTER_MONTHS = 3  # stable months in a row (no anomaly, tier held) before a raise
BOOK_COLUMNS = ["id", "previous_tier", "tier", "limit_tier", "previous_score", "score", "current_limit",
                "proposed_limit", "action", "review_flag", "reason_codes"]


def _score_with_signals(model_dir: Path, data_dir: Path) -> pd.DataFrame:
    """fedscore.scoring.score_batch plus the coarse payment signals the policy reads."""
    from fedscore.clients.lender.scoring import LenderScorer, load_applicant_features
    from fedscore.clients.payment.scoring import load_payment_users
    from fedscore.shared.scoring.bundle import load_scoring_bundle

    bundle = load_scoring_bundle(model_dir)
    lender = LenderScorer(bundle, 1)
    applicants = load_applicant_features(bundle, data_dir)
    payment = load_payment_users(bundle, data_dir, 1)
    rows = payment.rows_for(applicants.ids)
    signals = payment.signals.take(rows)
    result = lender.score(applicants.features, lender.embeddings_or_baseline(payment.embeddings, rows), rows >= 0,
                          signals, None)
    return pd.DataFrame({"id": applicants.ids, "score": result.score, "tier": result.tier.astype(str),
                         "limit": result.credit_limit, "review": result.review_flag,
                         "reasons": result.joined_reasons("; "), "stability": signals.stability.astype(str),
                         "anomaly": signals.recent_spend_anomaly.astype(bool)})


def _book_folder(root: Path, month: int, tmp: Path) -> Path:
    """A scoring folder: the book's application rows (lender) beside month `month`'s payment snapshot."""
    from fedscore.synth_monthly import BOOK_FILE, month_folder

    book = Path(root) / BOOK_FILE
    if not book.exists():
        raise DataError(f"{book}: no book (made by `fedscore data synth --months`)")
    ids = pq.read_table(book)["id"].to_pylist()
    applicants = pq.read_table(month_folder(root, 1) / "lender" / "applicants.parquet").to_pandas()
    rows = applicants[applicants["id"].isin(ids)]
    folder = tmp / f"month-{month}"
    (folder / "lender").mkdir(parents=True)
    rows.to_parquet(folder / "lender" / "applicants.parquet", index=False)
    shutil.copy(month_folder(root, 1) / "lender" / "schema.toml", folder / "lender" / "schema.toml")
    (folder / "payment").symlink_to(month_folder(root, month).resolve() / "payment", target_is_directory=True)
    return folder


@dataclass
class BookState:
    """What the book holds per borrower between months (arrays in the book's order)."""

    limit: np.ndarray  # the limit held
    limit_rank: np.ndarray  # rank (0 = best tier) of the tier the limit was set at
    months_below: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # in a row, tier below it
    months_stable: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # in a row, raise-worthy
    months_above: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # in a row, tier above it

    @classmethod
    def opening(cls, limit: np.ndarray, rank: np.ndarray) -> BookState:
        """The book as opened: each borrower at the policy's limit for their tier of the opening month."""
        n = len(limit)
        return cls(np.asarray(limit, float).copy(), np.asarray(rank, np.int64).copy(), np.zeros(n, np.int64),
                   np.zeros(n, np.int64), np.zeros(n, np.int64))


@dataclass
class Decision:
    """One month's proposal for every borrower (arrays in the book's order)."""

    action: np.ndarray  # "cut" / "raise" / "hold"
    proposed: np.ndarray
    confirmed_fall: np.ndarray  # the tier fall that justified a cut (bool)
    big_cut: np.ndarray
    reinstate: np.ndarray


def step(state: BookState, rank: np.ndarray, policy: np.ndarray, anomaly: np.ndarray, stable: np.ndarray,
         ) -> tuple[Decision, BookState]:
    """Apply the policy with its hysteresis to one month: `rank` is this month's tier rank (0 best), `policy` the
    scorecard's limit for it, `anomaly` recent_spend_anomaly, `stable` this month's spending stability. Returns the
    proposal and the state the book holds next month."""
    rank = np.asarray(rank, np.int64)
    policy = np.asarray(policy, float)
    anomaly = np.asarray(anomaly, bool)
    current = state.limit
    below = rank > state.limit_rank
    months_below = np.where(below, state.months_below + 1, 0)
    months_stable = np.where(np.asarray(stable, bool) & ~anomaly & ~below, state.months_stable + 1, 0)
    months_above = np.where(rank < state.limit_rank, state.months_above + 1, 0)
    confirmed_fall = (rank - state.limit_rank >= CUT_DROP_TIERS) | (months_below >= CUT_AFTER_MONTHS)
    cut = (anomaly | confirmed_fall) & (policy < current)
    capped = np.minimum(policy, np.floor(current * RAISE_CAP / 100) * 100)
    confirmed = months_stable >= RAISE_AFTER_MONTHS
    raise_ = ~cut & confirmed & (policy > current) & (current > 0) & (capped > current)
    # a closed line: proposed for reopening (at the policy limit, under review) once the recovery is confirmed
    reinstate = ~cut & (current == 0) & (policy > 0) & confirmed & (months_above >= RAISE_AFTER_MONTHS)
    proposed = np.where(cut, policy, np.where(raise_, capped, np.where(reinstate, policy, current)))
    action = np.where(cut, "cut", np.where(raise_ | reinstate, "raise", "hold"))
    changed = cut | raise_ | reinstate
    after = BookState(limit=proposed.astype(float), limit_rank=np.where(changed, rank, state.limit_rank),
                      months_below=np.where(changed, 0, months_below),
                      months_stable=np.where(changed, 0, months_stable),
                      months_above=np.where(changed, 0, months_above))
    return Decision(action, proposed, confirmed_fall & cut, cut & (proposed < 0.5 * current), reinstate), after


def propose(model_dir: Path, root: Path, month: int) -> pd.DataFrame:
    """One row per borrower: this month's and last month's tier and score, the tier the held limit was set at, the
    current (held) and proposed limit, the action (cut / raise / hold), the review flag and the reason codes."""
    from fedscore.shared.scoring.scorecard import ScorecardParams
    from fedscore.synth_monthly import read_meta

    meta = read_meta(root)
    if not 2 <= month <= meta.months:
        raise DataError(f"--month {month}: the book is re-scored from month 2 to {meta.months}")
    order = ScorecardParams().tier_names  # best first
    rank_of = {name: i for i, name in enumerate(order)}
    with tempfile.TemporaryDirectory() as tmp:
        scored = [_score_with_signals(model_dir, _book_folder(root, 1, Path(tmp)))]
        ids = scored[0]["id"]
        for k in range(2, month + 1):
            scored.append(_score_with_signals(model_dir, _book_folder(root, k, Path(tmp))).set_index("id")
                          .loc[ids].reset_index())

    def ranks(frame: pd.DataFrame) -> np.ndarray:
        return np.array([rank_of[t] for t in frame["tier"]], np.int64)

    state = BookState.opening(scored[0]["limit"].to_numpy(float), ranks(scored[0]))
    for frame in scored[1:]:
        held = state
        decision, state = step(state, ranks(frame), frame["limit"].to_numpy(float), frame["anomaly"].to_numpy(bool),
                               (frame["stability"] == "stable").to_numpy())
    now, before = scored[-1], scored[-2]
    current, policy = held.limit, now["limit"].to_numpy(float)
    anomaly = now["anomaly"].to_numpy(bool)
    review = now["review"].to_numpy(bool) | decision.big_cut | decision.reinstate
    codes = []
    for i in range(len(now)):
        why = []
        if anomaly[i]:
            why.append("SPEND_ANOMALY: recent spending anomalous")
        if decision.confirmed_fall[i]:
            why.append(f"TIER_FELL: {order[held.limit_rank[i]]} (the limit's tier) -> {now['tier'].iat[i]}"
                       f" ({int(held.months_below[i]) + 1} month(s) below it)")
        if decision.action[i] == "raise" and not decision.reinstate[i]:
            why.append(f"STABLE: spending stable {RAISE_AFTER_MONTHS}+ months, tier held")
        if decision.big_cut[i]:
            why.append("BIG_CUT: more than half the limit, manual review")
        if decision.reinstate[i]:
            why.append(f"REINSTATE: closed line, tier {now['tier'].iat[i]} and stable {RAISE_AFTER_MONTHS}+ months,"
                       f" policy {policy[i]:.0f}: reopen under manual review")
        model = now["reasons"].iat[i]
        codes.append("; ".join([*why, *([model] if model else [])]))
    return pd.DataFrame({"id": now["id"], "previous_tier": before["tier"], "tier": now["tier"],
                         "limit_tier": [order[r] for r in held.limit_rank], "previous_score": before["score"],
                         "score": now["score"], "current_limit": current, "proposed_limit": decision.proposed,
                         "action": decision.action, "review_flag": review, "reason_codes": codes},
                        columns=BOOK_COLUMNS)

