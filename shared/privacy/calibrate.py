"""From an epsilon target to a noise setting, by bisection over the same accountant that reports it.

A config may state either the noise (noise_multiplier / RR epsilon per release) or the target epsilon of the
guarantee; `resolve_noise_multiplier` accepts exactly one of the two. Targets are met from below: the returned
setting is verified with `accounting.account` (the reporting path), so the reported epsilon is <= target, and is
within ~`rtol` of the noise that would hit the target exactly. `already` lets a caller spend only what is left of
a budget: the new release is calibrated composed with records already in the ledger.

Why our own bisection and not `dp_accounting.mechanism_calibration.calibrate_dp_mechanism`: that function searches
with a dp-accounting accountant (PLD or RDP) built from a DpEvent factory, while the epsilon we report is
`accounting.account`, the larger of dp-accounting's PLD and Opacus' PRV (PRV is not a dp-accounting accountant).
Calibrating on PLD alone could return a noise whose reported (PRV) epsilon is above the target. Searching on the
very function that reports, and re-checking the result with it, is what makes "reported eps <= target" exact; the
search itself is twenty lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from fedscore.shared.privacy.accounting import account, pld_epsilon, prv_applies, prv_epsilon
from fedscore.shared.privacy.mechanisms import (
    DpSgdRelease,
    GaussianRelease,
    Mechanism,
    Neighbouring,
    RandomizedResponse,
)

COARSE_DISCRETIZATION = 1e-3  # PLD during the search: ~15x faster, a hair more pessimistic; the result is re-checked
_MAX_NOISE = 1e4
_MIN_NOISE = 1e-3


class CalibrationError(ValueError):
    """No setting meets the target (e.g. the records already spent exceed it)."""


def _log_interpolate(x0: float, e0: float, x1: float, e1: float, target: float) -> float | None:
    """Where the line through (log x, log eps) at two points reaches log target; None if it cannot be drawn."""
    if not (0 < e0 < math.inf and 0 < e1 < math.inf and e0 != e1 and x0 != x1 and target > 0):
        return None
    share = (math.log(e0) - math.log(target)) / (math.log(e0) - math.log(e1))
    try:  # a nearly flat line (the target out of reach of this release) points off to infinity: no guess
        return x0 * (x1 / x0) ** share
    except OverflowError:
        return None


def _smallest_meeting(eps_of: Callable[[float], float], target: float, rtol: float) -> float:
    """Smallest x (to within a factor 1+rtol) with eps_of(x) <= target, for eps_of non-increasing in x.

    log eps is close to linear in log x, so each step interpolates (or extrapolates) that line through the last
    two points and probes a hair above where it reaches the target, then a factor 1+rtol below the best point that
    meets it: most searches end in four to six accountant calls, where bracketing by doubling and bisection took
    thirteen to seventeen (each call is seconds of PRV or PLD). Steps are kept inside the bracket once there is one
    and fall back to doubling, halving or bisection where the line cannot be drawn. The answer keeps bisection's
    contract: eps_of(answer) <= target, and eps_of(answer / (1 + rtol)) > target or below the search range."""
    lo, hi = 0.0, math.inf  # eps_of(lo) > target >= eps_of(hi), once found
    eps_lo = eps_hi = math.nan
    last: list[tuple[float, float]] = []
    x = 1.0
    for _ in range(200):
        eps = eps_of(x)
        last = [*last[-1:], (x, eps)]
        if eps <= target:
            hi, eps_hi = x, eps
        else:
            lo, eps_lo = x, eps
        if lo >= _MAX_NOISE:
            raise CalibrationError(f"epsilon {target} is out of reach even with noise multiplier {_MAX_NOISE:g}")
        if hi < _MIN_NOISE or (lo > 0 and hi / lo <= 1.0 + rtol):
            return hi
        guess = _log_interpolate(*last[0], *last[1], target) if len(last) == 2 else None
        if lo > 0 and hi < math.inf:  # bracketed: aim a hair above the line's answer, strictly inside
            low_edge, high_edge = lo * (1.0 + rtol / 4.0), hi / (1.0 + rtol / 4.0)
            guess = guess or _log_interpolate(lo, eps_lo, hi, eps_hi, target) or math.sqrt(lo * hi)
            x = guess * (1.0 + rtol / 2.0)
            if x >= hi / (1.0 + rtol):  # the answer looks within rtol below hi: confirm it there
                x = hi / (1.0 + rtol)
            x = min(max(x, low_edge), high_edge) if low_edge < high_edge else math.sqrt(lo * hi)
        elif hi == math.inf:  # only too little noise seen so far: go up, at least a little, at most 8x
            x = min(max((guess or 2.0 * x) * 1.05, x * 1.05), x * 8.0, _MAX_NOISE)
        else:  # only enough noise seen so far: go down
            x = max(min((guess or x / 2.0) / 1.05, x / 1.05), x / 8.0)
    raise CalibrationError(f"calibration to epsilon {target} did not converge")


def calibrate_noise_multiplier(template: GaussianRelease | DpSgdRelease, target_epsilon: float, delta: float, *,
                               already: Sequence[Mechanism] = (), rtol: float = 1e-3) -> float:
    """Noise multiplier for `template` (its own value ignored) so the guarantee with `already` is <= target.
    Answers are kept in the accountant's disk cache (accounting_cache.py): the search costs seconds per process."""
    if not target_epsilon > 0:
        raise CalibrationError(f"target epsilon must be > 0, got {target_epsilon}")
    from fedscore.shared.privacy.accounting_cache import cached

    question = {"template": template.model_dump(mode="json"), "target": target_epsilon, "delta": delta,
                "already": [m.model_dump(mode="json") for m in already], "rtol": rtol}
    return float(cached("calibrate", question,
                        lambda: _calibrate(template, target_epsilon, delta, list(already), rtol)))


def _calibrate(template: GaussianRelease | DpSgdRelease, target_epsilon: float, delta: float,
               already: list[Mechanism], rtol: float) -> float:

    def with_noise(sigma: float) -> list[Mechanism]:
        return [*already, template.model_copy(update={"noise_multiplier": sigma})]

    if prv_applies(with_noise(1.0)):
        def search(sigma: float) -> float:
            return prv_epsilon(with_noise(sigma), delta)  # type: ignore[arg-type]  # no RR where PRV applies
    else:
        def search(sigma: float) -> float:
            return pld_epsilon(with_noise(sigma), delta, discretization=COARSE_DISCRETIZATION)

    try:
        sigma = _smallest_meeting(search, target_epsilon, rtol)
    except CalibrationError:  # out of reach: say why when the releases already planned are the cause
        if already and (spent := account(already, delta)[0]) >= target_epsilon:
            raise CalibrationError(f"the releases already planned spend epsilon {spent:.3f} on their own, at or "
                                   f"above the target {target_epsilon:g}: no noise on this one can meet it") from None
        raise
    for _ in range(100):  # the reporting path may be a hair above the search path: step up until it is met
        if account(with_noise(sigma), delta)[0] <= target_epsilon:
            return sigma
        sigma *= 1.0 + rtol
    raise CalibrationError(f"could not meet epsilon {target_epsilon} on the reporting accountant")


def calibrate_noise_scale(build: Callable[[float], list[Mechanism]], target_epsilon: float, delta: float, *,
                          already: Sequence[Mechanism] = (), rtol: float = 1e-3) -> float:
    """Smallest common scale t such that the records `build(t)` (noise multipliers proportional to t), composed
    with `already`, meet the target: for a release schedule whose noise varies by round in fixed proportions."""
    if not target_epsilon > 0:
        raise CalibrationError(f"target epsilon must be > 0, got {target_epsilon}")
    already = list(already)

    def search(scale: float) -> float:
        return pld_epsilon([*already, *build(scale)], delta, discretization=COARSE_DISCRETIZATION)

    scale = _smallest_meeting(search, target_epsilon, rtol)
    for _ in range(100):
        if account([*already, *build(scale)], delta)[0] <= target_epsilon:
            return scale
        scale *= 1.0 + rtol
    raise CalibrationError(f"could not meet epsilon {target_epsilon} on the reporting accountant")


def calibrate_gaussian(target_epsilon: float, delta: float, *, count: int, sensitivity: float = 1.0,
                       neighbouring: Neighbouring = "add_remove", rtol: float = 1e-3) -> float:
    """Noise multiplier for `count` non-sampled releases (the counterparty view) to reach at most target eps."""
    template = GaussianRelease(noise_multiplier=1.0, sensitivity=sensitivity, clip=1.0, count=count,
                               protects="payment.features", seen_by="lender", neighbouring=neighbouring)
    return calibrate_noise_multiplier(template, target_epsilon, delta, rtol=rtol)


def calibrate_dp_sgd(target_epsilon: float, delta: float, *, sample_rate: float, steps: int,
                     neighbouring: Neighbouring = "add_remove", already: Sequence[Mechanism] = (),
                     rtol: float = 1e-3) -> float:
    """Noise multiplier for Opacus DP-SGD (Poisson rate, steps) so the outsider eps (with `already`) is <= target."""
    template = DpSgdRelease(noise_multiplier=1.0, sample_rate=sample_rate, steps=steps, protects="joint.records",
                            neighbouring=neighbouring)
    return calibrate_noise_multiplier(template, target_epsilon, delta, already=already, rtol=rtol)


def calibrate_randomized_response(target_epsilon: float, delta: float, *, count: int = 1,
                                  already: Sequence[Mechanism] = (), rtol: float = 1e-3) -> float:
    """Per-release RR epsilon so `count` releases (plus `already`) stay within target.

    One release with nothing before it is the trivial case: RR with eps is exactly eps-DP, so it is the target.
    """
    if not target_epsilon > 0:
        raise CalibrationError(f"target epsilon must be > 0, got {target_epsilon}")
    if count == 1 and not already:
        return target_epsilon

    def eps_of(inverse: float) -> float:  # searched over 1/eps0, so more "noise" means less epsilon
        rr = RandomizedResponse(epsilon=1.0 / inverse, count=count, protects="lender.labels", seen_by="payment")
        return pld_epsilon([*already, rr], delta)

    return 1.0 / _smallest_meeting(eps_of, target_epsilon, rtol)


def resolve_noise_multiplier(template: GaussianRelease | DpSgdRelease, delta: float, *,
                             noise_multiplier: float | None = None, target_epsilon: float | None = None,
                             already: Sequence[Mechanism] = ()) -> float:
    """A config gives the noise directly or an epsilon target for it; exactly one of the two."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if noise_multiplier is not None:
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        return noise_multiplier
    assert target_epsilon is not None
    return calibrate_noise_multiplier(template, target_epsilon, delta, already=already)
