"""The lender at scoring time: its ONNX part, the scorecard and the reasons, one implementation for batch and online.

Given raw lender features, the payment embedding and the coarse payment signals, `LenderScorer.score` returns the
probability, points, tier, credit limit, review flag and reasons. Batch scoring (`fedscore.scoring`) and the HTTP
service (`fedscore.clients.lender.service`) both call it, so an applicant scored online gets exactly the decision the
batch would give.

Reasons are computed by occlusion on the lender graph, with onnxruntime only: a factor's contribution is
logit(applicant) - logit(applicant with that factor set to its reference). The reference for a lender feature is the
value the lender declared in its schema.toml (manifest `lender_reference`: public, not a median of applicants); for
the payment side it is the zero embedding (a public constant, not a mean of training embeddings), and the whole
embedding is ONE factor, "payment_behaviour" — individual payment features are never named, they never reach
the lender. All occluded copies go through the graph in one batched call. Contributions are exactly 0 when the
applicant already equals the reference, so such a factor is never given as a reason. When the lender part is linear
after its preprocessing (the default top) and says so, the same contributions come exactly, up to float rounding,
from its weights after one graph run (shared/scoring/linear.py): 1 graph run per applicant instead of k + 2.

Applicants the payment holder does not know are scored with the baseline (zero) embedding,
always sent to review, and told why: "no payment history with the partner".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedscore.clients.lender.data import load_applicants
from fedscore.shared.model.manifest import EMBEDDING, LENDER_INPUT, LOGIT, PROBABILITY
from fedscore.shared.scoring.bundle import ScoringBundle, ordered_matrix, ort_session
from fedscore.shared.scoring.linear import LinearReasons, read_description
from fedscore.shared.scoring.payment_signals import PaymentSignals
from fedscore.shared.scoring.scorecard import PAYMENT_FACTOR, decision_arrays, reason_codes, reason_text

NO_PAYMENT_REASON = "no payment history with the partner"
TOP_K = 3
CHUNK_ROWS = 65_536  # rows per graph call, occluded copies included
# rows per step of the linear shortcut: its float64 temporaries (~10 per row and factor) stay in a core's L2 cache;
# 65,536 rows at a time took 2-3x the CPU time of 1,024-4,096 (BENCHMARKS.md, "Batch scoring (item 8)")
LINEAR_CHUNK_ROWS = 2_048

logger = logging.getLogger(__name__)


@dataclass
class Decisions:
    """One entry per applicant, in input order. Reasons are stored once per distinct list (a book of a million
    applicants has a few hundred distinct reason lists): `reason_sets[reason_index[i]]` is applicant i's list."""

    probability: np.ndarray  # float64 (the graph's float32 value, widened)
    score: np.ndarray  # int64 points
    tier: np.ndarray  # object (str)
    credit_limit: np.ndarray  # float64
    review_flag: np.ndarray  # bool
    reason_sets: list[list[str]]  # distinct lists of human texts, the factor that lowered the score most first
    reason_index: np.ndarray  # int64 [N] into reason_sets

    @property
    def reasons(self) -> list[list[str]]:
        return [self.reason_sets[i] for i in self.reason_index]

    def joined_reasons(self, separator: str) -> np.ndarray:
        """object [N]: each applicant's reasons joined into one string (joined once per distinct list)."""
        joined = np.array([separator.join(texts) for texts in self.reason_sets], dtype=object)
        return joined[self.reason_index]


@dataclass
class Applicants:
    """The lender's applicants: ids and raw features in the model's column order."""

    ids: list[str]
    features: np.ndarray  # float32 [N, n_lender]
    source: str

    def index(self) -> dict[str, int]:
        return {applicant: row for row, applicant in enumerate(self.ids)}


def load_applicant_features(bundle: ScoringBundle, data_dir: Path) -> Applicants:
    """DIR/lender/applicants.* with the columns the lender part was trained on (a label column is ignored)."""
    table = load_applicants(Path(data_dir) / "lender")
    return Applicants(table.ids, ordered_matrix(table, bundle.lender_features, "lender"), table.source)


class LenderScorer:
    """The lender ONNX part + scorecard + occlusion reasons.

    `reasons="auto"`: when the part says its top is linear after its preprocessing (ONNX metadata written by the
    exporter) and that description reproduces the graph's occlusion on probe rows, contributions come from the
    exact linear shortcut (shared/scoring/linear.py) after ONE graph run; otherwise, and with
    `reasons="occlusion"`, from the k + 2 occluded copies. `reasons_by` says which ("linear" or "occlusion").
    """

    def __init__(self, bundle: ScoringBundle, threads: int = 1,
                 reasons: Literal["auto", "occlusion"] = "auto") -> None:
        self.session = ort_session(bundle.part_path("lender"), threads)
        self.params = bundle.manifest.scorecard
        self.features = bundle.lender_features
        self.factor_names = [*self.features, PAYMENT_FACTOR]
        self.reference = bundle.lender_reference()
        self.baseline = bundle.embedding_baseline()
        self.embedding_dim = bundle.embedding_dim
        self._texts: dict[tuple[str, int], str] = {}
        self.linear: LinearReasons | None = None
        if reasons == "auto":
            self.linear = self._checked_linear(bundle.part_path("lender"))
        self.reasons_by = "occlusion" if self.linear is None else "linear"

    def _checked_linear(self, path: Path) -> LinearReasons | None:
        """The linear shortcut if the part describes one that agrees with the graph, else None (occlusion)."""
        try:
            described = read_description(self.session.get_modelmeta().custom_metadata_map)
            if described is None:
                return None
            linear = LinearReasons.build(*described, self.features, self.reference, self.baseline)
        except ValueError as exc:  # pydantic's ValidationError and json's errors are ValueErrors
            logger.warning("%s: unusable linear description (%s); reasons by occlusion", path, exc)
            return None

        def graph(x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            xs, es = self._occluded_inputs(x, e)
            probability, logit = self.session.run([PROBABILITY, LOGIT], {LENDER_INPUT: xs, EMBEDDING: es})
            return probability.reshape(-1, len(x)), logit.reshape(-1, len(x))

        problem = linear.disagreement(graph)
        if problem is not None:
            logger.warning("%s: the linear description does not reproduce the graph (%s); reasons by occlusion",
                           path, problem)
            return None
        return linear

    # -- graph ---------------------------------------------------------------------------------------------------
    def _check(self, features: np.ndarray, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(features, dtype=np.float32)
        e = np.ascontiguousarray(embedding, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            raise ValueError(f"lender features of shape {x.shape}, the lender part takes [N, {len(self.features)}]")
        if e.shape != (len(x), self.embedding_dim):
            raise ValueError(f"embedding of shape {e.shape}, expected ({len(x)}, {self.embedding_dim})")
        return x, e

    def probability(self, features: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """float32 [N] probability of default, nothing else (the fast path)."""
        x, e = self._check(features, embedding)
        out = np.empty(len(x), dtype=np.float32)
        for start in range(0, len(x), CHUNK_ROWS):
            stop = start + CHUNK_ROWS
            out[start:stop] = self.session.run([PROBABILITY], {LENDER_INPUT: x[start:stop],
                                                               EMBEDDING: e[start:stop]})[0]
        return out

    def _occluded(self, x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probability [n], logit [n], occluded logits [F, n]) for one chunk, in one graph call.

        Block 0 is the applicant; block 1 + j has lender feature j set to its reference; the last block has the
        baseline embedding.
        """
        n, k = x.shape
        xs, es = self._occluded_inputs(x, e)
        probability, logit = self.session.run([PROBABILITY, LOGIT], {LENDER_INPUT: xs, EMBEDDING: es})
        logit = logit.reshape(k + 2, n)
        return probability[:n], logit[0], logit[1:]

    def _occluded_inputs(self, x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The k + 2 blocks of `_occluded`, stacked: the rows, each feature at its reference, the baseline."""
        n, k = x.shape
        xs = np.tile(x, (k + 2, 1))
        es = np.tile(e, (k + 2, 1))
        for j in range(k):
            xs[(j + 1) * n:(j + 2) * n, j] = self.reference[j]
        es[(k + 1) * n:] = self.baseline
        return xs, es

    def contributions(self, features: np.ndarray, embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(probability float32 [N], contributions float64 [N, F], direction int8 [N, F]), F = lender features +
        payment_behaviour. Positive contribution = raised the default logit = lowered the score."""
        x, e = self._check(features, embedding)
        n, k = x.shape
        if self.linear is not None:  # one graph run for the probability; contributions exactly, from the weights
            probability = np.empty(n, dtype=np.float32)
            values = np.empty((n, k + 1), dtype=np.float64)
            for start in range(0, n, LINEAR_CHUNK_ROWS):
                stop = start + LINEAR_CHUNK_ROWS
                probability[start:stop] = self.session.run([PROBABILITY], {LENDER_INPUT: x[start:stop],
                                                                           EMBEDDING: e[start:stop]})[0]
                values[start:stop] = self.linear.contributions(x[start:stop], e[start:stop])
        else:
            probability = np.empty(n, dtype=np.float32)
            values = np.empty((n, k + 1), dtype=np.float64)
            step = max(1, CHUNK_ROWS // (k + 2))
            for start in range(0, n, step):
                stop = min(n, start + step)
                p, logit, occluded = self._occluded(x[start:stop], e[start:stop])
                probability[start:stop] = p
                values[start:stop] = (logit[None, :].astype(np.float64) - occluded.astype(np.float64)).T
        direction = np.zeros((n, k + 1), dtype=np.int8)
        direction[:, :k] = np.sign(x - self.reference[None, :]).astype(np.int8)
        # nothing changed, nothing contributed (not even float noise from a different GEMM tail)
        np.copyto(values[:, :k], 0.0, where=direction[:, :k] == 0)
        values[np.all(e == self.baseline[None, :], axis=1), k] = 0.0
        return probability, values, direction

    # -- decision ------------------------------------------------------------------------------------------------
    def _text(self, factor: str, direction: int) -> str:
        key = (factor, direction)
        if key not in self._texts:
            self._texts[key] = reason_text(factor, direction)
        return self._texts[key]

    def reasons(self, values: np.ndarray, direction: np.ndarray,
                has_payment: np.ndarray) -> tuple[list[list[str]], np.ndarray]:
        """(distinct reason lists, index per applicant).

        Rows are grouped by what `fedscore.shared.scoring.scorecard.reason_codes` depends on — the top-k factors by
        contribution (same stable sort), whether each is positive, their directions, and whether the applicant has
        payment data — and `reason_codes` + `reason_text` run once per group: the same texts as calling them on every
        row, without a Python loop over a million applicants.
        """
        n, factors = values.shape
        base = 3 * factors + 1
        # each factor's place in that stable sort by decreasing contribution (ties: the earlier factor first),
        # from pairwise comparisons: F^2 vector operations instead of a sort per row
        columns = np.ascontiguousarray(values.T)  # [F, N]: each factor's contributions contiguous
        rank = np.zeros((factors, n), dtype=np.int8)
        before = np.empty(n, dtype=bool)
        for a in range(factors):
            for b in range(factors):
                if b != a:
                    (np.greater_equal if b < a else np.greater)(columns[b], columns[a], out=before)
                    np.add(rank[a], before, out=rank[a], casting="unsafe")
        # the key's digit for place r (most significant first) is 0 unless the factor there raised the logit
        code = np.where(columns > 0, (1 + np.arange(factors) * 3)[:, None] + direction.T.astype(np.int64) + 1, 0)
        place_value = np.array([base ** (TOP_K - 1 - r) if r < TOP_K else 0 for r in range(factors)])[rank]
        key = np.asarray(has_payment, dtype=np.int64) * base ** TOP_K + (code * place_value).sum(axis=0)
        index, distinct = pd.factorize(key)  # hashing: no sort of N keys
        first = np.empty(len(distinct), dtype=np.int64)
        first[index[::-1]] = np.arange(n - 1, -1, -1)  # the last write wins: each group's first row
        column = {name: j for j, name in enumerate(self.factor_names)}
        codes = reason_codes(values[first], self.factor_names, TOP_K)
        sets = []
        for row, names in zip(first, codes, strict=True):
            texts = [self._text(name, int(direction[row, column[name]])) for name in names]
            sets.append(texts if has_payment[row] else [NO_PAYMENT_REASON, *texts])
        return sets, index.astype(np.int64)

    def score(self, features: np.ndarray, embedding: np.ndarray, has_payment: np.ndarray, signals: PaymentSignals,
              blacklisted: np.ndarray | None = None) -> Decisions:
        """Decisions for N applicants. `embedding` rows of applicants without payment data must already be the
        baseline (see `embeddings_or_baseline`); `has_payment` False also sets the review flag and adds the reason."""
        has_payment = np.asarray(has_payment, dtype=bool)
        if len(has_payment) != len(features) or len(signals) != len(features):
            raise ValueError(f"{len(features)} applicants but {len(has_payment)} payment flags and {len(signals)} "
                             "signal rows")
        probability, values, direction = self.contributions(features, embedding)
        table = decision_arrays(probability, signals.spend_level, signals.stability, signals.recent_spend_anomaly,
                                blacklisted, self.params)
        reason_sets, reason_index = self.reasons(values, direction, has_payment)
        return Decisions(probability=probability.astype(np.float64), score=table.points, tier=table.tier,
                         credit_limit=table.limit, review_flag=table.review | ~has_payment,
                         reason_sets=reason_sets, reason_index=reason_index)

    def embeddings_or_baseline(self, embeddings: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """embeddings[rows] with the baseline where rows is -1 (the payment holder has no such user)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.broadcast_to(self.baseline, (len(rows), self.embedding_dim)).copy()
        known = rows >= 0
        if known.any():
            out[known] = np.asarray(embeddings, dtype=np.float32)[rows[known]]
        return out
