"""Batch scoring with the exported model: every applicant in DIR/lender, with onnxruntime only.

The operator who holds both parties' folders (as in a local run) scores a whole applicant file here; each side's
work is the same code the online services run: `fedscore.clients.payment.scoring` computes the embeddings and coarse
signals, `fedscore.clients.lender.scoring` runs the lender part, the scorecard and the reasons. Everything is checked
and computed in memory first and the CSV is written atomically, so a failed run leaves no partial file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedscore.shared.atomic import atomic_write
from fedscore.shared.data.tables import DataError, read_table

SCORE_COLUMNS = ["id", "probability", "score", "tier", "credit_limit", "review_flag", "reasons"]
REASON_SEPARATOR = "; "


def read_blacklist(path: Path) -> set[str]:
    """Ids to decline: a table (.csv/.parquet) with an `id` column, or a text file with one id per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: blacklist file not found")
    if path.suffix in (".csv", ".parquet"):
        return set(read_table(path, ["id"])["id"].dropna().astype(str).str.strip()) - {""}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read blacklist: {exc}") from exc
    return {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}


def score_batch(model_dir: Path, data_dir: Path, blacklist: set[str] | None = None,
                threads: int = 1, reasons: Literal["auto", "occlusion"] = "auto") -> pd.DataFrame:
    """Score every applicant in DIR/lender/applicants.* with the bundle in `model_dir`.

    Returns one row per applicant, in file order, with SCORE_COLUMNS; `reasons` is the "; "-joined texts of up to
    three factors that lowered the score (plus "no payment history with the partner" for applicants the payment
    holder does not know, who also get the review flag). Blacklisted ids get limit 0 and the review flag.
    Raises DataError (BundleError for the model) naming the file and column for anything unusable.
    `reasons` picks how contributions are computed (`LenderScorer`); `frame.attrs["reasons_by"]` says which ran.
    """
    from fedscore.clients.lender.scoring import LenderScorer, load_applicant_features
    from fedscore.clients.payment.scoring import load_payment_users
    from fedscore.shared.scoring.bundle import load_scoring_bundle

    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: data folder not found (expected DIR with payment/ and lender/)")
    bundle = load_scoring_bundle(model_dir)
    lender = LenderScorer(bundle, threads, reasons)  # opens the graph before reading data: a bad bundle fails fast
    applicants = load_applicant_features(bundle, data_dir)
    payment = load_payment_users(bundle, data_dir, threads)
    rows = payment.rows_for(applicants.ids)
    has_payment = rows >= 0
    blacklisted = np.isin(np.asarray(applicants.ids, dtype=object), sorted(blacklist)) if blacklist else None
    result = lender.score(applicants.features, lender.embeddings_or_baseline(payment.embeddings, rows), has_payment,
                          payment.signals.take(rows), blacklisted)
    frame = pd.DataFrame({
        "id": applicants.ids,
        "probability": result.probability,
        "score": result.score,
        "tier": result.tier.astype(str),
        "credit_limit": result.credit_limit,
        "review_flag": result.review_flag,
        "reasons": result.joined_reasons(REASON_SEPARATOR),
    }, columns=SCORE_COLUMNS)
    frame.attrs["reasons_by"] = lender.reasons_by
    return frame


def write_scores(frame: pd.DataFrame, out_csv: Path) -> Path:
    """Write the scores CSV atomically (temporary file + rename): readers see the old file or the whole new one."""
    out_csv = Path(out_csv)
    missing = [c for c in SCORE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"scores frame lacks column(s) {missing}")
    if out_csv.is_dir():
        raise DataError(f"{out_csv}: is a folder; give a file name for the scores CSV")
    atomic_write(out_csv, lambda handle: frame[SCORE_COLUMNS].to_csv(handle, index=False, encoding="utf-8"))
    return out_csv
