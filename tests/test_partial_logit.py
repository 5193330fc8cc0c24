"""One number per user (issue 18): the payment holder owns the projection and sends its partial logit; the lender's
top adds it. These tests pin what that promises: the top is additive in that number, the payment holder's first
release is a constant when its head starts at zero, the exported parts and the bundle carry one number per
applicant, and the audit's excess (what everything received adds to the final score) tells a release that adds
projections from one that does not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedscore.audit.reconstruction import excess_over_score
from fedscore.bundle import assemble_bundle
from fedscore.shared.config import load_config
from fedscore.shared.model.export_onnx import export_lender_part, export_payment_part, onnx_score
from fedscore.shared.model.manifest import LENDER_FILE, PAYMENT_FILE
from fedscore.shared.model.parts import init_module, lender_model, payment_model
from fedscore.shared.model.preprocessing import Scaler

PARTIAL = "model.payment_output=partial_logit"


def _x(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


@pytest.mark.parametrize("weight", ["fixed", "learned"])
def test_the_top_adds_the_partial_logit(weight: str) -> None:
    config = load_config(None, [PARTIAL, f"model.partial_logit_weight={weight}"])
    top = init_module(lender_model(5, config.model.sent_dim, config), 3)
    x, s = _x(50, 5, 1), _x(50, 1, 2)
    with torch.no_grad():
        shift = top(x, s) - top(x, torch.zeros_like(s))
    assert config.model.sent_dim == 1
    assert torch.allclose(shift, s[:, 0], atol=1e-6)  # c starts at 1 (learned) or stays there (fixed)
    trainable = sum(p.numel() for p in top.parameters())
    assert trainable == 6 + (weight == "learned")  # 5 weights + bias, and c only when it is learned


def test_the_embedding_option_keeps_the_wide_top() -> None:
    config = load_config(None, ["model.payment_output=embedding", "model.embedding_dim=8"])
    assert config.model.sent_dim == 8
    top = lender_model(5, config.model.sent_dim, config)
    assert top.partial_logit is None and top.input_width == 13
    bottom = init_module(payment_model(4, config), 1)
    assert bottom(_x(7, 4, 0)).shape == (7, 8)


def test_a_zero_head_releases_a_constant_first() -> None:
    config = load_config(None, [PARTIAL])
    bottom = init_module(payment_model(4, config), 1, zero_head=config.model.payment_head_init == "zero")
    out = bottom(_x(100, 4, 0))
    assert out.shape == (100, 1) and bool((out == 0).all())
    random_head = init_module(payment_model(4, config), 1, zero_head=False)
    assert float(random_head(_x(100, 4, 0)).detach().std()) > 0  # live layers: the head gets a gradient


def test_partial_logit_parts_export_and_bundle_one_number(tmp_path: Path) -> None:
    config = load_config(None, [PARTIAL, "privacy.feature_epsilon=8"])  # squashed to the public bound |s| <= clip
    rng = np.random.default_rng(0)
    raw_p, raw_l = rng.normal(size=(300, 4)).astype(np.float32), rng.normal(size=(300, 3)).astype(np.float32)
    scaler_p, scaler_l = Scaler.fit(["a", "b", "c", "d"], raw_p, []), Scaler.fit(["e", "f", "g"], raw_l, [])
    bottom = init_module(payment_model(4, config), 1)  # random head: a non-constant partial logit to compare
    top = init_module(lender_model(3, config.model.sent_dim, config), 2)
    with torch.no_grad():
        s = bottom(torch.from_numpy(scaler_p.transform(raw_p)))
    assert float(s.abs().max()) <= config.privacy.embedding_clip
    for party, file, model, scaler, sidecar in (
            ("payment", PAYMENT_FILE, bottom, scaler_p, {"feature_definition": None}),
            ("lender", LENDER_FILE, top, scaler_l, {"reference": [0.0] * 3})):
        out = tmp_path / "parties" / party / "export"
        (export_payment_part if party == "payment" else export_lender_part)(model, scaler, out / file)
        (out / f"{party}_part.json").write_text(json.dumps({"scaler": scaler.to_dict(), **sidecar}))
    manifest = assemble_bundle(tmp_path, json.loads(config.model_dump_json()), [])
    assert manifest.embedding_dim == 1  # read from the lender graph's input: one number per applicant
    p_onnx = onnx_score(tmp_path / "model" / PAYMENT_FILE, tmp_path / "model" / LENDER_FILE, raw_p, raw_l)
    with torch.no_grad():
        p_torch = top.probability(torch.from_numpy(scaler_l.transform(raw_l)), s).numpy()
    assert np.abs(p_onnx - p_torch).max() < 1e-5


@pytest.mark.slow
def test_the_excess_tells_extra_projections_from_the_score() -> None:
    """The lender's attack given the final score only, and given earlier releases that are other projections of the
    payment columns: the first adds nothing to the score (excess ~0), the second adds a lot."""
    rng = np.random.default_rng(5)
    n, d = 3000, 6
    x = rng.normal(size=(n, d))
    own = rng.normal(size=(n, 3))
    w_final = rng.normal(size=d)
    score = own @ np.array([0.5, -0.2, 0.1]) + x @ w_final
    aux, rest = np.arange(600), np.arange(600, n)
    same = excess_over_score(own, score, (x @ w_final)[:, None], x, aux, rest, seed=0)
    others = excess_over_score(own, score, np.column_stack([x @ rng.normal(size=d) for _ in range(4)]), x, aux,
                               rest, seed=0)
    assert abs(same["excess"]) < 0.03 and same["within_bar"]
    assert others["excess"] > 0.3 and not others["within_bar"]
    assert others["inputs"]["own columns + final score"]["pooled_r2"] > others["inputs"]["own columns"]["pooled_r2"]
