"""The one-run privacy audit of Steinke, Nasr and Jagielski ("Privacy auditing with one (1) training run",
NeurIPS 2023): an empirical 95% lower bound on epsilon from a single training run.

m canaries each carry an independent uniformly random secret bit (here: a canary's label, which is what label DP's
neighbouring datasets differ in; in the paper: whether the canary is included). The auditor guesses the bit of the
r canaries it is most confident about (abstaining on the rest) and gets v right. Under (eps, delta)-DP the number of
correct guesses is dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta term (their Theorem 3.1 / Proposition
5.7); `p_value` is that tail, exactly as in the paper's reference code, and `epsilon_lower_bound` the largest eps the
observed v rejects at the given confidence. A lower bound above the claimed epsilon is a violation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[>= v correct of r guesses] under the null hypothesis that the run is (epsilon, delta)-DP, m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v} r={r} m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1 / (1 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    # alpha = max over i in 1..v of P[v > Binomial(r, q) >= v - i] / i  (the paper's loop, vectorised)
    alpha = 0.0
    if v > 0:
        partial = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = float(np.max(partial / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float = 0.05) -> float:
    """The largest epsilon whose null hypothesis the observation rejects at level p (0 if none): with confidence
    1 - p, the run is not (eps, delta)-DP for any eps below it. Bisection as in the reference code."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if r == 0 or p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0  # keep p_value(low) < p <= p_value(high)
    while p_value(m, r, v, high, delta) < p:
        high += 1.0
        if high > 100:
            return math.inf
    for _ in range(40):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


@dataclass
class AuditResult:
    canaries: int
    guesses: int
    correct: int
    accuracy: float
    epsilon_lower_bound: float
    confidence: float
    policy: str
    policies_tried: int
    delta: float

    def to_dict(self) -> dict:
        return asdict(self)


def guess_policies(m: int) -> list[int]:
    """How many of the most confident canaries to guess: all, half, a quarter, a tenth (fixed in advance, so the
    confidence can be split between them, Bonferroni)."""
    return sorted({k for k in (m, m // 2, m // 4, m // 10) if k > 0}, reverse=True)


def audit(strategies: dict[str, np.ndarray], secrets: np.ndarray, delta: float, confidence: float = 0.95,
          rng: np.random.Generator | None = None) -> AuditResult:
    """Score each strategy's canary scores (> 0 guesses bit 1; |score| is the confidence) under every guess policy
    and return the best lower bound, each test at level (1 - confidence) / (number of tests), so the reported bound
    holds at `confidence` overall. Ties in confidence are broken at random."""
    rng = rng or np.random.default_rng(0)
    secrets = np.asarray(secrets).astype(int)
    m = len(secrets)
    ks = guess_policies(m)
    tests = len(ks) * len(strategies)
    level = (1 - confidence) / max(tests, 1)
    best = AuditResult(m, 0, 0, float("nan"), 0.0, confidence, "none", tests, delta)
    for name, scores in strategies.items():
        scores = np.asarray(scores, dtype=np.float64)
        order = rng.permutation(m)
        order = order[np.argsort(-np.abs(scores[order]), kind="stable")]
        correct = (scores > 0).astype(int) == secrets
        for k in ks:
            v = int(correct[order[:k]].sum())
            bound = epsilon_lower_bound(m, k, v, delta, level)
            if bound > best.epsilon_lower_bound or best.policy == "none":
                best = AuditResult(m, k, v, v / k, bound, confidence, f"{name}, {k} most confident", tests, delta)
    return best
