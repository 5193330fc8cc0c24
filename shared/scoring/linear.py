"""Exact reason codes with one pass for a lender part that is linear after its preprocessing.

Why: reasons by occlusion run the lender graph k + 2 times per applicant (the applicant, each of its k features at
its reference, the baseline embedding), which made ~75% of batch scoring's time. When the lender's top is a single
linear layer (the default, `model.lender_hidden = []`), its pre-sigmoid logit is

    z = w . t(x) + v . e + b,

where t is the per-column preprocessing the graph carries (clip to the declared bounds, signed log1p, centre and
scale, 0/1 level indicators). Every output of t depends on ONE raw column, so setting feature j to its reference
moves z by exactly delta_j = sum over the outputs o of column j of w_o (t_o(x_j) - t_o(ref_j)), and the baseline
embedding moves it by v . (e - baseline). The graph's "logit" output is g(z) = logit(p(z)) with
p(z) = clip((sigmoid(z) - f) / (1 - 2 f), floor, ceiling) (the randomized-response flip f undone, see
`fedscore.shared.model.parts.LenderTop.probability`), so the occlusion contribution of factor j is exactly
g(z) - g(z - delta_j): one matrix product and a few vectorised functions instead of k + 1 more graph runs.

What the shortcut needs travels inside the lender part itself, as ONNX metadata (`METADATA_KEY`, next to the
"fedscore.scaler" metadata that already carries the preprocessing constants): the part's own weights, bias, the
flip rate and the probability floor, written by the exporter only when the top IS one linear layer. The file is
hash-checked by the manifest, old scorers ignore metadata they do not know, and this is no new release: the same
weights are the graph's initializers (tests/test_bundle_release.py checks them by value against the trained,
ledger-recorded parameters). The scorer still does not trust the claim blindly: `disagreement` compares the
shortcut with the graph's own occlusion on probe rows made from public constants (bounds, levels, the declared
reference) when the scorer opens, and the scorer falls back to occlusion if they differ.

numpy only (no torch): scorers run with onnxruntime and numpy.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

METADATA_KEY = "fedscore.linear_top"
SCALER_KEY = "fedscore.scaler"
FORM = "logistic-after-preprocessing"
# probe rows agree with the graph to ~3e-7 in probability (float32 arithmetic in the graph, float64 here); a wrong
# weight, transform or output form shows up as 1e-3 or more
PROBE_TOLERANCE = 1e-5


class LinearTopDescription(BaseModel):
    """What the exporter states about a lender part whose top is one linear layer (read from the ONNX metadata)."""

    model_config = ConfigDict(extra="forbid")

    form: Literal["logistic-after-preprocessing"] = Field(
        description="z = weights . t(x) + embedding_weights . e + bias on the preprocessed features t(x); "
        "probability = clip((sigmoid(z) - label_flip) / (1 - 2 label_flip), floor, ceiling); "
        "logit = log(probability) - log1p(-probability)")
    weights: list[float] = Field(description="one per preprocessing output: scaled columns, then level indicators")
    embedding_weights: list[float] = Field(description="one per embedding input (1 for a partial logit)")
    bias: float
    label_flip: float = Field(ge=0.0, lt=0.5)
    probability_floor: float = Field(gt=0.0, lt=0.5, description="as the graph's float32 constant")
    probability_ceiling: float = Field(gt=0.5, lt=1.0, description="as the graph's float32 constant (1 - floor)")


def read_description(metadata: Mapping[str, str]) -> tuple[LinearTopDescription, dict[str, Any]] | None:
    """(description, scaler dict) from a lender part's metadata, or None when the part does not say it is linear.
    A key that is there but unreadable raises ValueError (the caller names the file)."""
    if METADATA_KEY not in metadata:
        return None
    if SCALER_KEY not in metadata:
        raise ValueError(f"metadata {METADATA_KEY!r} without {SCALER_KEY!r}: the preprocessing is not described")
    return (LinearTopDescription.model_validate_json(metadata[METADATA_KEY]), json.loads(metadata[SCALER_KEY]))


@dataclass(frozen=True)
class LinearReasons:
    """The shortcut for one lender part: preprocessing constants, weights, the output form; see the module text."""

    lower: np.ndarray | None  # float64 [k] or None (no clipping)
    upper: np.ndarray | None
    log_mask: np.ndarray  # bool [k]
    mean: np.ndarray  # float64 [k]
    std: np.ndarray  # float64 [k]
    level_column: np.ndarray  # int64 [L]: the raw column of each indicator
    level_value: np.ndarray  # float64 [L]
    weights: np.ndarray  # float64 [k + L]
    by_column: np.ndarray  # float64 [k + L, k]: weight o placed in its raw column's slot
    embedding_weights: np.ndarray  # float64 [d]
    bias: float
    label_flip: float
    floor: float
    ceiling: float
    reference: np.ndarray  # float64 [k] raw reference
    reference_t: np.ndarray  # float64 [k + L] the reference, preprocessed
    baseline: np.ndarray  # float64 [d]

    @classmethod
    def build(cls, description: LinearTopDescription, scaler: dict[str, Any], features: list[str],
              reference: np.ndarray, baseline: np.ndarray) -> LinearReasons:
        """Raises ValueError when the description does not fit the part (names, widths)."""
        columns = list(scaler["columns"])
        if columns != list(features):
            raise ValueError(f"the described preprocessing takes columns {columns}, the part {features}")
        k = len(columns)
        pairs = [(columns.index(c), float(v)) for c, levels in scaler.get("levels", {}).items() for v in levels]
        if len(description.weights) != k + len(pairs):
            raise ValueError(f"{len(description.weights)} weights for {k + len(pairs)} preprocessing outputs")
        if len(description.embedding_weights) != len(baseline):
            raise ValueError(f"{len(description.embedding_weights)} embedding weights for an embedding of "
                             f"width {len(baseline)}")
        clips = scaler.get("lower") is not None and scaler.get("upper") is not None
        level_column = np.array([j for j, _ in pairs], dtype=np.int64)
        weights = np.asarray(description.weights, dtype=np.float64)
        by_column = np.zeros((k + len(pairs), k))
        by_column[np.arange(k), np.arange(k)] = weights[:k]
        by_column[k + np.arange(len(pairs)), level_column] = weights[k:]
        made = cls(lower=np.asarray(scaler["lower"], dtype=np.float64) if clips else None,
                   upper=np.asarray(scaler["upper"], dtype=np.float64) if clips else None,
                   log_mask=np.array([c in scaler["log_columns"] for c in columns], dtype=bool),
                   mean=np.asarray(scaler["mean"], dtype=np.float64), std=np.asarray(scaler["std"], dtype=np.float64),
                   level_column=level_column, level_value=np.array([v for _, v in pairs], dtype=np.float64),
                   weights=weights, by_column=by_column,
                   embedding_weights=np.asarray(description.embedding_weights, dtype=np.float64),
                   bias=float(description.bias), label_flip=float(description.label_flip),
                   floor=float(description.probability_floor),
                   ceiling=float(description.probability_ceiling), reference=np.asarray(reference, dtype=np.float64),
                   reference_t=np.empty(0), baseline=np.asarray(baseline, dtype=np.float64))
        object.__setattr__(made, "reference_t", made.preprocess(made.reference[None, :])[0])
        return made

    # -- the part's arithmetic, in float64 ------------------------------------------------------------------------
    def preprocess(self, x: np.ndarray) -> np.ndarray:
        """t(x), float64 [N, k + L]: what the graph's ScalerModule computes (clip, signed log1p, scale, levels)."""
        n, k = len(x), len(self.mean)
        t = np.empty((n, k + len(self.level_column)))
        raw = t[:, :k]
        raw[...] = x
        if self.lower is not None and self.upper is not None:
            np.clip(raw, self.lower, self.upper, out=raw)
        if len(self.level_column):
            np.equal(raw[:, self.level_column], self.level_value, out=t[:, k:])
        if self.log_mask.any():
            logged = raw[:, self.log_mask]
            raw[:, self.log_mask] = np.sign(logged) * np.log1p(np.abs(logged))
        raw -= self.mean
        raw /= self.std
        return t

    def probability_of(self, z: np.ndarray) -> np.ndarray:
        """p(z): the flip undone and clipped, as `LenderTop.probability` (a new array)."""
        return self._probability_in_place(np.array(z, dtype=np.float64))

    def _probability_in_place(self, a: np.ndarray) -> np.ndarray:
        np.negative(a, out=a)
        with np.errstate(over="ignore"):  # exp(-z) = inf far below zero: p = 0, then clipped to the floor
            np.exp(a, out=a)
        a += 1.0
        np.reciprocal(a, out=a)
        if self.label_flip:
            a -= self.label_flip
            a /= 1.0 - 2.0 * self.label_flip
        return np.clip(a, self.floor, self.ceiling, out=a)

    def _output_logit_in_place(self, a: np.ndarray) -> np.ndarray:
        p = self._probability_in_place(a)
        odds = 1.0 - p
        np.divide(p, odds, out=p)
        return np.log(p, out=p)

    def output_logit(self, z: np.ndarray) -> np.ndarray:
        """g(z): the graph's "logit" output, log(p / (1 - p)) of the clipped probability (a new array)."""
        return self._output_logit_in_place(np.array(z, dtype=np.float64))

    def logit_and_shifts(self, x: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(z [N], delta [N, k + 1]): the pre-sigmoid logit and how much each factor moved it away from its
        reference (k lender features, then the embedding against the baseline). z is their sum plus the logit of
        the reference applicant with the baseline embedding."""
        t = self.preprocess(x)
        t -= self.reference_t
        n, k = len(t), len(self.mean)
        delta = np.empty((n, k + 1))
        np.matmul(t, self.by_column, out=delta[:, :k])
        np.matmul(np.asarray(e, dtype=np.float64) - self.baseline, self.embedding_weights, out=delta[:, k])
        z = delta.sum(axis=1)
        z += self.reference_t @ self.weights + self.baseline @ self.embedding_weights + self.bias
        return z, delta

    def contributions(self, x: np.ndarray, e: np.ndarray) -> np.ndarray:
        """float64 [N, k + 1]: g(z) - g(z - delta_j), what occlusion on the graph gives, exactly."""
        z, delta = self.logit_and_shifts(x, e)
        logits = np.empty((len(z), delta.shape[1] + 1))
        logits[:, 0] = z
        np.subtract(z[:, None], delta, out=logits[:, 1:])
        self._output_logit_in_place(logits)
        return np.subtract(logits[:, :1], logits[:, 1:], out=delta)

    # -- the check against the graph ------------------------------------------------------------------------------
    def probe_rows(self, count: int = 24) -> tuple[np.ndarray, np.ndarray]:
        """(raw features float32 [M, k], embeddings float32 [M, d]) from public constants only: the reference, the
        declared bounds and a little beyond them (clipping), every level, and a deterministic low-discrepancy
        spread between (no random generator, nothing from applicants)."""
        k, d = len(self.reference), len(self.baseline)
        if self.lower is not None and self.upper is not None:
            low, high = self.lower, self.upper
        else:
            span = np.maximum(np.abs(self.reference), 1.0)
            low, high = self.reference - span, self.reference + span
        margin = 0.1 * (high - low)
        steps = np.sqrt(np.array([2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53], dtype=np.float64))
        alpha = np.resize(steps, k + d)
        grid = np.mod(np.arange(1, count + 1)[:, None] * alpha[None, :], 1.0)  # [count, k + d] in [0, 1)
        x = (low - margin) + grid[:, :k] * (high - low + 2 * margin)
        x = np.vstack([self.reference, low, high, x])
        for i, (column, value) in enumerate(zip(self.level_column, self.level_value, strict=True)):
            x[3 + i % count, column] = value
        e = self.baseline + 4.0 * (grid[:, k:] - 0.5)
        e = np.vstack([self.baseline, self.baseline + 0.5, self.baseline - 0.5, e])
        return x.astype(np.float32), e.astype(np.float32)

    def disagreement(self, occluded_outputs: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
                     ) -> str | None:
        """None when the shortcut reproduces the graph's occlusion on the probe rows, else what differs.

        `occluded_outputs(x, e)` returns the graph's (probability, logit), each [k + 2, M]: the rows, each feature
        at its reference, the baseline embedding (the blocks `LenderScorer` runs for occlusion). Probabilities must
        agree to `PROBE_TOLERANCE`; logits to the graph's float32 resolution (~eps / (p (1 - p))) inside the clip
        and closely where the graph's probability sits on a clip bound (a wrong bound is invisible in probability:
        1 - 1e-7 against 1 - 1.19e-7, but 0.18 in the logit). Two extra probes drive the embedding far out so both
        clip bounds are hit."""
        x, e = self.probe_rows()
        push = 1000.0 * np.sign(self.embedding_weights)
        if push.any():
            x = np.vstack([x, x[:1], x[:1]])
            e = np.vstack([e, (self.baseline + push)[None, :], (self.baseline - push)[None, :]]).astype(np.float32)
        graph_p, graph_logit = (np.asarray(a, dtype=np.float64) for a in occluded_outputs(x, e))
        z, delta = self.logit_and_shifts(x, e)
        every = np.vstack([z[None, :], (z[:, None] - delta).T])
        mine_p, mine_logit = self.probability_of(every), self.output_logit(every)
        if graph_p.shape != mine_p.shape or graph_logit.shape != mine_p.shape:
            return f"the graph gave outputs of shape {graph_p.shape}, the shortcut {mine_p.shape}"
        on_bound = (graph_p == np.float32(self.floor)) | (graph_p == np.float32(self.ceiling))
        eps = float(np.finfo(np.float32).eps)
        resolution = np.where(on_bound, 1e-5, 1e-4 + 8 * eps / np.maximum(mine_p * (1 - mine_p), 1e-300))
        for what, graph, mine, tolerance in (("probability", graph_p, mine_p, PROBE_TOLERANCE),
                                             ("logit", graph_logit, mine_logit, resolution)):
            gap = np.abs(graph - mine) - tolerance
            if not np.all(gap <= 0):
                block, row = (int(i) for i in np.unravel_index(int(np.argmax(gap)), gap.shape))
                return (f"probe row {row}, block {block}: the graph gives {what} {graph[block, row]:.7g}, the "
                        f"linear description {mine[block, row]:.7g}")
        return None
