"""The linear shortcut for reason codes (shared/scoring/linear.py) gives what occlusion on the graph gives.

Small lender parts are built directly (no training: a seeded torch init plus chosen weights, a scaler with clipping,
a signed-log column and level indicators), exported with the real exporter and scored both ways on the same
applicants: decisions (points, tier, limit, review) and reason lists must be equal, probabilities within 1e-6, and
the shortcut's contributions must equal an occlusion computed in float64 by torch on the same modules (the graph's
own occlusion carries float32 rounding, amplified where p (1 - p) is small, so it is compared to that resolution).
A top with a hidden layer says nothing and keeps occlusion; a description that does not match its graph, or cannot
be read, is refused at load time in favour of occlusion.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from fedscore.clients.lender.scoring import LenderScorer
from fedscore.shared.model.export_onnx import LenderScoring, describe_part, export_lender_part, linear_top_description
from fedscore.shared.model.manifest import LENDER_FILE, ModelManifest, PartManifest
from fedscore.shared.model.parts import LenderTop
from fedscore.shared.model.preprocessing import Scaler
from fedscore.shared.scoring.bundle import ScoringBundle
from fedscore.shared.scoring.linear import METADATA_KEY
from fedscore.shared.scoring.payment_signals import PaymentSignals

SCALER = Scaler(columns=["income", "debt", "age", "band"], log_columns=["debt"], mean=[3000.0, 4.0, 40.0, 2.0],
                std=[2500.0, 3.0, 15.0, 1.5], levels={"band": [1.0, 2.0, 3.0]}, lower=[0.0, 0.0, 18.0, 0.0],
                upper=[10000.0, 50000.0, 80.0, 5.0])
REFERENCE = [2500.0, 1000.0, 40.0, 2.0]


def _top(partial_logit: str | None, flip: float, hidden: list[int] | None = None) -> LenderTop:
    torch.manual_seed(0)  # test weights only
    width = 1 if partial_logit else 3
    top = LenderTop(len(SCALER.output_names), width, hidden or [], label_flip=flip, partial_logit=partial_logit)
    with torch.no_grad():
        for module in top.net:
            if isinstance(module, torch.nn.Linear):
                # most probabilities inside the clip bounds (with flip f, only sigmoid(z) in (f, 1 - f) is)
                module.weight.normal_(0.0, 0.3 if flip else 0.9)
                module.bias.fill_(0.0 if flip else -0.7)
        if partial_logit == "learned":
            top.payment_weight.weight.fill_(1.3)
    return top.eval()


def _bundle(top: LenderTop, directory: Path) -> ScoringBundle:
    """A bundle around the exported lender part; the payment part is never opened by LenderScorer."""
    directory.mkdir(parents=True, exist_ok=True)
    export_lender_part(top, SCALER, directory / LENDER_FILE)
    payment = PartManifest(file="payment_part.onnx", sha256="0" * 64, inputs=["payment_features"],
                           input_dtypes={"payment_features": "float32"}, feature_names=["spend"],
                           outputs=["embedding"])
    manifest = ModelManifest(parts={"payment": payment, "lender": describe_part(directory / LENDER_FILE, SCALER)},
                             embedding_dim=top.embedding_dim, lender_reference=REFERENCE)
    return ScoringBundle(directory, manifest)


def _applicants(n: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)  # test inputs only
    low, high = np.array(SCALER.lower), np.array(SCALER.upper)
    x = low - 0.1 * (high - low) + rng.uniform(size=(n, len(low))) * 1.2 * (high - low)  # some beyond the bounds
    x[:, 3] = rng.choice([0.0, 1.0, 2.0, 3.0, 4.5], size=n)  # levels and values that are no level
    for j in range(len(low)):
        x[j::7, j] = REFERENCE[j]  # at the reference: contributes exactly nothing
    e = rng.normal(0.0, 1.5, size=(n, width))
    e[::5] = 0.0  # the baseline embedding
    return x.astype(np.float32), e.astype(np.float32), rng.uniform(size=n) < 0.8


def _float64_occlusion(top: LenderTop, x: np.ndarray, e: np.ndarray) -> np.ndarray:
    """logit(x) - logit(x with one factor at its reference), by torch in float64 on the exported modules."""
    module = LenderScoring(top, SCALER).double().eval()
    xt, et = torch.from_numpy(x.astype(np.float64)), torch.from_numpy(e.astype(np.float64))
    with torch.no_grad():
        base = module(xt, et)[1].numpy()
        out = []
        for j in range(x.shape[1]):
            occluded = xt.clone()
            occluded[:, j] = REFERENCE[j]
            out.append(base - module(occluded, et)[1].numpy())
        out.append(base - module(xt, torch.zeros_like(et))[1].numpy())
    return np.stack(out, axis=1)


@pytest.mark.parametrize("partial_logit", [None, "learned", "fixed"])
@pytest.mark.parametrize("flip", [0.0, 0.25])
def test_the_linear_shortcut_gives_what_occlusion_gives(tmp_path: Path, partial_logit: str | None,
                                                        flip: float) -> None:
    top = _top(partial_logit, flip)
    bundle = _bundle(top, tmp_path / "model")
    fast, slow = LenderScorer(bundle), LenderScorer(bundle, reasons="occlusion")
    assert (fast.reasons_by, slow.reasons_by) == ("linear", "occlusion")
    x, e, has_payment = _applicants(3000, top.embedding_dim)
    e[~has_payment] = 0.0
    signals = PaymentSignals.neutral(len(x))

    exact = _float64_occlusion(top, x, e)
    np.testing.assert_allclose(fast.linear.contributions(x, e), exact, rtol=0, atol=1e-9)

    p_fast, v_fast, d_fast = fast.contributions(x, e)
    p_slow, v_slow, d_slow = slow.contributions(x, e)
    np.testing.assert_allclose(p_fast, p_slow, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(d_fast, d_slow)
    # the graph's logit is log(p) - log1p(-p) of a float32 p: resolution ~eps32 / (p (1 - p)) at each end
    z, delta = fast.linear.logit_and_shifts(x, e)
    p_all = fast.linear.probability_of(np.hstack([z[:, None], z[:, None] - delta]))
    resolution = 8 * np.finfo(np.float32).eps / (p_all * (1 - p_all))
    assert np.all(np.abs(v_fast - v_slow) <= 1e-5 + resolution[:, :1] + resolution[:, 1:])
    assert np.median(np.abs(v_fast - v_slow)) < 1e-6
    at_reference = np.hstack([d_fast[:, :-1] == 0, np.all(e == 0, axis=1)[:, None]])
    assert at_reference.any(axis=0).all()  # every factor is at its reference somewhere ...
    assert np.all(v_fast[at_reference] == 0) and np.all(v_slow[at_reference] == 0)  # ... and gives exactly 0
    assert np.abs(v_fast).max() > 0.5  # the factors do move the score

    a = fast.score(x, e, has_payment, signals)
    b = slow.score(x, e, has_payment, signals)
    for field in ("score", "tier", "credit_limit", "review_flag"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    # reason lists: equal, except where the ranking is a tie within the graph's float32 resolution (two factors
    # closer than it, or a factor that close to 0): there the old path's order is rounding, not a decision
    tolerance = 1e-5 + 2 * resolution.max(axis=1)
    differ = [i for i, (ra, rb) in enumerate(zip(a.reasons, b.reasons, strict=True)) if ra != rb]
    assert len(differ) <= 0.005 * len(x)
    for i in differ:
        top = np.sort(v_fast[i])[::-1][:4]
        assert np.min(np.abs(np.diff(top))) <= tolerance[i] or np.min(np.abs(top)) <= tolerance[i], i
    assert len(a.reason_sets) > 10  # many distinct reason lists were compared, not one


def test_the_description_holds_the_parts_own_weights() -> None:
    top = _top("learned", 0.25)
    described = linear_top_description(top)
    assert described is not None
    assert described.weights == top.net[0].weight.double().reshape(-1).tolist()
    assert described.embedding_weights == [pytest.approx(1.3)]
    assert described.bias == 0.0
    assert described.label_flip == 0.25
    # the graph's float32 constants, not the decimal ones: 1 - 1e-3 in float32 is 0.99900001
    assert described.probability_floor == float(np.float32(1e-3))
    assert described.probability_ceiling == float(np.float32(1) - np.float32(1e-3))


def test_a_top_with_a_hidden_layer_says_nothing_and_keeps_occlusion(tmp_path: Path) -> None:
    top = _top("learned", 0.0, hidden=[4])
    assert linear_top_description(top) is None
    bundle = _bundle(top, tmp_path / "model")
    metadata = {p.key for p in onnx.load(str(bundle.part_path("lender"))).metadata_props}
    assert METADATA_KEY not in metadata
    assert LenderScorer(bundle).reasons_by == "occlusion"


def _rewrite_description(path: Path, edit) -> None:
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = edit(prop.value)
    onnx.save(model, str(path))


@pytest.mark.parametrize("edit, logged", [
    (lambda text: json.dumps({**json.loads(text), "weights": [w * 1.01 for w in json.loads(text)["weights"]]}),
     "does not reproduce the graph"),
    (lambda text: json.dumps({**json.loads(text), "bias": json.loads(text)["bias"] + 0.01}),
     "does not reproduce the graph"),
    (lambda text: json.dumps({**json.loads(text), "label_flip": 0.1}), "does not reproduce the graph"),
    # 1 - 1e-3 in float64 instead of the graph's float32 constant: 6e-8 in probability, ~6e-5 in the logit
    (lambda text: json.dumps({**json.loads(text), "probability_ceiling": 1 - 1e-3}), "does not reproduce the graph"),
    (lambda text: json.dumps({**json.loads(text), "weights": json.loads(text)["weights"][:-1]}),
     "unusable linear description"),
    (lambda text: text[:-5], "unusable linear description"),
])
def test_a_description_that_does_not_match_its_graph_falls_back_to_occlusion(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, edit, logged: str) -> None:
    top = _top("learned", 0.25)
    bundle = _bundle(top, tmp_path / "model")
    _rewrite_description(bundle.part_path("lender"), edit)
    with caplog.at_level(logging.WARNING):
        scorer = LenderScorer(bundle)
    assert scorer.reasons_by == "occlusion"
    assert logged in caplog.text and str(bundle.part_path("lender")) in caplog.text
