"""Privacy package: the noise matches its configuration, epsilons match published accountants, budgets hold."""

from __future__ import annotations

import json
import math
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from pydantic import ValidationError

from fedscore.server.privacy_report import build_privacy_report
from fedscore.shared.config import load_config
from fedscore.shared.privacy import (
    BudgetExceeded,
    DpSgdRelease,
    GaussianRelease,
    Ledger,
    NoiseSource,
    RandomizedResponse,
    account,
    calibrate_dp_sgd,
    calibrate_gaussian,
    calibrate_noise_multiplier,
    calibrate_randomized_response,
    clip_rows,
    clipped_label_gradients,
    embedding_release,
    epsilon_for,
    flip_probability,
    gaussian_release,
    guarantee_key,
    label_gradient_release,
    mechanisms_from_dicts,
    randomized_response,
    recompute_from_report,
    resolve_noise_multiplier,
)
from fedscore.shared.privacy.dp_events import event_to_json, guarantee_event, rr_noise_parameter
from fedscore.shared.privacy.ledger import ledger_db_path, ledger_exists
from fedscore.shared.privacy.mechanisms import OBSERVERS, Mechanism

DELTA = 1e-5
N_NOISE = 200_000  # std of the sample std ~ 0.16%: a 2% tolerance catches a 10% error in sigma by a wide margin


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check_noise(noise: torch.Tensor, std: float) -> None:
    """Empirical mean within 5 standard errors of 0, empirical std within 2% of the configured one."""
    values = noise.double().flatten()
    assert values.numel() >= N_NOISE
    assert abs(values.mean().item()) < 5 * std / math.sqrt(values.numel())
    assert values.std().item() == pytest.approx(std, rel=0.02)


# -- noise ------------------------------------------------------------------------------------------------------

def test_clip_rows_never_exceeds_clip_and_keeps_short_rows() -> None:
    x = torch.randn(5000, 16, generator=_gen(1)) * torch.logspace(-3, 3, 5000).unsqueeze(1)
    for clip in (1e-3, 0.7, 1.0, 3.0):
        clipped = clip_rows(x, clip)
        norms = torch.linalg.vector_norm(clipped, dim=1)
        assert bool((norms <= clip).all()), f"clip {clip}: max norm {norms.max().item()}"
        inside = torch.linalg.vector_norm(x, dim=1) <= clip
        assert torch.equal(clipped[inside], x[inside])
        outside = ~inside
        assert torch.allclose(norms[outside], torch.full_like(norms[outside], clip), rtol=1e-5)
        cosine = torch.nn.functional.cosine_similarity(clipped[outside], x[outside], dim=1)
        assert bool((cosine > 1 - 1e-5).all())  # direction kept
    assert torch.equal(clip_rows(torch.zeros(3, 4), 1.0), torch.zeros(3, 4))


@pytest.mark.parametrize(("clip", "sigma"), [(1.0, 2.0), (0.5, 0.8), (3.0, 4.0)])
def test_gaussian_release_noise_is_calibrated(clip: float, sigma: float) -> None:
    x = torch.randn(N_NOISE // 8, 8, generator=_gen(2)) * 5  # mostly outside the clip ball: clipping must happen
    out = gaussian_release(x, clip, sigma, NoiseSource())
    _check_noise(out - clip_rows(x, clip), sigma * clip)


def test_noise_is_unpredictable_unless_replayable() -> None:
    """OS-keyed sources never repeat; only the (VOID) replayable test mode reproduces a draw from public values."""
    x = torch.randn(100, 4, generator=_gen(4))
    assert not torch.equal(gaussian_release(x, 1.0, 2.0, NoiseSource()), gaussian_release(x, 1.0, 2.0, NoiseSource()))
    replay = [gaussian_release(x, 1.0, 2.0, NoiseSource.replayable_from(5, "a")) for _ in range(2)]
    assert torch.equal(*replay)
    assert not torch.equal(replay[0], gaussian_release(x, 1.0, 2.0, NoiseSource.replayable_from(6, "a")))
    assert not NoiseSource().replayable and NoiseSource.replayable_from(5).replayable


def test_a_source_never_runs_out_whatever_its_random_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the ChaCha20 block counter started at a random value (all 16 nonce bytes were random), so a
    source failed at random ("counter would overflow") after drawing more blocks than were left before 2^32; a UCI
    sweep hit it. With the random bytes at their worst (all 0xff) a source must still draw freely."""
    import fedscore.shared.privacy.secure_random as secure_random

    monkeypatch.setattr(secure_random.os, "urandom", lambda n: b"\xff" * n)
    source = NoiseSource()
    assert source.uniform((200_000,)).shape == (200_000,)  # 25,000 blocks


def test_secure_normal_and_uniform_distributions() -> None:
    """The sum-of-four Box-Muller draw is N(0, std^2) (moments and tails), uniforms cover [0, 1) evenly."""
    source = NoiseSource()
    z = source.normal((N_NOISE,), 1.0, torch.float64)
    _check_noise(z, 1.0)
    assert abs((z.abs() > 1.959964).double().mean().item() - 0.05) < 0.003  # two-sided 5% tail
    assert abs((z ** 4).mean().item() - 3.0) < 0.1  # Gaussian kurtosis
    u = source.uniform((N_NOISE,))
    assert u.min().item() >= 0.0 and u.max().item() < 1.0
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts - N_NOISE / 10).abs().max().item() < 5 * math.sqrt(N_NOISE / 10)


@pytest.mark.parametrize("epsilon", [0.5, 2.0, 4.0])
def test_randomized_response_flip_rate(epsilon: float) -> None:
    labels = (torch.rand(N_NOISE, generator=_gen(7)) < 0.2).long()
    out = randomized_response(labels, epsilon, NoiseSource())
    assert out.dtype == labels.dtype and set(out.unique().tolist()) <= {0, 1}
    p = 1.0 / (1.0 + math.exp(epsilon))
    for group in (labels == 0, labels == 1):  # flips must not depend on the label
        n = int(group.sum())
        rate = (out[group] != labels[group]).double().mean().item()
        # 5 standard errors: the flips are fresh CSPRNG draws every run, so the bound must not flake (p ~ 6e-7)
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n), (rate, p)
    assert RandomizedResponse(epsilon=epsilon, protects="lender.labels", seen_by="payment").flip_probability == (
        pytest.approx(p))


def test_randomized_response_rejects_non_binary_labels() -> None:
    with pytest.raises(ValueError, match="0 or 1"):
        randomized_response(torch.tensor([0, 1, 2]), 1.0, NoiseSource())


def test_label_gradients_noise_and_sensitivity() -> None:
    n, d, clip, sigma = N_NOISE // 4, 4, 0.5, 3.0
    p = torch.rand(n, generator=_gen(9))
    y = (torch.rand(n, generator=_gen(10)) < 0.3).float()
    jac = torch.randn(n, d, generator=_gen(11)) * 2
    g = clipped_label_gradients(p, y, jac, clip, sigma, NoiseSource.replayable_from(12))
    exact = (p - y).unsqueeze(1) * clip_rows(jac, clip)
    _check_noise(g - exact, sigma * clip)
    # the same noise draw with every label flipped: each user's gradient moves by at most clip
    flipped = clipped_label_gradients(p, 1 - y, jac, clip, sigma, NoiseSource.replayable_from(12))
    moved = torch.linalg.vector_norm(flipped - g, dim=1)
    assert moved.max().item() <= clip * (1 + 1e-5)
    assert moved.max().item() > 0.9 * clip  # the bound is attained: the sensitivity is not overstated either
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        clipped_label_gradients(p * 2, y, jac, clip, sigma, NoiseSource())


def test_residual_shaped_label_gradient_noise() -> None:
    """The "residual" shape: all noise lies along each user's clipped J_i, its component there has std
    sigma |J_i| (noise multiplier sigma in residual units), flipping a label moves g_i by at most clip along J_i,
    and the privacy loss is the same 1-D Gaussian as the isotropic shape's (shift <= 1/sigma in noise units)."""
    n, d, clip, sigma = N_NOISE, 4, 0.5, 3.0
    p = torch.rand(n, generator=_gen(19))
    y = (torch.rand(n, generator=_gen(20)) < 0.3).float()
    rows = clip_rows(torch.randn(n, d, generator=_gen(21)) * 2, clip)
    g = clipped_label_gradients(p, y, rows, clip, sigma, NoiseSource.replayable_from(22), "residual")
    exact = (p - y).unsqueeze(1) * rows
    norms = torch.linalg.vector_norm(rows, dim=1)
    along = ((g - exact) * rows).sum(1) / norms  # the noise's component along J_i
    across = (g - exact) - along.unsqueeze(1) * rows / norms.unsqueeze(1)
    assert across.abs().max().item() < 1e-4  # nothing off the line
    _check_noise(along / norms, sigma)  # N(0, sigma^2) in residual units
    flipped = clipped_label_gradients(p, 1 - y, rows, clip, sigma, NoiseSource.replayable_from(22), "residual")
    moved = torch.linalg.vector_norm(flipped - g, dim=1)
    assert moved.max().item() <= clip * (1 + 1e-5) and moved.max().item() > 0.9 * clip
    shift_in_noise_units = moved / (sigma * norms)  # what the privacy loss depends on
    assert shift_in_noise_units.max().item() <= 1 / sigma * (1 + 1e-5)
    with pytest.raises(ValueError, match="noise shape"):
        clipped_label_gradients(p, y, rows, clip, sigma, NoiseSource(), "diagonal")


# -- accounting -------------------------------------------------------------------------------------------------

def _gaussian(sigma: float, count: int, sensitivity: float = 1.0, **kw: object) -> GaussianRelease:
    fields: dict = {"protects": "payment.features", "seen_by": "lender", "clip": 1.0} | kw
    return GaussianRelease(noise_multiplier=sigma, sensitivity=sensitivity, count=count, **fields)


@pytest.mark.parametrize(("sigma", "count", "expected"), [
    (2.0, 1, 1.99), (2.0, 5, 4.98), (2.0, 10, 7.51), (4.0, 1, 0.93), (4.0, 5, 2.26), (4.0, 10, 3.34)])
def test_known_values_from_notes(sigma: float, count: int, expected: float) -> None:
    assert epsilon_for([_gaussian(sigma, count)], DELTA) == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize(("sigma", "count", "sensitivity"), [(2.0, 1, 1.0), (3.0, 7, 2.0), (0.9, 3, 1.0),
                                                             (6.0, 20, 2.0)])
def test_gaussian_matches_analytic_mu(sigma: float, count: int, sensitivity: float) -> None:
    """Independent of PLD: k releases of sensitivity D, noise sigma*C are one Gaussian with sigma/(D sqrt k)."""
    exact = dp_accounting.get_epsilon_gaussian(sigma / (sensitivity * math.sqrt(count)), DELTA)
    reported = epsilon_for([_gaussian(sigma, count, sensitivity)], DELTA)
    assert exact - 1e-6 <= reported <= exact + 1e-3


def test_replace_one_doubles_sensitivity() -> None:
    doubled = epsilon_for([_gaussian(4.0, 5, 2.0, neighbouring="replace_one")], DELTA)
    assert doubled == pytest.approx(epsilon_for([_gaussian(2.0, 5, 1.0)], DELTA), abs=1e-6)
    assert doubled > 2 * epsilon_for([_gaussian(4.0, 5, 1.0)], DELTA) * 0.9


def test_randomized_response_is_pure_epsilon_and_composes() -> None:
    rr = RandomizedResponse(epsilon=2.0, protects="lender.labels", seen_by="payment")
    assert epsilon_for([rr], DELTA) == pytest.approx(2.0, abs=1e-3)
    thrice = epsilon_for([rr.model_copy(update={"count": 3})], DELTA)
    assert thrice == pytest.approx(epsilon_for([rr, rr, rr], DELTA), abs=1e-6)
    assert 4.0 < thrice <= 6.0 + 1e-6  # (dp-accounting 0.6.0 alone reports 2.0 here: it drops RR's self-count)


def test_no_amplification_between_parties() -> None:
    with pytest.raises(ValidationError, match="amplification"):
        _gaussian(2.0, 100, sampling="poisson", sample_rate=0.01)
    with pytest.raises(ValidationError, match="itself"):
        GaussianRelease(noise_multiplier=1, sensitivity=1, clip=1, count=1, protects="lender.labels",
                        seen_by="lender")


def test_mixed_neighbouring_is_refused() -> None:
    rr = RandomizedResponse(epsilon=2.0, protects="lender.labels", seen_by="payment")
    gauss = GaussianRelease(noise_multiplier=2, sensitivity=1, clip=1, count=1, protects="lender.labels",
                            seen_by="payment", neighbouring="add_remove")
    with pytest.raises(ValueError, match="neighbouring"):
        epsilon_for([rr, gauss], DELTA)


def test_zero_noise_is_infinite_epsilon() -> None:
    assert epsilon_for([_gaussian(0.0, 1)], DELTA) == math.inf


MECHANISM_LISTS = {
    "labels: gradients + RR": [label_gradient_release(4.0, 1.0, 5),
                               RandomizedResponse(epsilon=2.0, protects="lender.labels", seen_by="payment")],
    "labels: RR drawn twice": [RandomizedResponse(epsilon=1.0, count=2, protects="lender.labels", seen_by="payment")],
    "labels: gradients + DP-SGD head, replace-one": [
        label_gradient_release(6.0, 0.5, 3),
        DpSgdRelease(noise_multiplier=1.1, sample_rate=0.05, steps=200, protects="lender.labels",
                     neighbouring="replace_one")],
    "features: embeddings, add/remove": [embedding_release(3.0, 1.0, 4)],
    "features: embeddings, replace-one": [embedding_release(5.0, 1.0, 2, neighbouring="replace_one"),
                                          embedding_release(20.0, 1.0, 3, neighbouring="replace_one")],
    "records: DP-SGD, outsider (PRV)": [DpSgdRelease(noise_multiplier=1.0, sample_rate=0.01, steps=500,
                                                     protects="lender.records")],
    "records: DP-SGD twice (PRV)": [
        DpSgdRelease(noise_multiplier=0.9, sample_rate=0.02, steps=200, protects="payment.model"),
        DpSgdRelease(noise_multiplier=2.0, sample_rate=0.05, steps=50, protects="payment.model")],
}


def _charge_every_view(ledger: Ledger, records: list[Mechanism]) -> None:
    """Charge each observer (other than the owner) what it sees of these records, as the parties do."""
    (protects,) = {m.protects for m in records}
    for against in OBSERVERS:
        seen = [m for m in records if m.visible_to(against)]
        if seen and protects.split(".", 1)[0] != against:
            ledger.charge(seen, guarantee_key(protects, against))


def _report(home: Path, groups: list[list[Mechanism]]) -> dict:
    """privacy-report.json as a run builds it (server/privacy_report.py), from the lifetime ledgers of the parties
    that own the protected things; each group is one party's charges."""
    budgets = {guarantee_key(m.protects, against): 1e9 for group in groups for m in group for against in OBSERVERS
               if m.protects.split(".", 1)[0] != against}
    ledgers: dict[str, Ledger] = {}
    for group in groups:
        party = group[0].protects.split(".", 1)[0]
        ledger = ledgers.setdefault(party, Ledger(home / party / "ledger.json", budgets, DELTA))
        _charge_every_view(ledger, group)
    config = load_config(None, [f"privacy.delta={DELTA}"])
    return build_privacy_report(config, {party: ledger.report().model_dump(mode="json")
                                         for party, ledger in ledgers.items()}, None)


def _independent_pld(guarantee: dict) -> float:
    """A guarantee's epsilon straight from dp-accounting's PLD constructors and its readable mechanism entries,
    without the DpEvent translation (dp_events.entry_event): the oracle for that translation's scaling and sampling.
    """
    relation = guarantee["neighbouring"]
    total = pld_lib.identity()
    for entry in guarantee["mechanisms"]:
        count = int(entry.get("count", 1))
        if entry["kind"] == "randomized_response":
            total = total.compose(
                pld_lib.from_randomized_response(rr_noise_parameter(entry["epsilon"]), 2).self_compose(count))
            continue
        sigma, distance = entry["noise_multiplier"], entry["sensitivity"]
        if sigma == 0:
            return math.inf
        if entry["sampling"] == "none":  # k non-sampled Gaussians are one with std sigma / sqrt(k)
            total = total.compose(pld_lib.from_gaussian_mechanism(sigma / math.sqrt(count), sensitivity=distance))
        elif relation == "add_remove":
            total = total.compose(pld_lib.from_gaussian_mechanism(
                sigma, sensitivity=distance, sampling_prob=entry["sample_rate"]).self_compose(count))
        else:  # replace-one: dp-accounting shifts each side by `sensitivity`, i.e. half the distance
            total = total.compose(pld_lib.from_gaussian_mechanism(
                sigma, sensitivity=distance / 2, sampling_prob=entry["sample_rate"],
                neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE).self_compose(count))
    return float(total.get_epsilon_for_delta(guarantee["delta"]))


@pytest.mark.slow
def test_reported_epsilon_matches_third_party_pld(tmp_path: Path) -> None:
    guarantees = [g for i, group in enumerate(MECHANISM_LISTS.values())
                  for g in _report(tmp_path / str(i), [group])["guarantees"]]
    report = json.loads(json.dumps({"delta": DELTA, "guarantees": guarantees}))  # what a reader of the JSON gets
    recomputed = recompute_from_report(report)
    assert len(recomputed) == len(report["guarantees"]) >= len(MECHANISM_LISTS)
    accountants = set()
    for guarantee, pld in zip(report["guarantees"], recomputed, strict=True):
        reported = guarantee["epsilon"]
        accountants.add(guarantee["accountant"])
        assert reported >= pld - 1e-9, guarantee
        assert reported - pld <= max(0.02, 0.01 * pld), guarantee
        assert pld == pytest.approx(_independent_pld(guarantee), rel=0.01, abs=0.01), guarantee
        assert set(guarantee) == {"protects", "against", "epsilon", "delta", "accountant", "neighbouring",
                                  "composition", "attack_ceiling", "mechanisms", "dp_event", "status", "view",
                                  "scope", "run_epsilon", "runs", "held_by", "budget", "per_release"}
    assert accountants <= {"dp_accounting.pld", "opacus.prv"}
    assert "opacus.prv" in accountants  # DP-SGD guarantees went through Opacus' accountant


def test_one_protected_thing_needs_one_relation(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "payment" / "ledger.json", {"payment.features@lender": 1e9}, DELTA)
    with pytest.raises(ValueError, match="neighbouring"):
        ledger.charge([*MECHANISM_LISTS["features: embeddings, add/remove"],
                       *MECHANISM_LISTS["features: embeddings, replace-one"]], "payment.features@lender")
    ledger.charge(MECHANISM_LISTS["features: embeddings, add/remove"], "payment.features@lender")
    with pytest.raises(ValueError, match="neighbouring"):  # nor across charges
        ledger.charge(MECHANISM_LISTS["features: embeddings, replace-one"], "payment.features@lender")


def test_recompute_catches_a_wrong_report(tmp_path: Path) -> None:
    report = _report(tmp_path, [MECHANISM_LISTS["features: embeddings, add/remove"]])
    guarantee = report["guarantees"][0]
    guarantee["mechanisms"][0]["sensitivity"] = 2.0  # listed, but not what the event was built from
    with pytest.raises(ValueError, match="does not match the listed mechanisms"):
        recompute_from_report(report)
    # consistent in both forms, but the reported epsilon understates them
    guarantee["dp_event"] = event_to_json(guarantee_event(guarantee["mechanisms"], guarantee["neighbouring"]))
    (pld,) = recompute_from_report(report)
    assert pld > guarantee["epsilon"] + 0.5


def test_recompute_refuses_a_dp_event_naming_other_code(tmp_path: Path) -> None:
    """dp-accounting's from_named_tuple imports and calls whatever class the data names: only its events pass."""
    report = _report(tmp_path, [MECHANISM_LISTS["features: embeddings, add/remove"]])
    events = report["guarantees"][0]["dp_event"]["events"]
    assert events[0]["class_name"] == "GaussianDpEvent"  # k unsampled Gaussians: one of multiplier / sqrt(k)
    events[0] = {"module_name": "subprocess", "class_name": "run", "args": ["false"]}
    with pytest.raises(ValueError, match="not a dp-accounting event"):
        recompute_from_report(report)


def test_guarantees_per_observer(tmp_path: Path) -> None:
    dp_sgd = DpSgdRelease(noise_multiplier=1.0, sample_rate=0.01, steps=100, protects="lender.labels",
                          neighbouring="replace_one")
    report = _report(tmp_path, [[label_gradient_release(4.0, 1.0, 2), dp_sgd]])
    found = {guarantee_key(g["protects"], g["against"]): g for g in report["guarantees"]}
    assert set(found) == {guarantee_key("lender.labels", "payment"), guarantee_key("lender.labels", "outsider")}
    assert len(found["lender.labels@payment"]["mechanisms"]) == 2  # the public model is seen by the payment holder
    assert found["lender.labels@payment"]["epsilon"] > found["lender.labels@outsider"]["epsilon"]
    ledger = Ledger(tmp_path / "other" / "lender" / "ledger.json", {"lender.labels@outsider": 1e9}, DELTA)
    with pytest.raises(ValueError, match="not part of what outsider sees"):  # gradients go to the payment holder
        ledger.charge([label_gradient_release(4.0, 1.0, 2)], "lender.labels@outsider")


# -- calibration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("target", "count", "sensitivity"), [(2.0, 5, 1.0), (4.98, 5, 1.0), (1.0, 1, 2.0)])
def test_calibrate_gaussian_round_trip(target: float, count: int, sensitivity: float) -> None:
    sigma = calibrate_gaussian(target, DELTA, count=count, sensitivity=sensitivity)
    assert epsilon_for([_gaussian(sigma, count, sensitivity)], DELTA) <= target
    assert epsilon_for([_gaussian(sigma * 0.995, count, sensitivity)], DELTA) > target  # tight, not just safe
    if target == 4.98:
        assert sigma == pytest.approx(2.0, rel=0.01)


@pytest.mark.slow
def test_calibrate_dp_sgd_round_trip() -> None:
    sigma = calibrate_dp_sgd(2.0, DELTA, sample_rate=0.02, steps=300)
    release = DpSgdRelease(noise_multiplier=sigma, sample_rate=0.02, steps=300, protects="lender.records")
    eps, accountant = account([release], DELTA)
    assert eps <= 2.0 and eps > 2.0 * 0.98
    assert accountant == "opacus.prv"


def test_calibrate_against_what_is_already_spent() -> None:
    spent = [label_gradient_release(4.0, 1.0, 3)]
    template = label_gradient_release(1.0, 1.0, 2)
    sigma = calibrate_noise_multiplier(template, 4.0, DELTA, already=spent)
    eps = epsilon_for([*spent, template.model_copy(update={"noise_multiplier": sigma})], DELTA)
    assert 3.96 <= eps <= 4.0


def test_calibrate_randomized_response() -> None:
    assert calibrate_randomized_response(2.0, DELTA) == 2.0
    per_release = calibrate_randomized_response(3.0, DELTA, count=3)
    rr = RandomizedResponse(epsilon=per_release, count=3, protects="lender.labels", seen_by="payment")
    assert 2.95 <= epsilon_for([rr], DELTA) <= 3.0
    assert per_release == pytest.approx(1.0, rel=0.01)  # few pure-eps releases: composition is about additive


def test_resolve_noise_multiplier_needs_exactly_one() -> None:
    template = _gaussian(1.0, 5)
    assert resolve_noise_multiplier(template, DELTA, noise_multiplier=2.5) == 2.5
    assert resolve_noise_multiplier(template, DELTA, target_epsilon=4.98) == pytest.approx(2.0, rel=0.01)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_noise_multiplier(template, DELTA)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_noise_multiplier(template, DELTA, noise_multiplier=1.0, target_epsilon=1.0)


# -- ledger -----------------------------------------------------------------------------------------------------

LABELS = "lender.labels@payment"


def _ledger(path: Path, budget: float = 5.0) -> Ledger:
    return Ledger(path, {LABELS: budget}, DELTA, party="lender")


def _assert_valid_file(path: Path) -> dict:
    """The ledger as a new process reads it (a fresh store: the file is checked again)."""
    from fedscore.shared.privacy.ledger_store import LedgerStore

    store = LedgerStore(path, "lender")
    assert store.meta()["party"] == "lender"
    assert not [p for p in path.parent.iterdir() if ".creating" in p.name]  # no temporary file left behind
    return {"entries": store.entries()}


@pytest.mark.slow
def test_ledger_composes_persists_and_refuses(tmp_path: Path) -> None:
    path = tmp_path / "state" / "privacy_ledger.json"
    one_round = [label_gradient_release(2.0, 1.0, 1)]
    for rounds in range(1, 6):
        eps = _ledger(path).charge(one_round, LABELS, note=f"round {rounds}")  # a fresh process each round
        assert eps == pytest.approx(epsilon_for([label_gradient_release(2.0, 1.0, rounds)], DELTA), abs=1e-6)
        assert len(_assert_valid_file(path)["entries"]) == rounds
    assert eps == pytest.approx(4.98, abs=0.02)
    before = _assert_valid_file(path)
    with pytest.raises(BudgetExceeded) as refused:
        _ledger(path).charge(one_round, LABELS)
    assert refused.value.would_be > 5.0 and refused.value.spent == pytest.approx(eps)
    assert "lender" in str(refused.value) and LABELS in str(refused.value) and "budget" in str(refused.value)
    assert _assert_valid_file(path) == before  # nothing recorded on refusal
    summary = _ledger(path).spent()[LABELS]
    assert summary["epsilon"] == pytest.approx(eps) and summary["charges"] == 5
    assert summary["remaining"] == pytest.approx(5.0 - eps)
    assert mechanisms_from_dicts(_assert_valid_file(path)["entries"][0]["mechanisms"]) == one_round
    # a cheaper release still fits
    assert _ledger(path).charge([label_gradient_release(40.0, 1.0, 1)], LABELS) <= 5.0


def test_ledger_refuses_unbudgeted_and_mismatched_charges(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ledger = _ledger(path)
    with pytest.raises(BudgetExceeded, match="no privacy budget"):
        ledger.charge([embedding_release(2.0, 1.0, 1)], "payment.features@lender")
    with pytest.raises(ValueError, match=r"protecting payment\.features"):
        ledger.charge([embedding_release(2.0, 1.0, 1)], LABELS)
    with pytest.raises(ValueError, match="guarantee key"):
        Ledger(path, {"labels": 1.0}, DELTA, party="lender")
    with pytest.raises(BudgetExceeded):
        _ledger(path, budget=1.0).charge([label_gradient_release(2.0, 1.0, 1)], LABELS)  # 1.99 > 1.0 at once
    assert not ledger_exists(path)  # nothing was ever written


def test_ledger_refuses_a_corrupt_or_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    _ledger(path).charge([label_gradient_release(4.0, 1.0, 1)], LABELS)
    with pytest.raises(ValueError, match="belongs to"):
        Ledger(path, {LABELS: 5.0}, DELTA, party="payment")
    ledger_db_path(path).write_text("{not a database")
    with pytest.raises(ValueError, match=rf"{ledger_db_path(path)} is damaged"):
        _ledger(path)


# -- learning from randomized-response labels and the embedding noise schedule --------------------------------------

def test_forward_corrected_loss_learns_the_clean_probability_and_keeps_the_label_bound() -> None:
    """The forward-corrected model's sigmoid is P(y=1): at the optimum of the expected loss over flipped labels it
    recovers the clean probability; its residual d loss / d logit is what autograd says, and changing a label
    moves it by at most 1 (the bound the label-gradient noise's sensitivity rests on)."""
    from fedscore.shared.model.parts import LenderTop

    f = flip_probability(2.0)
    top = LenderTop(3, 0, [], label_flip=f, rr_loss="forward")
    assert float(top.label_flip) == 0.0  # nothing to undo: probability is the sigmoid itself
    clean = torch.tensor([0.05, 0.3, 0.8])
    logit = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.Adam([logit], lr=0.05)
    p_rr = f + (1 - 2 * f) * clean
    for _ in range(2000):  # minimise the expected loss over y_rr ~ Bernoulli(p_rr)
        optimizer.zero_grad()
        (p_rr * top.loss(logit, torch.ones(3), "none") + (1 - p_rr) * top.loss(logit, torch.zeros(3), "none")).sum(
        ).backward()
        optimizer.step()
    assert torch.sigmoid(logit.detach()) == pytest.approx(clean, abs=2e-3)
    z = torch.linspace(-12, 12, 241)
    r1, r0 = top.residual(z, torch.ones_like(z)), top.residual(z, torch.zeros_like(z))
    assert float((r0 - r1).max()) <= 1.0 and float((r0 - r1).min()) > 0
    assert bool((r1 <= 0).all()) and bool((r0 >= 0).all())
    zz = z.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(top.loss(zz, torch.ones_like(z), "sum"), zz)
    assert torch.allclose(auto, r1)
    plain = LenderTop(3, 0, [], label_flip=f)
    assert float(plain.label_flip) == pytest.approx(f)
    assert torch.allclose(plain.residual(z, torch.ones_like(z)), torch.sigmoid(z) - 1)


@pytest.mark.slow
def test_feature_noise_schedule_spends_its_share_on_the_last_release_and_meets_the_target() -> None:
    from fedscore.clients.payment.feature_privacy import (
        feature_noise_schedule,
        model_exposure,
        plan_feature_noise,
        schedule_releases,
    )
    from fedscore.shared.privacy import scaler_statistics_release
    from fedscore.shared.privacy.dp_sgd import dp_sgd_rounds, plan_dp_sgd

    def planned(share: str | None, head: str = "random") -> tuple[list[float | None], float]:
        config = load_config(None, ["privacy.feature_epsilon=8", "training.rounds=4",
                                    "privacy.dpsgd_noise_multiplier=3.5",  # given: no DP-SGD calibration here
                                    "privacy.payment_fit=dp_sgd",  # the exposure below is the part's DP-SGD
                                    "model.payment_output=partial_logit", f"model.payment_head_init={head}",
                                    *([f"privacy.feature_final_share={share}"] if share else [])])
        plan = plan_dp_sgd(config.privacy, 20000, 4)
        final = plan_feature_noise(config, plan.to_dict())
        exposure = [model_exposure(plan, config.privacy)] * dp_sgd_rounds(4)["payment"] + [
            scaler_statistics_release(30.0, 1.0, "payment.features", "outsider", "replace_one")]
        eps = epsilon_for([*exposure, *schedule_releases(config, final)], config.privacy.delta)
        return feature_noise_schedule(config, final), eps

    equal, eps_equal = planned(None)
    skewed, eps_skewed = planned("0.9")
    assert len(set(equal)) == 1 and 7.9 <= eps_equal <= 8.0
    assert 7.9 <= eps_skewed <= 8.0
    early, final = skewed[0], skewed[-1]
    assert skewed[:-1] == [early] * 3 and final < equal[0] < early
    assert (1 / final**2) / (3 / early**2 + 1 / final**2) == pytest.approx(0.9)
    # a zero-initialised partial-logit head releases the constant 0 in round 0: no noise, no charge, so the
    # budget is spread over the 3 releases that carry data, each less noisy than when 4 did
    constant, eps_constant = planned(None, head="zero")
    assert constant[0] is None and len(set(constant[1:])) == 1 and 7.9 <= eps_constant <= 8.0
    assert constant[1] < equal[0]
    skewed0, _ = planned("0.9", head="zero")
    assert skewed0[0] is None and skewed0[1] == skewed0[2] > skewed0[3]
    assert (1 / skewed0[3]**2) / (2 / skewed0[1]**2 + 1 / skewed0[3]**2) == pytest.approx(0.9)
