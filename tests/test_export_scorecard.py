"""ONNX export of both parts (preprocessing inside), the hash-checked manifest, and the scorecard product."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from fedscore.bundle import assemble_bundle
from fedscore.clients.lender.scoring import LenderScorer
from fedscore.clients.payment.features import FEATURE_NAMES
from fedscore.shared.model.export_onnx import (
    EMBEDDING,
    LENDER_FILE,
    LENDER_INPUT,
    MANIFEST_NAME,
    PAYMENT_FILE,
    PAYMENT_INPUT,
    ModelManifest,
    export_lender_part,
    export_payment_part,
    load_manifest,
    sha256_file,
    verify_parts,
    write_manifest,
)
from fedscore.shared.model.parts import LenderTop, PaymentBottom, init_module
from fedscore.shared.model.preprocessing import Scaler, heavy_tailed_columns
from fedscore.shared.scoring.bundle import load_scoring_bundle
from fedscore.shared.scoring.scorecard import (
    PAYMENT_FACTOR,
    CoarseSignalRules,
    ScorecardParams,
    coarse_payment_signals,
    credit_limit,
    decisions,
    points,
    reason_codes,
    tier,
)

LENDER_COLUMNS = ["age", "income_band", "existing_debt", "bureau_score", "requested_amount", "tenure_months"]
PAYMENT_COLUMNS = ["log_total_spend", "mean_ticket", "monthly_spend_cv", "recent_30d_spend_ratio", "net_flow",
                   "days_since_last"]
DIM = 4


def _raw_lender(n: int, rng: np.random.Generator) -> np.ndarray:
    debt = np.where(rng.random(n) < 0.3, 0.0, np.exp(8.6 + 1.0 * rng.standard_normal(n)))
    return np.column_stack([
        rng.integers(20, 75, n), rng.integers(1, 7, n), debt, np.clip(rng.normal(690, 60, n), 300, 850),
        np.exp(8.7 + 0.6 * rng.standard_normal(n)), np.exp(3.2 + 0.8 * rng.standard_normal(n)),
    ]).astype(np.float32)


def _raw_payment(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.column_stack([
        rng.normal(9.0, 0.8, n), np.exp(3.5 + 1.2 * rng.standard_normal(n)), rng.gamma(4.0, 0.2, n),
        rng.gamma(1.0, 1.0, n), 2000.0 * rng.standard_t(1.5, n),  # signed, heavy-tailed: exercises sign(x) log1p|x|
        rng.exponential(5.0, n),
    ]).astype(np.float32)


def _jitter(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded weights plus non-zero biases, so ReLUs switch on and off across rows."""
    init_module(module, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.bias.copy_(0.3 * torch.randn(layer.bias.shape, generator=gen))
    return module


@pytest.fixture(scope="module")
def parts() -> dict:
    rng = np.random.default_rng(7)
    raw_l, raw_p = _raw_lender(3000, rng), _raw_payment(3000, rng)
    # the money columns get the signed log explicitly (plus whatever the project's heuristic picks), so the
    # ONNX comparison always exercises the in-graph log, negative values included
    log_l = sorted({"existing_debt", "requested_amount", *heavy_tailed_columns(LENDER_COLUMNS, raw_l)})
    log_p = sorted({"mean_ticket", "net_flow", *heavy_tailed_columns(PAYMENT_COLUMNS, raw_p)})
    scaler_l = Scaler.fit(LENDER_COLUMNS, raw_l, log_l)
    scaler_p = Scaler.fit(PAYMENT_COLUMNS, raw_p, log_p)
    model_p = _jitter(PaymentBottom(len(PAYMENT_COLUMNS), [16, 8], DIM), 1)
    model_l = _jitter(LenderTop(len(LENDER_COLUMNS), DIM, [8]), 2)
    return {"raw_l": raw_l, "raw_p": raw_p, "scaler_l": scaler_l, "scaler_p": scaler_p, "model_p": model_p,
            "model_l": model_l}


def _export_run(run_dir: Path, model_p: PaymentBottom, scaler_p: Scaler, model_l: LenderTop, scaler_l: Scaler,
                reference: list[float], *, feature_definition: dict | None = None, config: dict | None = None,
                privacy: list[dict] | None = None) -> ModelManifest:
    """What a run does at export: each party writes its part and sidecar to parties/<party>/export (as their
    `on_export` does), then the operator assembles RUN_DIR/model with `assemble_bundle`, the production path."""
    for party, file, model, scaler, sidecar in (
            ("payment", PAYMENT_FILE, model_p, scaler_p, {"feature_definition": feature_definition}),
            ("lender", LENDER_FILE, model_l, scaler_l, {"reference": reference})):
        out = run_dir / "parties" / party / "export"
        (export_payment_part if party == "payment" else export_lender_part)(model, scaler, out / file)
        (out / f"{party}_part.json").write_text(json.dumps({"scaler": scaler.to_dict(), **sidecar}))
    return assemble_bundle(run_dir, {"model": {"embedding_dim": model_l.embedding_dim}, **(config or {})}, privacy)


@pytest.fixture(scope="module")
def bundle(parts: dict, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("run")
    manifest = _export_run(run, parts["model_p"], parts["scaler_p"], parts["model_l"], parts["scaler_l"],
                           [40.0, 3.0, 5000.0, 690.0, 6000.0, 24.0], feature_definition={"version": 1},
                           config={"rounds": 3}, privacy=[{"mechanism": "none"}])
    return run / "model", manifest


# ------------------------------------------------------------------------------------------------------ export


def test_fixture_exercises_the_signed_log(parts: dict) -> None:
    net_flow = parts["raw_p"][:, PAYMENT_COLUMNS.index("net_flow")]
    assert (net_flow < -1e4).any() and (net_flow > 1e4).any()
    assert "net_flow" in parts["scaler_p"].log_columns


def test_onnx_matches_torch_through_both_parts(parts: dict, bundle) -> None:
    out, _ = bundle
    diff = verify_parts(out / PAYMENT_FILE, out / LENDER_FILE, parts["model_p"], parts["scaler_p"],
                        parts["model_l"], parts["scaler_l"], parts["raw_p"], parts["raw_l"])
    assert diff < 1e-5
    # and the comparison is sensitive: a graph with different preprocessing numbers is caught
    wrong = Scaler(**{**parts["scaler_l"].to_dict(), "mean": [m + 0.5 for m in parts["scaler_l"].mean]})
    bad = verify_parts(out / PAYMENT_FILE, out / LENDER_FILE, parts["model_p"], parts["scaler_p"],
                       parts["model_l"], wrong, parts["raw_p"], parts["raw_l"])
    assert bad > 1e-3


def test_graph_io_names_and_dynamic_batch(parts: dict, bundle) -> None:
    out, _ = bundle
    pay = ort.InferenceSession(str(out / PAYMENT_FILE), providers=["CPUExecutionProvider"])
    lend = ort.InferenceSession(str(out / LENDER_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in pay.get_inputs()] == [PAYMENT_INPUT]
    assert [o.name for o in pay.get_outputs()] == [EMBEDDING]
    assert [i.name for i in lend.get_inputs()] == [LENDER_INPUT, EMBEDDING]
    assert [o.name for o in lend.get_outputs()] == ["probability", "logit"]
    for n in (1, 37):
        emb = pay.run(None, {PAYMENT_INPUT: parts["raw_p"][:n]})[0]
        assert emb.shape == (n, DIM) and emb.dtype == np.float32
        prob, logit = lend.run(None, {LENDER_INPUT: parts["raw_l"][:n], EMBEDDING: emb})
        assert prob.shape == (n,) and logit.shape == (n,)
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logit)), atol=1e-6)
    meta = pay.get_modelmeta().custom_metadata_map
    assert json.loads(meta["fedscore.feature_names"]) == PAYMENT_COLUMNS


def test_export_leaves_training_mode_alone(parts: dict, tmp_path) -> None:
    model = parts["model_p"].train()
    export_payment_part(model, parts["scaler_p"], tmp_path / "p.onnx")
    assert model.training
    model.eval()


def test_mismatched_scaler_is_refused(parts: dict, tmp_path) -> None:
    short = Scaler.fit(LENDER_COLUMNS[:-1], parts["raw_l"][:, :-1], [])
    with pytest.raises(ValueError, match="do not belong together"):
        export_lender_part(parts["model_l"], short, tmp_path / "l.onnx")
    with pytest.raises(ValueError, match="do not belong together"):
        export_payment_part(parts["model_p"], short, tmp_path / "p.onnx")
    with pytest.raises(ValueError, match="embedding_dim=0"):
        export_lender_part(LenderTop(len(LENDER_COLUMNS), 0, [4]), parts["scaler_l"], tmp_path / "l.onnx")


def _schema_scaler() -> Scaler:
    from fedscore.shared.data.schema import ColumnSchema, DataSchema

    return Scaler.from_schema(DataSchema(columns=[
        ColumnSchema(name="age", type="integer", lower=18, upper=100),
        ColumnSchema(name="income_band", type="category", levels=[1, 2, 3, 4, 5, 6], transform="onehot"),
        ColumnSchema(name="existing_debt", type="numeric", lower=0, upper=50_000, transform="log"),
        ColumnSchema(name="bureau_score", type="integer", lower=300, upper=850),
        ColumnSchema(name="requested_amount", type="numeric", lower=0, upper=10_000, transform="log"),
        ColumnSchema(name="tenure_months", type="integer", lower=0, upper=60, transform="log"),
    ]))


def test_schema_scaler_constants_come_from_the_bounds_only() -> None:
    scaler = _schema_scaler()
    assert scaler.mean[0] == 59.0 and scaler.std[0] == 41.0  # midpoint and half-range of [18, 100]
    assert math.isclose(scaler.mean[2], math.log1p(50_000) / 2) and math.isclose(scaler.std[2], math.log1p(50_000) / 2)
    assert scaler.levels == {"income_band": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    inside = np.array([[18, 1, 0, 300, 0, 0], [100, 6, 50_000, 850, 10_000, 60]], dtype=np.float64)
    scaled = scaler.transform(inside)[:, :6]
    assert np.allclose(scaled, [[-1] * 6, [1] * 6])  # the bounds land on -1 and +1


def test_clipping_is_inside_the_graph(parts: dict, tmp_path) -> None:
    """Values beyond the declared bounds are clipped by the ONNX graph exactly as by the numpy scaler."""
    scaler = _schema_scaler()
    model = _jitter(LenderTop(len(scaler.output_names), DIM, [8]), 3)
    export_lender_part(model, scaler, tmp_path / LENDER_FILE)
    raw = parts["raw_l"].copy()
    assert (raw[:, 2] > 50_000).any() and (raw[:, 4] > 10_000).any()  # the fixture does go out of bounds
    raw[:5, 0] = [-5, 0, 17, 101, 1e9]
    emb = np.zeros((len(raw), DIM), dtype=np.float32)
    session = ort.InferenceSession(str(tmp_path / LENDER_FILE), providers=["CPUExecutionProvider"])
    onnx_p = session.run(["probability"], {LENDER_INPUT: raw, EMBEDDING: emb})[0]
    with torch.no_grad():
        torch_p = model.probability(torch.from_numpy(scaler.transform(raw)), torch.from_numpy(emb)).numpy()
    np.testing.assert_allclose(onnx_p, torch_p, atol=1e-5)
    clipped = raw.copy()
    clipped[:5, 0] = [18, 18, 18, 100, 100]
    np.testing.assert_allclose(session.run(["probability"], {LENDER_INPUT: clipped, EMBEDDING: emb[:len(raw)]})[0][:5],
                               onnx_p[:5], atol=1e-7)


# ---------------------------------------------------------------------------------------------------- manifest


def test_manifest_records_hashes_and_round_trips(parts: dict, bundle) -> None:
    out, manifest = bundle
    loaded = load_manifest(out)
    assert loaded == manifest
    assert loaded.parts["payment"].sha256 == sha256_file(out / PAYMENT_FILE)
    assert loaded.parts["lender"].sha256 == sha256_file(out / LENDER_FILE)
    assert loaded.parts["payment"].feature_names == PAYMENT_COLUMNS
    assert loaded.parts["lender"].inputs == [LENDER_INPUT, EMBEDDING]
    assert loaded.parts["lender"].input_dtypes == {LENDER_INPUT: "float32", EMBEDDING: "float32"}
    assert loaded.parts["lender"].input_shapes[LENDER_INPUT] == ["batch", len(LENDER_COLUMNS)]
    assert loaded.parts["lender"].outputs == ["probability", "logit"]
    assert loaded.embedding_dim == DIM and loaded.lender_reference == [40.0, 3.0, 5000.0, 690.0, 6000.0, 24.0]
    # evaluation figures and training-embedding means have no place in a bundle
    assert not {"metrics", "embedding_baseline"} & set(json.loads((out / MANIFEST_NAME).read_text()))
    assert loaded.scorecard == ScorecardParams()


def test_load_manifest_detects_tampering(bundle, tmp_path) -> None:
    out, _ = bundle
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    for name in (PAYMENT_FILE, LENDER_FILE, MANIFEST_NAME):
        (copy_dir / name).write_bytes((out / name).read_bytes())
    load_manifest(copy_dir)
    data = bytearray((copy_dir / LENDER_FILE).read_bytes())
    data[-1] ^= 0x01
    (copy_dir / LENDER_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{LENDER_FILE}.*sha256 mismatch"):
        load_manifest(copy_dir)
    (copy_dir / LENDER_FILE).unlink()
    with pytest.raises(ValueError, match=rf"{LENDER_FILE}.*missing"):
        load_manifest(copy_dir)


def test_manifest_rejects_paths_and_missing_parts(bundle, tmp_path) -> None:
    _, manifest = bundle
    data = manifest.model_dump(mode="json")
    data["parts"]["payment"]["file"] = "../payment_part.onnx"
    with pytest.raises(ValueError, match="plain file name"):
        ModelManifest.model_validate(data)
    data = manifest.model_dump(mode="json")
    del data["parts"]["lender"]
    with pytest.raises(ValueError, match="parts must be exactly"):
        ModelManifest.model_validate(data)
    write_manifest(tmp_path, manifest)
    assert not [p for p in tmp_path.iterdir() if p.name != MANIFEST_NAME]  # no temp file left behind
    with pytest.raises(ValueError, match="missing"):
        load_manifest(tmp_path)  # manifest alone: parts absent


# --------------------------------------------------------------------------------------------------- scorecard


def test_points_scaling() -> None:
    assert points(np.array([1 / 51]))[0] == 600  # odds 50:1 -> base points
    assert points(np.array([1 / 26]))[0] == 580  # odds halved -> minus PDO
    assert points(np.array([1 / 101]))[0] == 620
    odds = np.exp(np.linspace(-2, 8, 200))
    drop = points(1 / (1 + odds)) - points(1 / (1 + odds / 2))
    assert np.all(np.abs(drop - 20) <= 1)
    assert np.all(np.diff(points(np.linspace(0.001, 0.999, 500))) <= 0)  # riskier -> fewer points
    extreme = points(np.array([0.0, 1.0]))  # clipped to 1e-6: finite, 600 + 20 * log2(odds / 50)
    assert extreme.dtype == np.int64
    assert extreme.tolist() == [round(600 + 20 * math.log2((1 - 1e-6) / 1e-6 / 50)),
                                round(600 + 20 * math.log2(1e-6 / (1 - 1e-6) / 50))]
    custom = ScorecardParams(base_points=500, base_odds=20, pdo=50)
    assert points(np.array([1 / 21, 1 / 41]), custom).tolist() == [500, 550]


def test_tiers_are_monotone() -> None:
    params = ScorecardParams()
    rank = {name: i for i, name in enumerate(params.tier_names)}
    scores = np.arange(300, 901)
    ranks = np.array([rank[t] for t in tier(scores)])
    assert np.all(np.diff(ranks) <= 0)  # more points never gives a worse tier
    assert tier(np.array([620, 619, 590, 589, 560, 540, 539])).tolist() == ["A", "B", "B", "C", "C", "D", "E"]
    # the default cut-offs are the documented PD bands
    assert tier(points(np.array([0.0099, 0.0101, 0.027, 0.073, 0.08, 0.137, 0.15]))).tolist() == [
        "A", "B", "B", "C", "D", "D", "E"]
    with pytest.raises(ValueError, match="strictly decreasing"):
        ScorecardParams(tiers=[("A", 600), ("B", 640)])


def test_limit_policy() -> None:
    limit, review = credit_limit(np.array(["A", "A", "A", "E", "C"]), np.array(["mid"] * 5),
                                 np.array(["stable"] * 5), np.array([False, True, False, False, False]),
                                 blacklisted=np.array([False, False, True, False, False]))
    assert limit.tolist() == [50_000, 25_000, 0, 0, 15_000]
    assert review.tolist() == [False, True, True, True, False]
    by_spend, _ = credit_limit("B", np.array(["low", "mid", "high"]), "stable", False)
    assert by_spend[0] < by_spend[1] < by_spend[2]
    stable, _ = credit_limit("B", "mid", np.array(["stable", "unstable"]), False)
    assert stable[1] < stable[0]
    assert np.all(by_spend % 100 == 0)
    with pytest.raises(ValueError, match="unknown tier"):
        credit_limit(np.array(["Z"]), np.array(["mid"]), np.array(["stable"]), np.array([False]))


def test_decisions_chain() -> None:
    frame = decisions(np.array([0.004, 0.3]), np.array(["high", "low"]), np.array(["stable", "unstable"]),
                      np.array([False, False]))
    assert frame["tier"].tolist() == ["A", "E"]
    assert frame["limit"].tolist() == [65_000, 0] and frame["review"].tolist() == [False, True]


def test_coarse_payment_signals() -> None:
    rules = CoarseSignalRules()
    assert set(rules.columns[1:]) <= set(FEATURE_NAMES)  # the real payment feature names
    features = pd.DataFrame({
        "id": ["a", "b", "c", "d"],
        "log_total_spend": np.log1p([2_000.0, 10_000.0, 50_000.0, 0.0]),
        "monthly_spend_cv": [0.3, 1.5, 0.5, 0.0],
        "recent_30d_spend_ratio": [1.0, 4.0, 0.5, 0.0],
        "night_share": [0.1, 0.2, 0.3, 0.0],  # extra columns are ignored
    })
    out = coarse_payment_signals(features)
    assert list(out.columns) == ["id", "spend_level", "stability", "recent_spend_anomaly"]
    assert out["spend_level"].tolist() == ["low", "mid", "high", "low"]
    assert out["stability"].tolist() == ["stable", "unstable", "stable", "unstable"]  # no spend is not stable
    assert out["recent_spend_anomaly"].tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match="monthly_spend_cv"):
        coarse_payment_signals(features.drop(columns="monthly_spend_cv"))
    renamed = features.rename(columns={"log_total_spend": "spend_log"})
    assert coarse_payment_signals(renamed, CoarseSignalRules(spend_column="spend_log")).equals(out)


# ------------------------------------------------------------------------------------------------ reason codes


def test_reason_codes_ranking() -> None:
    codes = reason_codes(np.array([[0.1, -2.0, 0.5, 0.0], [-1.0, -1.0, -1.0, -1.0]]), ["a", "b", "c", "d"], top_k=3)
    assert codes == [["c", "a"], []]  # only factors that pushed risk up, worst first


def _reference_rows(scaler: Scaler, n: int, rng: np.random.Generator, noise: float = 0.05) -> np.ndarray:
    """Raw rows at the scaler's centre, with small noise in scaled units: the rows the tests declare as reference."""
    logged = np.asarray(scaler.mean) + noise * np.asarray(scaler.std) * rng.standard_normal((n, len(scaler.mean)))
    for j, column in enumerate(scaler.columns):
        if column in scaler.log_columns:
            logged[:, j] = np.sign(logged[:, j]) * np.expm1(np.abs(logged[:, j]))
    return logged


def _shift(scaler: Scaler, raw: np.ndarray, j: int, k_std: float) -> np.ndarray:
    """Move column j by k_std standard deviations in the scaler's (possibly logged) space."""
    out = raw.copy()
    column = scaler.columns[j]
    value = out[:, j]
    logged = np.sign(value) * np.log1p(np.abs(value)) if column in scaler.log_columns else value
    logged = logged + k_std * scaler.std[j]
    out[:, j] = np.sign(logged) * np.expm1(np.abs(logged)) if column in scaler.log_columns else logged
    return out


def _logit(model: LenderTop, scaler: Scaler, raw: np.ndarray, emb: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(scaler.transform(raw)), torch.from_numpy(emb.astype(np.float32))).numpy()


def _scorer(run_dir: Path, model_l: LenderTop, scaler_l: Scaler, reference: np.ndarray) -> LenderScorer:
    """The production reason codes (occlusion on the exported lender part) for this lender model, with `reference`
    declared as the lender reference; the payment part only has to fit the embedding width."""
    scaler_p = Scaler.fit(PAYMENT_COLUMNS, _raw_payment(200, np.random.default_rng(0)), [])
    model_p = PaymentBottom(len(PAYMENT_COLUMNS), [], model_l.embedding_dim)
    _export_run(run_dir, model_p, scaler_p, model_l, scaler_l, [float(v) for v in reference])
    return LenderScorer(load_scoring_bundle(run_dir / "model"))


def _reasons(scorer: LenderScorer, features: np.ndarray, embedding: np.ndarray) -> list[list[str]]:
    _, values, direction = scorer.contributions(features, embedding)
    sets, index = scorer.reasons(values, direction, np.ones(len(features), dtype=bool))
    return [sets[i] for i in index]


def test_reason_codes_name_the_feature_made_worse(parts: dict, tmp_path: Path) -> None:
    model, scaler = parts["model_l"].eval(), parts["scaler_l"]
    base = _reference_rows(scaler, 1, np.random.default_rng(5), noise=0.0)
    scorer = _scorer(tmp_path, model, scaler, base[0])
    assert scorer.factor_names == [*LENDER_COLUMNS, PAYMENT_FACTOR]
    emb = np.zeros((1, DIM))
    base_logit = _logit(model, scaler, base, emb)[0]
    tested = []
    for j, column in enumerate(scaler.columns):
        # the risky direction of a ReLU net need not be monotone: take the shift that raises the logit most
        shifts = [_shift(scaler, base, j, k) for k in (-3.0, -2.0, -1.0, 1.0, 2.0, 3.0)]
        rise = [_logit(model, scaler, row, emb)[0] - base_logit for row in shifts]
        if max(rise) < 0.1:
            continue  # this feature barely moves this random net near the reference
        worse = shifts[int(np.argmax(rise))]
        _, values, _ = scorer.contributions(worse, emb)
        assert reason_codes(values, scorer.factor_names)[0][0] == column
        # only this feature differs from the declared reference: occlusion gives it the whole distance from the
        # reference, and every other factor exactly nothing
        np.testing.assert_allclose(values.sum(axis=1), _logit(model, scaler, worse, emb) - base_logit, atol=0.01)
        assert np.count_nonzero(values) == 1
        tested.append(column)
    assert len(tested) >= 4, tested


def test_embedding_is_one_coarse_factor(parts: dict, tmp_path: Path) -> None:
    model, scaler = parts["model_l"].eval(), parts["scaler_l"]
    base = _reference_rows(scaler, 2, np.random.default_rng(6))
    scorer = _scorer(tmp_path, model, scaler, _reference_rows(scaler, 1, np.random.default_rng(6), noise=0.0)[0])
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(DIM, generator=gen).numpy()
    emb = np.stack([4 * direction, -4 * direction])
    probability, values, _ = scorer.contributions(base, emb)
    assert values.shape == (2, len(LENDER_COLUMNS) + 1)
    assert scorer.factor_names.count(PAYMENT_FACTOR) == 1 and len(scorer.factor_names) == len(LENDER_COLUMNS) + 1
    riskier = int(np.argmax(probability))
    reasons = _reasons(scorer, base, emb)
    assert reasons[riskier][0] == "payment_behaviour: payment activity pattern associated with higher risk"
    assert all(not r.startswith(("emb", "embedding")) for row in reasons for r in row)
    # deterministic: the same call gives bit-identical contributions
    assert np.array_equal(values, scorer.contributions(base, emb)[1])


def test_reason_text_follows_the_direction(tmp_path: Path) -> None:
    columns = ["bureau_score", "existing_debt", "mystery"]
    rng = np.random.default_rng(8)
    raw = np.column_stack([rng.normal(690, 60, 500), np.exp(8 + rng.standard_normal(500)), rng.normal(0, 1, 500)])
    scaler = Scaler.fit(columns, raw, [])
    model = LenderTop(3, 2, [])  # logistic: known signs
    with torch.no_grad():
        model.net[0].weight.copy_(torch.tensor([[-1.0, 0.8, 0.5, 0.1, 0.1]]))
        model.net[0].bias.zero_()
    base = _reference_rows(scaler, 3, rng, noise=0.0)
    scorer = _scorer(tmp_path, model, scaler, base[0])
    base[0, 0] -= 2 * scaler.std[0]  # low bureau score
    base[1, 1] += 2 * scaler.std[1]  # high debt
    base[2, 2] += 2 * scaler.std[2]  # unknown feature, higher
    reasons = _reasons(scorer, base, np.zeros((3, 2)))
    assert reasons == [["bureau_score: lower than typical applicants"],
                       ["existing_debt: existing debt higher than typical applicants"],
                       ["mystery: higher than typical applicants"]]
    assert math.isclose(ScorecardParams().factor, 20 / math.log(2))
