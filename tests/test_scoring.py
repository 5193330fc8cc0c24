"""Scoring with the exported bundle: batch (onnxruntime only), the standalone script, and the two online services.

Two tiny trained runs are built once per module: one on a ready payment feature table (conftest's data), one on
synthesized transactions (featurised by the payment party, so the manifest carries the feature definition and the
coarse payment signals exist).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from fedscore.clients.lender.scoring import NO_PAYMENT_REASON, LenderScorer
from fedscore.clients.lender.service import LenderThread, create_app
from fedscore.clients.payment.data import load_payment_table
from fedscore.clients.payment.release_guard import (
    GUARANTEE,
    GuardRefused,
    LedgerGuard,
    check_not_replayable,
    release_counts,
)
from fedscore.clients.payment.scoring import load_payment_users
from fedscore.clients.payment.served import ServedError, ServedVersion, load_served
from fedscore.clients.payment.service import NOT_SERVED, PaymentScoringService, ReleaseRefused, build_payment_server
from fedscore.proto import fedscore_scoring_pb2 as pb2
from fedscore.proto import fedscore_scoring_pb2_grpc as pb2_grpc
from fedscore.runs import run_inprocess
from fedscore.scoring import SCORE_COLUMNS, score_batch, write_scores
from fedscore.shared.config import FedConfig, load_config
from fedscore.shared.data.tables import DataError
from fedscore.shared.model.export_onnx import (
    EMBEDDING,
    LENDER_INPUT,
    LOGIT,
    PAYMENT_FILE,
    load_manifest,
    sha256_file,
    torch_score,
    write_manifest,
)
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy import account, embedding_release
from fedscore.shared.privacy.ledger import ledger_entries
from fedscore.shared.scoring.bundle import BundleError, load_scoring_bundle, ort_session
from fedscore.shared.scoring.scorecard import (
    PAYMENT_FACTOR,
    CoarseSignalRules,
    coarse_payment_signals,
    credit_limit,
    points,
    reason_codes,
    reason_text,
    tier,
)
from fedscore.shared.tls import (
    LocalPki,
    TlsError,
    make_local_pki,
    mutual_tls_channel_credentials,
    mutual_tls_server_credentials,
)
from fedscore.synth import synthesize
from fedscore.torch_parts import load_torch_parts
from tests.conftest import FAST, SECRET, make_party_data

ROOT = Path(__file__).resolve().parents[1]
# scoring does not care how the model was trained: the fastest training that still exports a bundle. The lender's
# intercept must converge within it (lr 0.02: at FAST's 0.005 it moved ~0.45 of the ~2.9 it needs), else the payment
# holder's partial logit carries the intercept, is negative for everyone and is never an adverse reason
# the torch top as the scoring part (model.lender_part="top"): these tests compare the export with torch and the
# linear reason-code shortcut with occlusion; the default GBDT part is scored in tests/test_lender_gbdt.py
QUICK = [*FAST, "training.lr=0.02", "baselines.enabled=false", "model.lender_part=top",
         *(["privacy.enabled=false"] if "privacy" in FedConfig.model_fields else [])]


def _train(data: Path, run: Path) -> Path:
    run_inprocess(load_config(None, QUICK), data, run, secret=SECRET)
    return run


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scoring-features")
    make_party_data(root / "data", population=3000)
    return root / "data", _train(root / "data", root / "run")


@pytest.fixture(scope="module")
def tx_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("scoring-tx")
    synthesize(users=3000, seed=0, out=root / "data")
    return root / "data", _train(root / "data", root / "run")


@pytest.fixture(scope="module")
def tx_scores(tx_run: tuple[Path, Path]) -> pd.DataFrame:
    data, run = tx_run
    return score_batch(run / "model", data)


@pytest.fixture(params=["feature_run", "tx_run"])
def any_run(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------------------------------------ bundle and batch


def test_manifest_hashes_match_the_files(any_run: tuple[Path, Path]) -> None:
    _, run = any_run
    manifest = json.loads((run / "model" / "manifest.json").read_text())
    for part in manifest["parts"].values():
        assert sha256_file(run / "model" / part["file"]) == part["sha256"]
    assert load_scoring_bundle(run / "model").manifest.parts["lender"].sha256 == manifest["parts"]["lender"]["sha256"]


def test_the_payment_holder_loads_its_own_part_without_the_lenders(any_run: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    """The lender's part is the lender's own (with model.lender_part = "gbdt" it is fitted on clean labels): the
    payment holder's copy of model/ need not hold it, and `serve payment` checks only its own part."""
    _, run = any_run
    copy = tmp_path / "payment-copy"
    copy.mkdir()
    for name in ("manifest.json", PAYMENT_FILE):
        shutil.copy2(run / "model" / name, copy / name)
    assert load_scoring_bundle(copy, parties=("payment",)).part_sha256("payment")
    with pytest.raises(BundleError, match=r"lender_part\.onnx"):
        load_scoring_bundle(copy)


def test_onnx_scores_match_torch_on_the_test_split(any_run: tuple[Path, Path]) -> None:
    data, run = any_run
    parts = load_torch_parts(run)
    model_p, scaler_p, model_l, scaler_l, test_ids = (parts.model_p, parts.scaler_p, parts.model_l, parts.scaler_l,
                                                      parts.test_ids)
    assert len(test_ids) > 50
    scores = score_batch(run / "model", data).set_index("id")
    payment = load_payment_table(data / "payment")
    p_rows = pd.Index(payment.ids).get_indexer(test_ids)
    assert (p_rows >= 0).all()  # test users are aligned users: both parties have them
    applicants = pd.read_parquet(data / "lender" / "applicants.parquet").set_index("id").loc[test_ids]
    raw_p = payment.values[p_rows][:, [payment.columns.index(c) for c in scaler_p.columns]]
    raw_l = applicants[scaler_l.columns].to_numpy(dtype=np.float64)
    expected = torch_score(model_p, scaler_p, model_l, scaler_l, raw_p, raw_l)
    got = scores.loc[test_ids, "probability"].to_numpy()
    assert np.max(np.abs(got - expected)) < 1e-5


def test_score_columns_follow_the_scorecard(tx_run: tuple[Path, Path], tx_scores: pd.DataFrame) -> None:
    data, run = tx_run
    params = load_manifest(run / "model").scorecard
    frame = tx_scores
    assert list(frame.columns) == SCORE_COLUMNS
    assert len(frame) == len(pd.read_parquet(data / "lender" / "applicants.parquet"))
    np.testing.assert_array_equal(frame["score"], points(frame["probability"], params))
    np.testing.assert_array_equal(frame["tier"], tier(frame["score"], params))
    payment = load_payment_table(data / "payment")
    features = pd.DataFrame(payment.values, columns=payment.columns).assign(id=payment.ids)
    signals = coarse_payment_signals(features, CoarseSignalRules()).set_index("id")
    known = frame["id"].isin(signals.index).to_numpy()
    assert 0 < known.sum() < len(frame)  # both kinds of applicant are exercised
    own = signals.reindex(frame["id"])
    spend = np.where(known, own["spend_level"].astype(object), "mid")
    stability = np.where(known, own["stability"].astype(object), "stable")
    anomaly = np.where(known, own["recent_spend_anomaly"].fillna(False).astype(bool), False)
    limit, review = credit_limit(frame["tier"].to_numpy(), spend, stability, anomaly, params=params)
    np.testing.assert_array_equal(frame["credit_limit"], limit)
    np.testing.assert_array_equal(frame["review_flag"], review | ~known)
    no_history = frame["reasons"].str.startswith(NO_PAYMENT_REASON).to_numpy()
    np.testing.assert_array_equal(no_history, ~known)
    assert len(set(spend[known])) > 1  # the limits really depend on the payment signals


def test_reasons_name_lender_features_and_the_embedding_only(tx_run: tuple[Path, Path],
                                                             tx_scores: pd.DataFrame) -> None:
    _, run = tx_run
    bundle = load_scoring_bundle(run / "model")
    allowed = {*bundle.lender_features, PAYMENT_FACTOR}
    for text in tx_scores["reasons"]:
        parts = [p for p in text.split("; ") if p and p != NO_PAYMENT_REASON]
        assert len(parts) <= 3
        assert {p.split(":")[0] for p in parts} <= allowed
    assert tx_scores["reasons"].str.contains(PAYMENT_FACTOR).any()
    assert not any(name in " ".join(tx_scores["reasons"]) for name in bundle.payment_features)


def test_occlusion_is_logit_minus_logit_with_the_factor_at_its_reference(tx_run: tuple[Path, Path]) -> None:
    data, run = tx_run
    bundle = load_scoring_bundle(run / "model")
    users = load_payment_users(bundle, data)
    scorer = LenderScorer(bundle)
    rng = np.random.default_rng(0)
    x = np.tile(bundle.lender_reference(), (5, 1)) * rng.uniform(0.5, 1.5, size=(5, len(bundle.lender_features)))
    x[0, 1] = bundle.lender_reference()[1]  # equal to the reference: contributes exactly nothing
    e = users.embeddings[:5]
    _, values, direction = scorer.contributions(x, e)
    session = ort_session(bundle.part_path("lender"))

    def logit(features: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        return session.run([LOGIT], {LENDER_INPUT: features.astype(np.float32),
                                     EMBEDDING: embedding.astype(np.float32)})[0].astype(np.float64)

    base = logit(x, e)
    for j in range(x.shape[1]):
        occluded = x.copy()
        occluded[:, j] = bundle.lender_reference()[j]
        np.testing.assert_allclose(values[:, j], base - logit(occluded, e), atol=1e-5)
    np.testing.assert_allclose(values[:, -1], base - logit(x, np.tile(bundle.embedding_baseline(), (5, 1))),
                               atol=1e-5)
    assert values[0, 1] == 0.0 and direction[0, 1] == 0
    np.testing.assert_array_equal(direction[:, -1], 0)


def test_batch_scores_by_the_linear_shortcut_equal_those_by_occlusion(tx_run: tuple[Path, Path],
                                                                      tx_scores: pd.DataFrame) -> None:
    """The default lender top is linear and says so: the batch takes the shortcut (tests/test_linear_reasons.py
    has the arithmetic) and writes what occlusion on the graph writes."""
    data, run = tx_run
    occluded = score_batch(run / "model", data, reasons="occlusion")
    assert (tx_scores.attrs["reasons_by"], occluded.attrs["reasons_by"]) == ("linear", "occlusion")
    np.testing.assert_allclose(tx_scores["probability"], occluded["probability"], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(tx_scores.drop(columns="probability"), occluded.drop(columns="probability"))
    assert tx_scores["reasons"].nunique() > 5


def test_grouped_reasons_equal_reason_codes_row_by_row(tx_run: tuple[Path, Path]) -> None:
    _, run = tx_run
    scorer = LenderScorer(load_scoring_bundle(run / "model"))
    rng = np.random.default_rng(1)
    n, factors = 3000, len(scorer.factor_names)
    values = np.round(rng.normal(size=(n, factors)), 1)  # rounding makes ties and exact zeros common
    direction = rng.integers(-1, 2, size=(n, factors)).astype(np.int8)
    has_payment = rng.random(n) < 0.7
    sets, index = scorer.reasons(values, direction, has_payment)
    expected = []
    for i, codes in enumerate(reason_codes(values, scorer.factor_names, 3)):
        texts = [reason_text(c, int(direction[i, scorer.factor_names.index(c)])) for c in codes]
        expected.append(texts if has_payment[i] else [NO_PAYMENT_REASON, *texts])
    assert [sets[i] for i in index] == expected


def test_blacklist_declines_and_flags(tx_run: tuple[Path, Path], tx_scores: pd.DataFrame) -> None:
    data, run = tx_run
    flagged = set(tx_scores.loc[tx_scores["credit_limit"] > 0, "id"].iloc[:3])
    scores = score_batch(run / "model", data, blacklist=flagged).set_index("id")
    assert (scores.loc[sorted(flagged), "credit_limit"] == 0).all()
    assert scores.loc[sorted(flagged), "review_flag"].all()
    others = scores.drop(index=sorted(flagged))
    pd.testing.assert_frame_equal(others, tx_scores.set_index("id").drop(index=sorted(flagged)))


def test_standalone_script_reproduces_batch_probabilities(any_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = any_run
    payment = load_payment_table(data / "payment")
    pd.DataFrame(payment.values, columns=payment.columns).assign(id=payment.ids).to_csv(tmp_path / "p.csv",
                                                                                        index=False)
    pd.read_parquet(data / "lender" / "applicants.parquet").to_csv(tmp_path / "l.csv", index=False)
    out = tmp_path / "probabilities.csv"
    argv = ["--model", str(run / "model"), "--payment", str(tmp_path / "p.csv"), "--lender", str(tmp_path / "l.csv"),
            "--out", str(out)]
    # run it as a script and prove it imports neither fedscore's packages nor torch nor pandas
    probe = ("import runpy, sys; sys.argv = ['score_standalone.py', *sys.argv[1:]]; "
             f"runpy.run_path({str(ROOT / 'scripts' / 'score_standalone.py')!r}, run_name='__main__'); "
             "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'pandas', 'fedscore', 'shared', "
             "'clients'}); assert not bad, bad")
    subprocess.run([sys.executable, "-c", probe, *argv], check=True, cwd=tmp_path, timeout=60)
    got = pd.read_csv(out, dtype={"id": str})
    expected = score_batch(run / "model", data)
    assert got["id"].tolist() == expected["id"].tolist()
    assert np.max(np.abs(got["probability"].to_numpy() - expected["probability"].to_numpy())) < 1e-6


# ------------------------------------------------------------------------------------------------- input errors


def test_changed_feature_definition_is_refused(tx_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = tx_run
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    manifest = load_manifest(model)
    definition = dict(manifest.payment_feature_definition or {})
    definition["large_amount"] = 123.0
    write_manifest(model, manifest.model_copy(update={"payment_feature_definition": definition}))
    with pytest.raises(BundleError, match=r"feature definition changed since training.*large_amount"):
        score_batch(model, data)


def test_bad_bundles_and_bad_data_are_named(feature_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = feature_run
    with pytest.raises(BundleError, match="run folder"):
        score_batch(run, data)
    model = tmp_path / "model"
    shutil.copytree(run / "model", model)
    with open(model / "lender_part.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match=r"lender_part\.onnx: sha256 mismatch"):
        score_batch(model, data)
    with pytest.raises(DataError, match="data folder not found"):
        score_batch(run / "model", tmp_path / "nowhere")

    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    applicants = pd.read_parquet(data / "lender" / "applicants.parquet")
    (broken / "lender" / "applicants.parquet").unlink()
    applicants.drop(columns=["income_band"]).to_csv(broken / "lender" / "applicants.csv", index=False)
    with pytest.raises(DataError, match=r"applicants\.csv: missing column\(s\) income_band"):
        score_batch(run / "model", broken)
    bad = applicants.astype({"age": object})
    bad.loc[bad.index[3], "age"] = "forty"
    bad.to_csv(broken / "lender" / "applicants.csv", index=False)
    with pytest.raises(DataError, match=r"applicants\.csv: column age: non-numeric value 'forty'"):
        score_batch(run / "model", broken)
    payment = pd.read_parquet(data / "payment" / "features.parquet")
    payment.drop(columns=["regularity"]).to_parquet(broken / "payment" / "features.parquet", index=False)
    applicants.to_csv(broken / "lender" / "applicants.csv", index=False)
    with pytest.raises(DataError, match=r"features\.parquet: missing column\(s\) regularity"):
        score_batch(run / "model", broken)


def test_score_command_writes_all_or_nothing(feature_run: tuple[Path, Path], tmp_path: Path) -> None:
    from fedscore.cli_scoring import score_command

    data, run = feature_run
    app = typer.Typer()
    app.command()(score_command)
    out = tmp_path / "scores.csv"
    failed = CliRunner().invoke(app, ["--model", str(run), "--data", str(data), "--out", str(out)])
    assert failed.exit_code == 2 and "run folder" in failed.output
    assert not out.exists() and not list(tmp_path.iterdir())
    done = CliRunner().invoke(app, ["--model", str(run / "model"), "--data", str(data), "--out", str(out)])
    assert done.exit_code == 0, done.output
    written = pd.read_csv(out, dtype={"id": str}, keep_default_na=False)
    expected = score_batch(run / "model", data)
    assert written["id"].tolist() == expected["id"].tolist()
    assert written["reasons"].tolist() == expected["reasons"].tolist()
    write_scores(expected.iloc[:5], out)  # replaces atomically, no temporary file left behind
    assert len(pd.read_csv(out)) == 5 and sorted(p.name for p in tmp_path.iterdir()) == ["scores.csv"]


# ------------------------------------------------------------------------------------------- online services


def write_served(home: Path, model: Path, ids: list[str], sigma: float | None = None, *, clip: float = 1.0,
                 replayable: bool = False) -> ServedVersion:
    """What the payment party's export writes into its home (the contract), then loaded as the service will."""
    sha = load_scoring_bundle(model).part_sha256("payment")
    (home / "served").mkdir(parents=True, exist_ok=True)
    (home / "served" / f"{sha}.ids").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
    (home / "served" / f"{sha}.json").write_text(json.dumps(
        {"feature_sigma": sigma, "embedding_clip": clip, "feature_neighbouring": "add_remove", "delta": 1e-6,
         "replayable_noise": replayable}))
    return load_served(home, sha)


def intersection(data: Path) -> list[str]:
    applicants = pd.read_parquet(data / "lender" / "applicants.parquet")["id"].astype(str)
    return sorted(set(load_payment_table(data / "payment").ids) & set(applicants))


class Refuse:
    """A guard that refuses one user and counts the releases it allowed."""

    def __init__(self, refused: str) -> None:
        self.refused, self.released = refused, []

    def before_release(self, user_id: str) -> None:
        if user_id == self.refused:
            raise ReleaseRefused("privacy budget for this user is spent")
        self.released.append(user_id)

    def noise(self, embedding: np.ndarray) -> np.ndarray:
        return embedding


@pytest.fixture(scope="module")
def payment_users(tx_run: tuple[Path, Path]):
    data, run = tx_run
    return load_payment_users(load_scoring_bundle(run / "model"), data)


@pytest.fixture(scope="module")
def payment_service(tx_run: tuple[Path, Path], payment_users,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PaymentScoringService, int]]:
    """Trained without feature protection, served with --allow-unprotected and --disclose-signals: answers equal
    the batch scorer's."""
    data, run = tx_run
    home = tmp_path_factory.mktemp("payment-home")
    served = write_served(home, run / "model", intersection(data))
    guard = LedgerGuard(home, served, {}, allow_unprotected=True)
    service = PaymentScoringService(payment_users, served, guard, disclose_signals=True)
    server, port = build_payment_server(service, port=0)
    yield service, port
    server.stop(0)
    guard.close()


def _call(port: int, user_id: str, credentials: grpc.ChannelCredentials | None = None) -> pb2.EmbeddingReply:
    target = f"127.0.0.1:{port}"
    with (grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)) as channel:
        # a generous deadline: a charged answer runs the accountant, seconds of CPU on a loaded 2-core machine
        # (5 s timed out under `make test -n 2`); a refusal or a down server still answers at once
        return pb2_grpc.PaymentScoringStub(channel).GetEmbedding(pb2.EmbeddingRequest(user_id=user_id), timeout=60)


def _refusal(port: int, user_id: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _call(port, user_id, credentials)
    return caught.value


def test_payment_grpc_answers_and_status_codes(payment_service: tuple[PaymentScoringService, int],
                                               tx_run: tuple[Path, Path]) -> None:
    service, port = payment_service
    served = intersection(tx_run[0])
    user = served[7]
    row = service.users.row(user)
    reply = _call(port, user)
    np.testing.assert_array_equal(np.asarray(reply.embedding, dtype=np.float32), service.users.embeddings[row])
    assert reply.spend_level in ("low", "mid", "high") and reply.stability in ("stable", "unstable")
    unknown = _refusal(port, "nobody")
    assert (unknown.code(), unknown.details()) == NOT_SERVED
    assert _refusal(port, "").code() == grpc.StatusCode.INVALID_ARGUMENT
    guard, service.guard = service.guard, Refuse(refused=served[0])
    try:
        refused = _refusal(port, served[0])
        _call(port, user)
        released = service.guard.released
    finally:
        service.guard = guard
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "privacy budget for this user is spent" in refused.details()
    assert released == [user]


def test_ids_outside_the_intersection_and_unknown_ids_get_identical_answers(
        payment_service: tuple[PaymentScoringService, int], tx_run: tuple[Path, Path]) -> None:
    service, port = payment_service
    served = set(intersection(tx_run[0]))
    customers = [u for u in service.users.ids if u not in served][:5]
    strangers = ["nobody", "u9999999", customers[0] + "x", " " + customers[1], "\u00e9"]
    assert len(customers) == 5 and not set(strangers) & set(service.users.ids)

    def answer(user_id: str) -> tuple:
        error = _refusal(port, user_id)
        return error.code(), error.details().encode(), tuple(error.trailing_metadata() or ()), \
            tuple(error.initial_metadata() or ())

    answers = {answer(u) for u in [*customers, *strangers]}
    assert answers == {(NOT_SERVED[0], NOT_SERVED[1].encode(), (), ())}
    # the decision is taken from the served IDs alone: the customer tables are not even consulted
    users, service.users = service.users, None
    try:
        assert answer(customers[0]) == answer(strangers[0]) == next(iter(answers))
    finally:
        service.users = users


@pytest.fixture
def pki(tmp_path: Path) -> tuple[LocalPki, LocalPki]:
    return make_local_pki(tmp_path / "pki"), make_local_pki(tmp_path / "other")


def test_mutual_tls_refuses_clients_without_a_valid_certificate(
        payment_service: tuple[PaymentScoringService, int], pki: tuple[LocalPki, LocalPki],
        tx_run: tuple[Path, Path]) -> None:
    service, _ = payment_service
    ours, other = pki
    assert oct(ours.server_key.stat().st_mode & 0o777) == "0o600"
    credentials = mutual_tls_server_credentials(ours.server_cert, ours.server_key, ours.ca)
    server, port = build_payment_server(service, host="127.0.0.1", port=0, credentials=credentials)
    user = intersection(tx_run[0])[3]
    try:
        lender_cert, lender_key = ours.clients["lender"]
        good = mutual_tls_channel_credentials(ours.ca, lender_cert, lender_key)
        assert len(_call(port, user, good).embedding) == service.users.embeddings.shape[1]
        no_cert = mutual_tls_channel_credentials(ours.ca)
        foreign = mutual_tls_channel_credentials(ours.ca, *other.clients["lender"])
        for bad in (no_cert, foreign, None):
            assert _refusal(port, user, bad).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


def test_tls_material_errors_name_the_file(pki: tuple[LocalPki, LocalPki], tmp_path: Path) -> None:
    ours, other = pki
    with pytest.raises(TlsError, match=r"nope\.pem: cannot read"):
        mutual_tls_server_credentials(tmp_path / "nope.pem", ours.server_key, ours.ca)
    with pytest.raises(TlsError, match=r"other/server\.key: this private key does not belong"):
        mutual_tls_server_credentials(ours.server_cert, other.server_key, ours.ca)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match=r"junk\.pem: not a PEM client CA"):
        mutual_tls_server_credentials(ours.server_cert, ours.server_key, tmp_path / "junk.pem")
    with pytest.raises(TlsError, match="already exists"):
        make_local_pki(tmp_path / "pki")
    with pytest.raises(ValueError, match="refusing plaintext"):
        build_payment_server(None, host="0.0.0.0", port=0)  # type: ignore[arg-type]


def _serve(args: list[str]):
    from fedscore.cli_scoring import serve_app

    app = typer.Typer()
    app.add_typer(serve_app, name="serve")
    return CliRunner().invoke(app, ["serve", *args])


def test_serve_payment_refuses_to_start_without_tls_or_a_served_record(tx_run: tuple[Path, Path],
                                                                       pki: tuple[LocalPki, LocalPki],
                                                                       tmp_path: Path) -> None:
    data, run = tx_run
    ours, _ = pki
    base = ["payment", "--model", str(run / "model"), "--data", str(data), "--party-home", str(tmp_path / "home")]
    plain = _serve(base)
    assert plain.exit_code == 2 and "refusing to serve without TLS" in plain.output
    assert "--tls-cert" in plain.output and "--insecure-local" in plain.output
    wide = _serve([*base, "--insecure-local", "--host", "0.0.0.0"])
    assert wide.exit_code == 2 and "loopback only" in wide.output
    half = _serve([*base, "--tls-cert", str(ours.server_cert)])
    assert half.exit_code == 2 and "--tls-key, --client-ca" in half.output
    missing = _serve([*base, "--tls-cert", str(tmp_path / "gone.pem"), "--tls-key", str(ours.server_key),
                      "--client-ca", str(ours.ca)])
    assert missing.exit_code == 2 and "gone.pem" in missing.output
    unrecorded = _serve([*base, "--insecure-local"])
    assert unrecorded.exit_code == 2 and "no intersection recorded for this model version" in unrecorded.output
    assert str(tmp_path / "home") in unrecorded.output and "--party-home" in unrecorded.output
    lender = _serve(["lender", "--model", str(run / "model"), "--data", str(data), "--payment-address",
                     "10.0.0.1:50061", "--insecure-payment"])
    assert lender.exit_code == 2 and "loopback addresses only" in lender.output
    lender = _serve(["lender", "--model", str(run / "model"), "--data", str(data), "--payment-address",
                     "127.0.0.1:50061"])
    assert lender.exit_code == 2 and "--payment-ca, --client-cert, --client-key" in lender.output


@pytest.mark.slow
def test_serve_payment_cli_serves_over_mutual_tls_and_records_disclosures(tx_run: tuple[Path, Path],
                                                                           pki: tuple[LocalPki, LocalPki],
                                                                           tmp_path: Path) -> None:
    import os
    import socket
    import time

    data, run = tx_run
    ours, _ = pki
    home = tmp_path / "home"
    ids = intersection(data)
    write_served(home, run / "model", ids)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "fedscore.cli_scoring", "serve", "payment", "--model", str(run / "model"),
            "--data", str(data), "--party-home", str(home), "--port", str(port), "--tls-cert", str(ours.server_cert),
            "--tls-key", str(ours.server_key), "--client-ca", str(ours.ca), "--allow-unprotected",
            "--disclose-signals"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDSCORE_HOME": str(tmp_path / "fedscore-home")}
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    good = mutual_tls_channel_credentials(ours.ca, *ours.clients["lender"])
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                reply = _call(port, ids[0], good)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "serve payment did not answer within 60 s"
                time.sleep(0.2)
        assert reply.spend_level and reply.stability  # disclosed
        assert _refusal(port, ids[0]).code() == grpc.StatusCode.UNAVAILABLE  # plaintext client
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0].decode()
    assert "WITHOUT noise" in output and "unprotected: coarse spend signals" in output
    disclosed = json.loads((home / "disclosures.json").read_text())["unprotected"]
    assert sorted(d["protects"] for d in disclosed) == ["payment.features", "payment.signals"]
    assert all(d["against"] == "lender" and d["since"] for d in disclosed)
    assert list(release_counts(home).values()) == [{ids[0]: 1}]


def test_guard_refuses_void_unprotected_or_unbudgeted_versions(tx_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = tx_run
    ids = intersection(data)[:10]
    unprotected = write_served(tmp_path / "a", run / "model", ids)
    with pytest.raises(GuardRefused, match="--allow-unprotected"):
        LedgerGuard(tmp_path / "a", unprotected, {})
    with pytest.raises(GuardRefused, match="holds a budget"):
        LedgerGuard(tmp_path / "a", unprotected, {GUARANTEE: 3.0}, allow_unprotected=True)
    guard = LedgerGuard(tmp_path / "a", unprotected, {}, allow_unprotected=True)
    with pytest.raises(GuardRefused, match="another payment service"):
        LedgerGuard(tmp_path / "a", unprotected, {}, allow_unprotected=True)
    guard.close()
    disclosed = json.loads((tmp_path / "a" / "disclosures.json").read_text())["unprotected"]
    assert [d["protects"] for d in disclosed] == ["payment.features"]
    protected = write_served(tmp_path / "b", run / "model", ids, sigma=0.8)
    with pytest.raises(GuardRefused, match=r"no budget for payment\.features@lender"):
        LedgerGuard(tmp_path / "b", protected, {})
    void = write_served(tmp_path / "c", run / "model", ids, sigma=0.8, replayable=True)
    with pytest.raises(GuardRefused, match="VOID"):
        check_not_replayable(void, {})
    with pytest.raises(GuardRefused, match="VOID"):
        check_not_replayable(protected, {"privacy": {"replayable_noise": True}})
    check_not_replayable(protected, load_manifest(run / "model").training_config)
    sha = protected.sha256
    (tmp_path / "b" / "served" / f"{sha}.json").write_text('{"feature_sigma": -1}')
    with pytest.raises(ServedError, match=rf"{sha}\.json: invalid"):
        load_served(tmp_path / "b", sha)


def test_protected_answers_are_charged_noised_afresh_and_refused_past_the_budget(
        tx_run: tuple[Path, Path], payment_users, tmp_path: Path) -> None:
    data, run = tx_run
    ids = intersection(data)
    sigma, clip = 0.8, 1.0
    record = embedding_release(sigma, clip, 1, "add_remove")
    budget = account([record] * 2, 1e-6)[0] * 1.001  # room for a worst case of two online releases
    services, servers, ports = [], [], []
    for name in ("a", "b"):
        served = write_served(tmp_path / name, run / "model", ids, sigma=sigma, clip=clip)
        services.append(PaymentScoringService(payment_users, served,
                                              LedgerGuard(tmp_path / name, served, {GUARANTEE: budget}, ahead=0)))
        server, port = build_payment_server(services[-1], port=0)
        servers.append(server)
        ports.append(port)
    try:
        a, b = ports
        first = np.asarray(_call(a, ids[0]).embedding)
        _call(a, ids[1])
        again = np.asarray(_call(a, ids[0]).embedding)
        refused = _refusal(a, ids[0])  # a third release would raise the worst case past the budget
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and GUARANTEE in refused.details()
        entries = ledger_entries(tmp_path / "a" / PartyHome.LEDGER, "payment")
        assert len(entries) == 2 and {e["guarantee"] for e in entries} == {GUARANTEE}
        assert entries[-1]["epsilon_after"] == pytest.approx(account([record] * 2, 1e-6)[0])
        assert release_counts(tmp_path / "a") == {services[0].payment_part_sha256: {ids[0]: 2, ids[1]: 1}}

        other = np.asarray(_call(b, ids[0]).embedding)
        clean = services[0].users.embeddings[services[0].users.row(ids[0])]
        assert len({first.tobytes(), again.tobytes(), other.tobytes(), clean.tobytes()}) == 4
        reply = _call(b, ids[2])
        assert (reply.spend_level, reply.stability, reply.recent_spend_anomaly) == ("", "", False)  # withheld
        draws = np.stack([services[1].guard.noise(np.zeros(8, dtype=np.float32)) for _ in range(500)])
        assert draws.std() == pytest.approx(sigma * clip, rel=0.1)
    finally:
        for server, service in zip(servers, services, strict=True):
            server.stop(0)
            service.guard.close()


def test_withheld_signals_are_scored_as_neutral(tx_run: tuple[Path, Path]) -> None:
    from fedscore.clients.lender.service import PaymentClient

    _, run = tx_run
    bundle = load_scoring_bundle(run / "model")
    client = PaymentClient("127.0.0.1:1", bundle, 1.0)
    try:
        answer = client._check(pb2.EmbeddingReply(embedding=[0.0] * bundle.embedding_dim,
                                                  payment_part_sha256=bundle.part_sha256("payment")))
    finally:
        client.close()
    assert (answer.signals.spend_level.tolist(), answer.signals.stability.tolist(),
            answer.signals.recent_spend_anomaly.tolist()) == (["mid"], ["stable"], [False])


API_TOKEN = "test-token-" + "x" * 16
AUTH = {"authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture(scope="module")
def lender_url(tx_run: tuple[Path, Path], payment_service: tuple[PaymentScoringService, int]) -> Iterator[str]:
    data, run = tx_run
    _, port = payment_service
    lender = LenderThread(create_app(run / "model", data, f"127.0.0.1:{port}", timeout_s=2.0,
                                     api_token=API_TOKEN)).start()
    yield lender.url
    lender.stop()


def test_online_scores_equal_batch_scores(lender_url: str, tx_scores: pd.DataFrame) -> None:
    frame = tx_scores.set_index("id")
    no_history = frame.index[frame["reasons"].str.startswith(NO_PAYMENT_REASON)][:10].tolist()
    sample = [*frame.index[:40].tolist(), *no_history]
    assert no_history
    with httpx.Client(base_url=lender_url, timeout=10, headers=AUTH) as client:
        assert client.get("/health").json()["payment_service"] == "ready"
        for applicant in sample:
            response = client.post("/score", json={"id": applicant})
            assert response.status_code == 200, response.text
            got, want = response.json(), frame.loc[applicant]
            assert abs(got["probability"] - want["probability"]) < 1e-6
            assert (got["score"], got["tier"], got["credit_limit"], got["review_flag"]) == \
                (want["score"], want["tier"], want["credit_limit"], want["review_flag"])
            assert "; ".join(got["reasons"]) == want["reasons"]


def test_callers_without_the_bearer_token_are_refused_and_logged(lender_url: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with httpx.Client(base_url=lender_url, timeout=10) as client, caplog.at_level("WARNING"):
        for headers in ({}, {"authorization": "Bearer wrong-token-xxxxxxxxxx"}, {"authorization": API_TOKEN}):
            refused = client.post("/score", json={"id": "anyone"}, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", headers
        assert client.get("/health").status_code == 401
        assert client.post("/score", json={"id": "no-such-applicant"}, headers=AUTH).status_code == 404
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) >= 4 and any("no bearer token" in m for m in refusals)


def test_online_request_errors(lender_url: str) -> None:
    with httpx.Client(base_url=lender_url, timeout=10, headers=AUTH) as client:
        missing = client.post("/score", json={"id": "no-such-applicant"})
        assert missing.status_code == 404 and "no-such-applicant" in missing.json()["detail"]
        for body in ({"id": 5}, {"id": ""}, {"ident": "x"}, {"id": "x", "extra": 1}):
            assert client.post("/score", json=body).status_code == 422, body
        garbled = client.post("/score", content=b"{not json", headers={"content-type": "application/json"})
        assert garbled.status_code == 422 and garbled.json()["detail"]


def test_lender_over_mutual_tls_and_503_when_payment_refuses_or_is_down(
        tx_run: tuple[Path, Path], payment_users, pki: tuple[LocalPki, LocalPki], tmp_path: Path) -> None:
    data, run = tx_run
    ours, _ = pki
    known = intersection(data)
    served = write_served(tmp_path / "home", run / "model", known)
    service = PaymentScoringService(payment_users, served, Refuse(refused=known[0]), disclose_signals=True)
    credentials = mutual_tls_server_credentials(ours.server_cert, ours.server_key, ours.ca)
    server, port = build_payment_server(service, port=0, credentials=credentials)
    channel = mutual_tls_channel_credentials(ours.ca, *ours.clients["lender"])
    lender = LenderThread(create_app(run / "model", data, f"127.0.0.1:{port}", timeout_s=1.0,
                                     credentials=channel, api_token=API_TOKEN)).start()
    try:
        with httpx.Client(base_url=lender.url, timeout=10, headers=AUTH) as client:
            refused = client.post("/score", json={"id": known[0]})
            assert refused.status_code == 503 and "privacy budget for this user is spent" in refused.json()["detail"]
            assert client.post("/score", json={"id": known[1]}).status_code == 200
            server.stop(0).wait()
            down = client.post("/score", json={"id": known[1]})
            assert down.status_code == 503
            assert down.json()["detail"].startswith("payment service unavailable:")
            assert client.post("/score", json={"id": "no-such-applicant"}).status_code == 404
    finally:
        lender.stop()
        server.stop(0)
