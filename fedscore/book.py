"""Monthly limit management (`fedscore score --book`): re-score the borrowers on the book each month and propose
limit changes under the scorecard policy (issue 21).

The book (ROOT/book.parquet: the borrowers' IDs) keeps each borrower's application columns at the lender
(month 1's applicants file); each month the payment holder's latest snapshot gives their current payment part and
coarse signals. Both months (this one and the previous) are scored with the same model and policy
(shared/scoring/scorecard.py: points, tiers, limits, review, reason codes), and the proposal is:
- cut    to the policy limit when recent spending turned anomalous (recent_spend_anomaly) or the tier fell;
- raise  to the policy limit when spending is stable this month and last, with no anomaly, and the tier held or
         rose (never more than RAISE_CAP times the current limit in one month; a limit of 0 is never raised
         automatically: it is held and flagged for review);
- hold   otherwise.
A manual-review flag follows the policy (tiers in review_tiers, anomalies), any cut of more than half the limit and
any closed line the policy would reopen.
Each row carries its reason codes: the policy's reason for the action, then the model's reasons for the score.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from fedscore.shared.data.tables import DataError

RAISE_CAP = 1.25
BOOK_COLUMNS = ["id", "previous_tier", "tier", "previous_score", "score", "current_limit", "proposed_limit", "action",
                "review_flag", "reason_codes"]


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


def propose(model_dir: Path, root: Path, month: int) -> pd.DataFrame:
    """One row per borrower: this month's and last month's tier and score, the current and proposed limit, the
    action (cut / raise / hold), the review flag and the reason codes."""
    from fedscore.shared.scoring.scorecard import ScorecardParams
    from fedscore.synth_monthly import read_meta

    meta = read_meta(root)
    if not 2 <= month <= meta.months:
        raise DataError(f"--month {month}: the book is re-scored from month 2 to {meta.months}")
    order = ScorecardParams().tier_names  # best first
    rank = {name: i for i, name in enumerate(order)}
    with tempfile.TemporaryDirectory() as tmp:
        now = _score_with_signals(model_dir, _book_folder(root, month, Path(tmp)))
        before = _score_with_signals(model_dir, _book_folder(root, month - 1, Path(tmp)))
    before = before.set_index("id").loc[now["id"]].reset_index()
    fell = np.array([rank[a] > rank[b] for a, b in zip(now["tier"], before["tier"], strict=True)])
    rose_or_held = ~fell
    anomaly = now["anomaly"].to_numpy()
    stable = (now["stability"] == "stable").to_numpy() & (before["stability"] == "stable").to_numpy()
    current = before["limit"].to_numpy(float)  # the limit the book holds: last month's policy limit
    policy = now["limit"].to_numpy(float)
    cut = (anomaly | fell) & (policy < current)
    raise_ = ~cut & stable & ~anomaly & rose_or_held & (policy > current) & (current > 0)
    reinstate = ~cut & (current == 0) & (policy > 0)  # a closed line is never reopened automatically
    proposed = np.where(cut, policy, np.where(raise_, np.minimum(policy, np.floor(current * RAISE_CAP / 100) * 100),
                                              current))
    action = np.where(cut, "cut", np.where(raise_, "raise", "hold"))
    big_cut = cut & (proposed < 0.5 * current)
    review = now["review"].to_numpy(bool) | big_cut | reinstate
    codes = []
    for i in range(len(now)):
        why = []
        if anomaly[i]:
            why.append("SPEND_ANOMALY: recent spending anomalous")
        if fell[i]:
            why.append(f"TIER_FELL: {before['tier'].iat[i]} -> {now['tier'].iat[i]}")
        if action[i] == "raise":
            why.append("STABLE: spending stable two months, tier held")
        if big_cut[i]:
            why.append("BIG_CUT: more than half the limit, manual review")
        if reinstate[i]:
            why.append(f"REINSTATE: limit 0, policy now {policy[i]:.0f}, manual review")
        model = now["reasons"].iat[i]
        codes.append("; ".join([*why, *([model] if model else [])]))
    return pd.DataFrame({"id": now["id"], "previous_tier": before["tier"], "tier": now["tier"],
                         "previous_score": before["score"], "score": now["score"], "current_limit": current,
                         "proposed_limit": proposed, "action": action, "review_flag": review,
                         "reason_codes": codes}, columns=BOOK_COLUMNS)
