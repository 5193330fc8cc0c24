"""Privacy inside the protocol: reports that recompute, parties that refuse, randomized response that flips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedscore.budgets import default_budgets
from fedscore.clients.state_store import read_state
from fedscore.runs import run_inprocess
from fedscore.shared.config import load_config
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy import recompute_from_report
from fedscore.shared.privacy.ledger import ledger_entries
from fedscore.shared.run_folder import RunError
from tests.conftest import SECRET, fresh_homes

PRIVATE = ["training.rounds=3", "training.local_epochs=2", "training.batch_size=64", "training.lr=0.005",
           "baselines.enabled=false", "privacy.dpsgd_batch_size=256", "privacy.dpsgd_lr=0.02",
           "privacy.feature_epsilon=8"]


@pytest.fixture(scope="module")
def private_run(party_data: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    data, _ = party_data
    root = tmp_path_factory.mktemp("private")
    run_dir = root / "run"
    run_inprocess(load_config(None, PRIVATE), data, run_dir, secret=SECRET, homes=fresh_homes(root))
    return run_dir


@pytest.mark.slow
def test_every_reported_epsilon_recomputes_from_the_report(private_run: Path) -> None:
    report = json.loads((private_run / "privacy-report.json").read_text())
    keys = {f"{g['protects']}@{g['against']}" for g in report["guarantees"]}
    assert keys == {"lender.labels@payment", "lender.labels@outsider", "joint.records@outsider",
                    "payment.features@lender"}
    recomputed = recompute_from_report(report)
    for guarantee, eps in zip(report["guarantees"], recomputed, strict=True):
        assert guarantee["epsilon"] >= eps - 1e-9, guarantee["protects"]
        assert guarantee["epsilon"] - eps <= max(0.02, 0.01 * eps), guarantee["protects"]
        assert guarantee["epsilon"] <= min(guarantee["budget"].values()) + 1e-9
        assert guarantee["delta"] == report["delta"] < 1e-5
        assert guarantee["status"] == "holds" and guarantee["run_epsilon"] == pytest.approx(guarantee["epsilon"])
    assert report["void"] is None
    by_key = {f"{g['protects']}@{g['against']}": g for g in report["guarantees"]}
    labels = by_key["lender.labels@payment"]
    # randomized response, then computed from it: the lender's DP-SGD in each of its 3 rounds and its gradients
    assert labels["mechanisms"][0]["kind"] == "randomized_response" and labels["mechanisms"][0]["epsilon"] == 2.0
    assert [m["sampling"] for m in labels["mechanisms"][1:]].count("poisson") == 3
    assert labels["composition"] == "rr_mixture" and labels["epsilon"] < 2.0 and labels["attack_ceiling"]
    features = by_key["payment.features@lender"]
    # the partial logits: 3 rounds, of which round 0's is the constant 0 of a head that starts at zero (released
    # without noise or charge), so 2 charged releases, no amplification between parties; the payment model the lender
    # sees through them: its DP standardisation statistics (once) and its statistics fit in the 2 rounds it received
    # gradients in (privacy.payment_fit, the default for this linear part): the Gram matrix once, a moment vector
    # each time; none of it subsampled
    assert sorted(m["sampling"] for m in features["mechanisms"]) == ["none"] * 6
    assert sum(m["noise_multiplier"] == 4.0 for m in features["mechanisms"]) == 3
    assert features["neighbouring"] == "replace_one"
    assert features["epsilon"] == pytest.approx(8.0, abs=0.05)
    joint = by_key["joint.records@outsider"]
    # each party charges the steps it took (the lender 3 rounds, the payment holder 2) and its scaler statistics
    assert joint["held_by"] == ["lender", "payment"]
    assert sorted(r["party"] for r in joint["per_release"]) == ["lender"] * 4 + ["payment"] * 3
    assert joint["epsilon"] <= 3.0 * 1.0001
    # all that is unprotected: the lender's own scoring part (model.lender_part = "gbdt", the default), named
    assert [u["against"] for u in report["unprotected"]] == ["whoever holds the lender part"]
    covered = {r["covered_by"] for items in report["releases"].values() for r in items}
    assert {"lender.labels@payment", "payment.features@lender", "joint.records@outsider"} <= covered
    assert any(c.startswith("unprotected") for c in covered) and any(c.startswith("public") for c in covered)


@pytest.mark.slow
def test_randomized_response_flips_at_the_configured_rate(private_run: Path) -> None:
    state = read_state(private_run / "parties" / "lender" / "state.pt")
    train = state["split"] == 0
    clean = state["y"][state["rows"]][train]
    released = state["y_release"][train]
    flipped = (clean != released).double().mean().item()
    expected = 1 / (1 + math.exp(2.0))
    assert abs(flipped - expected) < 4 * math.sqrt(expected * (1 - expected) / len(clean))
    untouched = ~train
    assert torch.equal(state["y_release"][untouched], state["y"][state["rows"]][untouched])


@pytest.mark.slow
def test_report_html_has_the_plots(private_run: Path) -> None:
    page = (private_run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "joint.records" in page and "lender.labels" in page


@pytest.mark.slow
def test_lender_refuses_a_label_release_over_its_own_budget(party_data: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = party_data
    config = load_config(None, PRIVATE)
    budgets = default_budgets(config)
    budgets["lender"]["lender.labels@payment"] = 1.0  # the server asks for eps 2
    with pytest.raises(RunError, match=r"lender.*lender\.labels@payment.*budget 1"):
        run_inprocess(config, data, tmp_path / "run", secret=SECRET, budgets=budgets)
    report = json.loads((tmp_path / "run" / "privacy-report.json").read_text())
    assert report["refusal"]["party"] == "lender" and report["refusal"]["request"] == "align.match"
    # the refused release never happened: nothing recorded for the labels (only the setup's scaler statistics)
    assert not [g for g in report["guarantees"] if g["protects"] == "lender.labels"]
    assert {g["protects"] for g in report["guarantees"]} <= {"joint.records", "payment.features"}


@pytest.mark.slow
def test_payment_stops_mid_run_and_what_was_released_is_still_counted(party_data: tuple[Path, dict],
                                                                       tmp_path: Path) -> None:
    data, _ = party_data
    config = load_config(None, PRIVATE)
    budgets = default_budgets(config)
    budgets["payment"]["payment.features@lender"] = 6.0  # enough for 1-2 of the 3 planned embedding releases
    homes = {"payment": tmp_path / "payment-home", "lender": tmp_path / "lender-home"}
    with pytest.raises(RunError, match=r"payment.*payment\.features@lender"):
        run_inprocess(config, data, tmp_path / "run", secret=SECRET, budgets=budgets, homes=homes)
    report = json.loads((tmp_path / "run" / "privacy-report.json").read_text())
    assert report["refusal"]["party"] == "payment" and report["refusal"]["request"] == "embed"
    features = next(g for g in report["guarantees"] if g["protects"] == "payment.features")
    assert 1 <= len([r for r in features["per_release"] if "embeddings to the lender" in r["note"]]) < 3
    assert features["epsilon"] <= 6.0
    entries = ledger_entries(tmp_path / "payment-home" / PartyHome.LEDGER, "payment")
    assert len([e for e in entries if e["guarantee"] == "payment.features@lender"]) == \
        len(features["per_release"])


def test_a_party_with_a_budget_refuses_an_unprotected_run(party_data: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = party_data
    config = load_config(None, [*PRIVATE, "privacy.enabled=false"])
    with pytest.raises(RunError, match=r"lender refused.*unprotected"):
        run_inprocess(config, data, tmp_path / "run", secret=SECRET,
                      budgets={"payment": {}, "lender": {"lender.labels@payment": 2.0}})


@pytest.mark.slow
def test_online_answers_are_charged_per_user_worst_case_and_refused_past_the_budget(private_run: Path) -> None:
    import numpy as np

    from fedscore.clients.payment.release_guard import LedgerGuard
    from fedscore.clients.payment.served import load_served
    from fedscore.clients.payment.service import ReleaseRefused
    from fedscore.shared.model.manifest import load_manifest

    config = load_config(None, PRIVATE)
    home = private_run.parent / "homes" / "payment"  # the payment party's home: its export recorded what it serves
    ledger_file = home / PartyHome.LEDGER
    sigma = float(read_state(private_run / "parties" / "payment" / "state.pt")["feature_sigma"])
    sha = load_manifest(private_run / "model").parts["payment"].sha256
    before = len(ledger_entries(ledger_file, "payment"))
    report = json.loads((private_run / "privacy-report.json").read_text())
    spent = next(g["epsilon"] for g in report["guarantees"] if g["protects"] == "payment.features")
    budget = {"payment.features@lender": spent + 2.0, "joint.records@outsider": 3.0}  # room for one more
    guard = LedgerGuard(home, load_served(home, sha), budget, ahead=0)  # charged exactly at each raise
    assert guard.sigma == sigma > 0

    guard.before_release("u1")  # the worst case goes from 0 to 1 online release: charged
    guard.before_release("u2")  # another user's first answer: the worst case is unchanged, nothing charged
    entries = ledger_entries(ledger_file, "payment")
    assert len(entries) == before + 1 and "online" in entries[-1]["note"]
    with pytest.raises(ReleaseRefused, match=r"payment\.features@lender"):
        for _ in range(50):
            guard.before_release("u1")
    assert ledger_entries(ledger_file, "payment")[-1]["epsilon_after"] <= spent + 2.0

    clean = np.full(8, 0.05, dtype=np.float32)
    draws = np.stack([guard.noise(clean) for _ in range(4000)])
    assert draws.std() == pytest.approx(guard.sigma * config.privacy.embedding_clip, rel=0.05)
    guard.close()


@pytest.mark.slow
def test_the_payment_part_is_fitted_from_charged_statistics_and_the_lender_takes_the_rest(private_run: Path) -> None:
    """The default linear payment part learns by the statistics fit (privacy.payment_fit): the Gram matrix once and a
    moment vector per exchange, charged to joint.records@outsider; the lender's DP-SGD is calibrated to the rest of
    the outsider target, so the composed total meets it rather than sitting far below."""
    report = json.loads((private_run / "privacy-report.json").read_text())
    joint = next(g for g in report["guarantees"] if g["protects"] == "joint.records")
    payment = [r["note"] for r in joint["per_release"] if r["party"] == "payment"]
    # 3 rounds: gradients reach the payment holder in rounds 1 and 2 (and the scaler statistics at setup)
    assert sum("Gram matrix" in n for n in payment) == 1 and sum("statistics fit" in n for n in payment) == 2
    assert not any("DP-SGD" in n for n in payment)
    assert 2.9 <= joint["epsilon"] <= 3.0 * 1.0001 + 3e-4
    state = read_state(private_run / "parties" / "payment" / "state.pt")
    assert "dpsgd" not in state and state["statistics_fit"]["noise_multiplier"] == 4.0
    assert state["gram"].shape[0] == state["x"].shape[1] + 1
    weights = state["model"]  # the fit's map collapsed into row 0 of the linear layer
    assert bool((weights["net.0.weight"][1:] == 0).all()) and bool(weights["net.0.weight"][0].abs().sum() > 0)
