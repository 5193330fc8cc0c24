"""The lender's own final part (model.lender_part = "gbdt"): its graph scores exactly what the fitted trees do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from fedscore.shared.model.lender_gbdt import METADATA_KEY, export_lender_gbdt, fit_lender_gbdt, gbdt_features
from fedscore.shared.model.manifest import EMBEDDING, LENDER_INPUT, LOGIT, PROBABILITY
from fedscore.shared.model.preprocessing import Scaler


def _data(n: int = 1500) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    raw = rng.uniform(0, 10, size=(n, 3))
    s = rng.normal(size=(n, 1))
    y = (raw[:, 0] / 10 + s[:, 0] + rng.normal(scale=0.5, size=n) > 0.8).astype(np.int64)
    split = np.where(np.arange(n) % 5 == 0, 1, 0)
    return raw, s, y, split


def test_the_graph_scores_the_trees_margin_and_clips_to_the_declared_bounds(tmp_path: Path) -> None:
    raw, s, y, split = _data()
    scaler = Scaler(columns=["a", "b", "c"], log_columns=[], mean=[5.0] * 3, std=[5.0] * 3, lower=[0.0, 0.0, 1.0],
                    upper=[10.0, 8.0, 10.0])
    clipped = scaler.clip(raw)
    fit = fit_lender_gbdt(gbdt_features(clipped, s), y, split == 0, split == 1)
    assert fit.val_auc is not None and fit.val_auc > 0.7  # it learned the signal, chosen on validation
    path = tmp_path / "lender_part.onnx"
    export_lender_gbdt(fit, scaler, 1, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_of_bounds = raw.copy()
    out_of_bounds[:, 1] += 50.0  # beyond b's upper bound 8: the graph clips like training did
    probability, logit = session.run([PROBABILITY, LOGIT], {LENDER_INPUT: out_of_bounds.astype(np.float32),
                                                             EMBEDDING: s.astype(np.float32)})
    expected = fit.model.decision_function(gbdt_features(scaler.clip(out_of_bounds), s))
    assert np.abs(logit - expected).max() < 1e-4
    assert np.abs(probability - 1 / (1 + np.exp(-expected))).max() < 1e-5
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta[METADATA_KEY])["kind"] == "gbdt" and meta["fedscore.part"] == "lender"


def test_without_validation_users_the_first_setting_is_kept() -> None:
    raw, s, y, _ = _data(600)
    fit = fit_lender_gbdt(gbdt_features(raw, s), y, np.ones(len(y), bool), np.zeros(len(y), bool))
    assert fit.val_auc is None and fit.setting == (0.05, 7, 200)


def test_the_lender_recovers_the_partial_logit_from_its_score_through_its_own_part() -> None:
    """The audit's attacker holds the lender's part (reconstruction.py): searching the partial logit that gives each
    user's score with the user's own columns recovers it closely from a GBDT part, and not at all from a part that
    does not read it; a coarse score then leaves no excess once inverted, while a plain regressor sees one."""
    from fedscore.audit.reconstruction import excess_over_score, invert_partial_logit

    raw, s, y, split = _data(3000)
    fit = fit_lender_gbdt(gbdt_features(raw, s), y, split == 0, split == 1)

    def part(v: float) -> np.ndarray:
        return fit.model.decision_function(gbdt_features(raw, np.full((len(raw), 1), v)))

    score = fit.model.decision_function(gbdt_features(raw, s))
    grid = np.quantile(s[split == 0, 0], (np.arange(64) + 0.5) / 64)
    guess = invert_partial_logit(part, score, grid)
    assert np.corrcoef(guess, s[:, 0])[0, 1] > 0.9
    blind = invert_partial_logit(lambda v: raw[:, 0], raw[:, 0], grid)  # a part that ignores the partial logit
    assert np.allclose(blind, grid.mean())

    rng = np.random.default_rng(4)  # payment columns that the partial logit summarises, a score that rounds it
    x = np.column_stack([s[:, 0] + rng.normal(scale=0.1, size=len(s)), rng.normal(size=len(s))])
    coarse = raw[:, 0] / 10 + (s[:, 0] > 0)
    aux, rest = np.arange(600), np.arange(600, len(s))
    plain = excess_over_score(raw, coarse, s, x, aux, rest, seed=0)
    inverted = excess_over_score(raw, coarse, s, x, aux, rest, seed=0, inverted=s[:, 0])
    assert plain["excess"] > 0.05 and not plain["within_bar"]
    assert inverted["excess"] < 0.02 and inverted["within_bar"] and inverted["plain_excess"] > 0.05


def test_a_run_scores_with_its_own_gbdt_part(tmp_path: Path) -> None:
    """The default lender part end to end: exported as a GBDT graph, scored in batch with occlusion reason codes
    from the lender's own columns and the one payment factor, and never charged to lender.labels@payment (nothing
    computed from it reaches the payment holder)."""
    from fedscore.runs import run_inprocess
    from fedscore.scoring import score_batch
    from fedscore.shared.config import load_config
    from fedscore.shared.party_home import PartyHome
    from fedscore.shared.privacy.ledger import ledger_entries
    from fedscore.shared.scoring.bundle import load_scoring_bundle
    from fedscore.shared.scoring.scorecard import PAYMENT_FACTOR
    from tests.conftest import FAST, SECRET, fresh_homes, make_party_data

    make_party_data(tmp_path / "data", population=2500)
    config = load_config(None, [*FAST, "training.rounds=2", "privacy.enabled=true", "privacy.outsider_epsilon=none"])
    assert config.model.lender_part == "gbdt"
    homes = fresh_homes(tmp_path / "homes")
    run_inprocess(config, tmp_path / "data", tmp_path / "run", secret=SECRET, homes=homes)
    model = tmp_path / "run" / "model"
    meta = {p.key: p.value for p in onnx.load(str(model / "lender_part.onnx")).metadata_props}
    assert json.loads(meta[METADATA_KEY])["kind"] == "gbdt"
    bundle = load_scoring_bundle(model)
    scores = score_batch(model, tmp_path / "data")
    assert scores["probability"].between(0, 1).all() and scores["probability"].nunique() > 10
    allowed = {*bundle.lender_features, PAYMENT_FACTOR}
    for text in scores["reasons"].dropna():
        assert {p.split(":")[0] for p in text.split("; ") if p and ":" in p} <= allowed
    entries = ledger_entries(homes["lender"] / PartyHome.LEDGER, "lender")
    records = [m for e in entries if e["guarantee"] == "lender.labels@payment" for m in e["mechanisms"]]
    # randomized response, then the one exchange (not DP without DP-SGD: the claim is RR's own); no released part
    assert [m["kind"] for m in records] == ["randomized_response", "gaussian"]
    # and the privacy report names the part unprotected, where it lists what leaves the lender
    report = json.loads((tmp_path / "run" / "privacy-report.json").read_text())
    assert any(u["against"] == "whoever holds the lender part" for u in report["unprotected"])
    part = next(r for r in report["releases"]["lender"] if r["what"].startswith("lender model part"))
    assert part["covered_by"].startswith("unprotected")
