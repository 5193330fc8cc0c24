"""The lender's own final part: a gradient-boosted model on its columns and the payment holder's partial logit.

Why (issue 18 item 5): the lender top that the protocol trains is fitted to randomized-response labels, because
everything the payment holder receives (the per-user gradients) must be computed from them. The part the lender
scores with is a different matter: the payment holder never receives it nor anything computed from it (online, the
payment holder answers one partial logit and the lender combines it here), so the lender may model its own columns
"in whatever way it likes" on its clean labels, and only what crosses is charged against the payment holder.

A tuned HistGradientBoosting classifier on [the lender's raw columns, clipped to their declared bounds; the last
partial logit it received] does what the lender-only reference does with the lender's columns, and adds the payment
side's one number with the interactions a linear top cannot see. Measured offline on the finished runs of
`experiments/issue18-scenario-gradient-scale.toml` (BENCHMARKS "Issue 18: the lender's own final part"): the lift
kept rose from a median of 0.78 to 0.85.

What it costs: this part is fitted on clean labels without DP. It is the lender's own model, like the one it would
use without federating: it stays with the lender (the payment holder serves from the payment part alone,
`fedscore serve payment` loads nothing else), and the privacy report names it unprotected against whoever else is
handed model/ (server/privacy_report.py). `model.lender_part = "top"` keeps the DP-SGD top as the released part.

The ONNX graph has the same inputs and outputs as the torch top's ("lender_features" raw [N, n] and "embedding"
[N, d] -> "probability" [N], "logit" [N]), so scoring, serving, reason codes (occlusion) and the bundle's checks
read it unchanged. The trees come from skl2onnx (its `raw_scores` option gives the margin, i.e. the logit); the
clip, the concatenation and the sigmoid around them are four plain ONNX nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from fedscore.shared.model.manifest import EMBEDDING, LENDER_INPUT, LOGIT, PROBABILITY
from fedscore.shared.model.preprocessing import Scaler

# (learning rate, max leaf nodes, min samples per leaf): a small grid, each setting fitted on the training users and
# the best kept on the lender's validation users (5 of the 24 settings fedscore/references.py tunes over, with fewer
# iterations: it runs inside every federated run)
GRID: tuple[tuple[float, int, int], ...] = ((0.05, 7, 200), (0.05, 15, 100), (0.1, 7, 50), (0.03, 31, 200),
                                            (0.05, 3, 100))
MAX_ITER = 200
METADATA_KEY = "fedscore.lender_part"  # "gbdt" in this part's ONNX metadata
INNER_INPUT = "gbdt_features"


@dataclass(frozen=True)
class LenderGbdtFit:
    """The chosen model, its setting and its validation AUC (the lender's own evaluation)."""

    model: object  # sklearn HistGradientBoostingClassifier (kept untyped: sklearn is imported lazily)
    setting: tuple[float, int, int]
    val_auc: float | None


# One OpenMP thread, as fedscore/references.py fits: the lender's worker shares its machine (the other party's worker
# in a local federation, scoring, test workers), and HistGradientBoosting's threads spinning against other busy
# processes cost several times the CPU (BENCHMARKS.md "The own part fits on one thread": 0.68 s against 1.2-2.4 s per
# grid at 3,000 users, load ~6). The trees are the same whatever the thread count.
@threadpool_limits.wrap(limits=1)
def fit_lender_gbdt(features: np.ndarray, labels: np.ndarray, train: np.ndarray, val: np.ndarray) -> LenderGbdtFit:
    """Fit every GRID setting on the training users' clean labels and keep the best on validation (the first
    setting when there are no validation users of both classes). Deterministic: no subsampling, no early stopping."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from fedscore.shared.metrics import auc

    y = np.asarray(labels).astype(np.int64)
    x = np.asarray(features, dtype=np.float32)
    if len(np.unique(y[train])) < 2:
        raise ValueError("the lender's final part needs training users of both classes")
    can_choose = bool(val.any()) and len(np.unique(y[val])) == 2
    best: LenderGbdtFit | None = None
    for setting in GRID if can_choose else GRID[:1]:
        rate, leaves, min_leaf = setting
        model = HistGradientBoostingClassifier(learning_rate=rate, max_leaf_nodes=leaves, min_samples_leaf=min_leaf,
                                               max_iter=MAX_ITER, early_stopping=False, random_state=0)
        model.fit(x[train], y[train])
        score = float(auc(y[val], model.decision_function(x[val]))) if can_choose else None
        if best is None or (score is not None and best.val_auc is not None and score > best.val_auc):
            best = LenderGbdtFit(model, setting, score)
    assert best is not None
    return best


def gbdt_features(raw_lender: np.ndarray, received: np.ndarray) -> np.ndarray:
    """[the lender's clipped raw columns, what the payment holder sent]: the layout the graph builds too."""
    return np.hstack([np.asarray(raw_lender, dtype=np.float32), np.asarray(received, dtype=np.float32)])


def export_lender_gbdt(fit: LenderGbdtFit, scaler: Scaler, embedding_dim: int, path: Path) -> None:
    """Write the part as one ONNX graph: clip the raw columns to their declared bounds, append the embedding, run
    the trees (margin = logit), sigmoid. Written atomically, checked by onnx's checker first."""
    from onnx import TensorProto, helper
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    from fedscore.shared.model.export_onnx import part_metadata, save_part

    n_lender = len(scaler.columns)
    trees = to_onnx(fit.model, initial_types=[(INNER_INPUT, FloatTensorType([None, n_lender + embedding_dim]))],
                    options={id(fit.model): {"zipmap": False, "raw_scores": True}},
                    target_opset={"": 17, "ai.onnx.ml": 3})
    margins = next(o.name for o in trees.graph.output if o.name != "label")
    lower = np.asarray(scaler.lower if scaler.lower is not None else [-np.inf] * n_lender, dtype=np.float32)
    upper = np.asarray(scaler.upper if scaler.upper is not None else [np.inf] * n_lender, dtype=np.float32)
    constants = [helper.make_tensor("lower_bounds", TensorProto.FLOAT, [n_lender], lower.tolist()),
                 helper.make_tensor("upper_bounds", TensorProto.FLOAT, [n_lender], upper.tolist()),
                 helper.make_tensor("positive_class", TensorProto.INT64, [], [1])]
    before = [helper.make_node("Max", [LENDER_INPUT, "lower_bounds"], ["raised"]),
              helper.make_node("Min", ["raised", "upper_bounds"], ["clipped"]),
              helper.make_node("Concat", ["clipped", EMBEDDING], [INNER_INPUT], axis=1)]
    after = [helper.make_node("Gather", [margins, "positive_class"], [LOGIT], axis=1),
             helper.make_node("Sigmoid", [LOGIT], [PROBABILITY])]
    graph = helper.make_graph(
        before + list(trees.graph.node) + after, "fedscore_lender_gbdt",
        [helper.make_tensor_value_info(LENDER_INPUT, TensorProto.FLOAT, ["batch", n_lender]),
         helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["batch", embedding_dim])],
        [helper.make_tensor_value_info(PROBABILITY, TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info(LOGIT, TensorProto.FLOAT, ["batch"])],
        initializer=constants + list(trees.graph.initializer))
    proto = helper.make_model(graph, opset_imports=list(trees.opset_import), producer_name="fedscore")
    proto.ir_version = trees.ir_version
    setting = {"kind": "gbdt", "learning_rate": fit.setting[0], "max_leaf_nodes": fit.setting[1],
               "min_samples_leaf": fit.setting[2], "max_iter": MAX_ITER}
    save_part(proto, path, {**part_metadata("lender", scaler), METADATA_KEY: json.dumps(setting)})
