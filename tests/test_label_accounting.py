"""lender.labels@payment: randomized response with what is computed from its output, composed as an RR mixture.

The exact cases the mixture must reproduce: randomized response followed by randomized response is randomized
response with the product flip rate; randomized response in front of a Gaussian is checked against direct numerical
integration of the hockey-stick divergence; a non-DP downstream leaves randomized response's own epsilon; the attack
ceiling of pure randomized response is its known accuracy e^eps/(1+e^eps), and of a Gaussian Phi(mu/sqrt 2).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from scipy.stats import norm

from fedscore.runs import run_inprocess
from fedscore.shared.config import load_config
from fedscore.shared.party_home import PartyHome
from fedscore.shared.privacy import (
    DpSgdRelease,
    GaussianRelease,
    Ledger,
    RandomizedResponse,
    label_gradient_release,
    recompute_from_report,
)
from fedscore.shared.privacy.accounting import (
    _pld_from_pair,
    account,
    account_guarantee,
    attack_ceiling,
    entries_epsilon,
    entries_pld,
)
from fedscore.shared.privacy.ledger import BudgetExceeded, ledger_entries
from fedscore.shared.privacy.mechanisms import flip_probability
from tests.conftest import SECRET, fresh_homes

DELTA = 1e-6
DRAW = "randomized-response:test"
LABELS = "lender.labels@payment"


def _rr(epsilon: float, **kw: str) -> dict:
    return {"kind": "randomized_response", "epsilon": epsilon, **kw}


def _gauss(sigma: float, count: int = 1) -> dict:
    return {"kind": "gaussian", "noise_multiplier": sigma, "sensitivity": 1.0, "count": count, "sampling": "none",
            "sample_rate": 1.0, "computed_from": DRAW}


def _mixed(epsilon: float, downstream: list[dict]) -> float:
    return entries_epsilon([_rr(epsilon, draw=DRAW), *downstream], "replace_one", DELTA)


@pytest.mark.parametrize(("eps1", "eps2"), [(2.0, 1.5), (1.0, 3.0), (3.0, 3.0)])
def test_rr_then_rr_is_the_product_randomized_response(eps1: float, eps2: float) -> None:
    q1, q2 = flip_probability(eps1), flip_probability(eps2)
    q = q1 * (1 - q2) + q2 * (1 - q1)
    exact = math.log((1 - q) / q)
    got = _mixed(eps1, [_rr(eps2, computed_from=DRAW)])
    assert exact - 1e-9 <= got <= exact + 1e-3  # pessimistic, within the PLD's discretisation
    assert got < min(eps1, eps2)


def _exact_mixture_epsilon(epsilon: float, mu: float, delta: float) -> float:
    """RR(eps) in front of a Gaussian with shift mu, by direct integration on a fine grid: the pair
    P = (1-q) N(mu, 1) + q N(0, 1), Q = q N(mu, 1) + (1-q) N(0, 1), delta(e) = integral max(0, P - e^e Q)."""
    q = flip_probability(epsilon)
    x = np.linspace(-14.0, 14.0 + mu, 400_001)
    dx = x[1] - x[0]
    p = (1 - q) * norm.pdf(x, mu) + q * norm.pdf(x)
    r = q * norm.pdf(x, mu) + (1 - q) * norm.pdf(x)

    def hockey(e: float) -> float:
        return float(np.sum(np.maximum(0.0, p - math.exp(e) * r)) * dx)

    lo, hi = 0.0, epsilon
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hockey(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize(("sigma", "count"), [(3.0, 1), (3.0, 3), (1.0, 2)])
def test_rr_in_front_of_a_gaussian_matches_direct_integration(sigma: float, count: int) -> None:
    exact = _exact_mixture_epsilon(2.0, math.sqrt(count) / sigma, DELTA)
    got = _mixed(2.0, [_gauss(sigma, count)])
    assert exact - 1e-6 <= got <= exact + 2e-3
    assert got < 2.0


def test_a_non_dp_downstream_leaves_randomized_response_exactly() -> None:
    alone = entries_epsilon([_rr(2.0)], "replace_one", DELTA)
    assert _mixed(2.0, [_gauss(0.0, 3)]) == alone
    assert _mixed(2.0, [_gauss(3.0, 2), _gauss(0.0, 1)]) == alone
    assert alone == pytest.approx(2.0, abs=1e-4)


def test_more_exchanges_cost_more_and_never_more_than_randomized_response() -> None:
    rr_alone = entries_epsilon([_rr(2.0)], "replace_one", DELTA)
    epsilons = [_mixed(2.0, [_gauss(3.0)] * count) for count in range(1, 7)]
    assert all(a < b for a, b in itertools.pairwise(epsilons)), epsilons
    assert all(e <= rr_alone for e in epsilons)
    # one record with count k and k records of count 1 are the same composition
    assert _mixed(2.0, [_gauss(3.0, 4)]) == pytest.approx(epsilons[3], abs=1e-9)


def test_an_unnamed_draw_composes_plainly_and_a_named_one_costs_only_what_was_computed_from_it() -> None:
    plain = entries_epsilon([_rr(2.0), {**_gauss(3.0), "computed_from": ""}], "replace_one", DELTA)
    assert plain > 2.0  # RR then an independent Gaussian on the clean labels: composition, no mixture
    # a release naming another draw is no post-processing of this one: plain composition with the mixture (0 here)
    assert entries_epsilon([_rr(2.0, draw=DRAW), {**_gauss(3.0), "computed_from": "another draw"}],
                           "replace_one", DELTA) == pytest.approx(
        entries_epsilon([{**_gauss(3.0), "computed_from": ""}], "replace_one", DELTA), abs=1e-3)
    # the randomized labels never leave: with nothing computed from them yet, nothing is spent
    assert entries_epsilon([_rr(2.0, draw=DRAW)], "replace_one", DELTA) == 0.0
    assert entries_epsilon([_rr(2.0)], "replace_one", DELTA) == pytest.approx(2.0, abs=1e-4)


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 3.0])
def test_attack_ceiling_of_pure_randomized_response_is_its_accuracy(epsilon: float) -> None:
    ceiling = attack_ceiling(entries_pld([_rr(epsilon)], "replace_one"))
    known = math.exp(epsilon) / (1 + math.exp(epsilon))
    assert ceiling["balanced_accuracy"] == pytest.approx(known, abs=1e-6)
    assert ceiling["auc"] == pytest.approx(known, abs=1e-3)  # the LR test's ROC through (q, 1 - q)


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_attack_ceiling_of_a_gaussian_is_phi_mu_over_root_two(sigma: float) -> None:
    mu = 1 / sigma
    ceiling = attack_ceiling(entries_pld([{**_gauss(sigma), "computed_from": ""}], "replace_one"))
    assert ceiling["auc"] == pytest.approx(norm.cdf(mu / math.sqrt(2)), abs=2e-3)
    assert ceiling["balanced_accuracy"] == pytest.approx(norm.cdf(mu / 2), abs=2e-3)


def test_mixture_lowers_the_ceiling_below_randomized_response() -> None:
    rr = attack_ceiling(entries_pld([_rr(2.0)], "replace_one"))
    mixed = attack_ceiling(entries_pld([_rr(2.0, draw=DRAW), _gauss(3.0, 3)], "replace_one"))
    assert mixed["auc"] < rr["auc"] and mixed["balanced_accuracy"] < rr["balanced_accuracy"]
    assert attack_ceiling(None) == {"auc": 1.0, "balanced_accuracy": 1.0}


def test_numpy_rounding_is_dp_accountings_from_two_probability_mass_functions() -> None:
    rng = np.random.default_rng(0)
    upper, lower = rng.dirichlet(np.ones(50)), rng.dirichlet(np.ones(50))
    upper[3], lower[7] = upper[3] + lower[3], 0.0  # an atom only the upper has: infinity mass
    lower[3] = 0.0
    upper, lower = upper / upper.sum(), lower / lower.sum()
    with np.errstate(divide="ignore"):
        theirs = pld_lib.from_two_probability_mass_functions(dict(enumerate(np.log(lower))),
                                                             dict(enumerate(np.log(upper))))
    ours = _pld_from_pair(upper, lower, 1e-4)
    for eps in (0.0, 0.3, 1.0, 2.5):
        assert ours.get_delta_for_epsilon(eps) == pytest.approx(theirs.get_delta_for_epsilon(eps), rel=1e-9)


def _label_records(sigma: float, exchanges: int) -> list:
    rr = RandomizedResponse(epsilon=2.0, protects="lender.labels", seen_by="outsider", draw=DRAW)
    steps = DpSgdRelease(noise_multiplier=3.0, sample_rate=0.2, steps=5, protects="lender.labels",
                         seen_by="payment", sampling_hidden=True, neighbouring="replace_one", computed_from=DRAW)
    return [rr, steps, *[label_gradient_release(sigma, 1.0, 1, DRAW) for _ in range(exchanges)]]


def test_records_the_lender_charges_compose_as_a_mixture_and_recompute_from_the_report() -> None:
    records = _label_records(3.0, 3)
    guarantee = account_guarantee("lender.labels", "payment", records, DELTA)
    assert guarantee.composition == "rr_mixture" and guarantee.accountant == "dp_accounting.pld"
    assert 0 < guarantee.epsilon < 2.0
    assert 0.5 < guarantee.attack_ceiling["auc"] < math.exp(2) / (1 + math.exp(2))
    report = json.loads(json.dumps({"delta": DELTA, "guarantees": [guarantee.to_dict()]}))
    assert recompute_from_report(report) == [pytest.approx(guarantee.epsilon, abs=1e-12)]
    report["guarantees"][0]["composition"] = "plain"
    with pytest.raises(ValueError, match="composition"):
        recompute_from_report(report)


def test_dp_sgd_seen_by_a_party_needs_hidden_sampling_and_gaussians_still_refuse_poisson() -> None:
    with pytest.raises(ValueError, match="sampling_hidden"):
        DpSgdRelease(noise_multiplier=1.0, sample_rate=0.1, steps=3, protects="lender.labels", seen_by="payment",
                     neighbouring="replace_one")
    with pytest.raises(ValueError, match="Poisson"):
        GaussianRelease(noise_multiplier=1.0, sensitivity=1.0, clip=1.0, count=1, protects="lender.labels",
                        seen_by="payment", sampling="poisson", sample_rate=0.1)


def test_the_ledger_allows_and_refuses_on_the_tight_figure(tmp_path: Path) -> None:
    records = _label_records(3.0, 3)
    tight = account(records, DELTA)[0]
    ledger = Ledger(tmp_path / "ledger.json", {LABELS: tight + 1e-6}, DELTA, party="lender")
    for record in records:  # charged one by one, as the lender does
        ledger.charge([record], LABELS)
    assert ledger.epsilon(LABELS) == pytest.approx(tight)
    strict = Ledger(tmp_path / "strict.json", {LABELS: tight - 0.05}, DELTA, party="lender")
    with pytest.raises(BudgetExceeded):
        for record in records:
            strict.charge([record], LABELS)


# -- in the protocol -------------------------------------------------------------------------------------------

LABEL_RUN = ["training.rounds=3", "training.local_epochs=1", "training.batch_size=64", "baselines.enabled=false",
             "privacy.dpsgd_batch_size=256", "privacy.dpsgd_local_epochs=1", "audit.record_transcripts=true"]


@pytest.mark.slow
def test_the_lender_charges_rr_dp_sgd_and_every_exchange(party_data: tuple[Path, dict], tmp_path: Path) -> None:
    data, _ = party_data
    run_dir = tmp_path / "run"
    config = load_config(None, LABEL_RUN)
    homes = fresh_homes(tmp_path)
    run_inprocess(config, data, run_dir, secret=SECRET, homes=homes)
    entries = ledger_entries(homes["lender"] / PartyHome.LEDGER, "lender")
    records = [m for e in entries if e["guarantee"] == LABELS for m in e["mechanisms"]]
    kinds = [m["kind"] for m in records]
    rounds = config.training.rounds
    assert kinds.count("randomized_response") == 1 and kinds[0] == "randomized_response"
    assert kinds.count("dp_sgd") == rounds  # the lender trains in every round
    exchanges = [m for m in records if m["kind"] == "gaussian"]
    received = {int(r) for r in np.load(run_dir / "transcripts" / "payment_view.npz")["round"]}
    # one record per exchange the lender sent (the last round's too, while it still computes one)
    assert len(received) <= len(exchanges) <= rounds and len(exchanges) >= rounds - 1
    assert all(m["noise_multiplier"] == config.privacy.gradient_noise_multiplier and m["sensitivity"] == 1.0
               for m in exchanges)
    draw = records[0]["draw"]
    assert draw and all(m["computed_from"] == draw for m in records[1:])
    report = json.loads((run_dir / "privacy-report.json").read_text())
    (labels,) = [g for g in report["guarantees"] if f"{g['protects']}@{g['against']}" == LABELS]
    assert labels["composition"] == "rr_mixture"
    assert 0 < labels["epsilon"] < config.privacy.label_epsilon
    assert 0.5 < labels["attack_ceiling"]["auc"] < 1 and 0.5 < labels["attack_ceiling"]["balanced_accuracy"] < 1
    recomputed = recompute_from_report(report)
    assert recomputed[report["guarantees"].index(labels)] == pytest.approx(labels["epsilon"], abs=1e-9)


def test_a_plan_over_budget_is_refused_before_anything_is_recorded(tmp_path: Path) -> None:
    records = _label_records(3.0, 3)
    tight = account(records, DELTA)[0]
    ledger = Ledger(tmp_path / "ledger.json", {LABELS: tight - 0.05}, DELTA, party="lender")
    with pytest.raises(BudgetExceeded):
        ledger.check(records, LABELS)
    assert ledger.entries == []
    assert Ledger(tmp_path / "other.json", {LABELS: tight + 1e-6}, DELTA, party="lender").check(
        records, LABELS) == pytest.approx(tight)


@pytest.mark.slow
def test_a_noisier_lender_top_leaves_the_rest_of_the_outsider_budget_to_the_payment_part() -> None:
    """`privacy.lender_dpsgd_noise_multiplier`: the lender's plan takes that noise, the payment part is calibrated so
    both parts' steps and both scalers still compose to the outsider target, and less noise than a shared split."""
    from fedscore.shared.config import load_config
    from fedscore.shared.privacy.accounting import epsilon_for
    from fedscore.shared.privacy.dp_sgd import dp_sgd_rounds, part_release, plan_dp_sgd, scaler_releases

    shared = load_config(None, ["privacy.payment_fit=dp_sgd"]).privacy  # both parts by DP-SGD
    split = load_config(None, ["privacy.lender_dpsgd_noise_multiplier=10", "privacy.payment_fit=dp_sgd"]).privacy
    lender, payment = plan_dp_sgd(split, 20000, 4, "lender"), plan_dp_sgd(split, 20000, 4, "payment")
    assert lender.noise_multiplier == 10.0
    assert payment.noise_multiplier < plan_dp_sgd(shared, 20000, 4, "payment").noise_multiplier
    rounds = dp_sgd_rounds(4)
    records = [*scaler_releases(split), part_release(lender, lender.steps_per_round * rounds["lender"]),
               part_release(payment, payment.steps_per_round * rounds["payment"])]
    assert epsilon_for(records, split.delta) <= 3.0 * 1.002
