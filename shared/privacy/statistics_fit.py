"""The payment holder's linear part fitted from noisy sufficient statistics, not by DP-SGD (issue 18).

Why: at the default two rounds the payment part learns from ONE gradient exchange. DP-SGD spends that exchange in
~12 Poisson-sampled steps, each with noise on every parameter, and kept a median 0.66 of FATE's lift (worst run
0.18). A ridge regression of the received residuals on the payment columns is one closed-form step that uses every
user at once: the payment holder releases (to itself, then in its part) the Gram matrix X^T X and the moment vector
X^T t with Gaussian noise ("sufficient statistics perturbation", Vu & Slavkovic 2009; Wang 2018), and solves
w = (X^T X + N + lambda I)^{-1} (X^T t + n). With ~20k users and ~90 columns the noise is small next to the
statistics, and the ridge keeps the one exchange's signal (BENCHMARKS "The payment part from sufficient
statistics").

The mechanism, per user row x_i (the part's scaled inputs plus a constant 1 for the intercept, clipped to L2 norm
C = `row_clip`) and target t_i (the received gradient, negated, clipped to |t_i| <= B = `target_clip`):
- the Gram matrix's upper triangle, once: one user moves it by at most ||x_i x_i^T||_F <= C^2 (add/remove), so
  Gaussian noise of std z C^2 per entry is a Gaussian release of sensitivity 1 in units of C^2; it depends on the
  features alone, so later fits reuse it (post-processing);
- the moment vector X^T t, once per fit: one user moves it by at most C B (add/remove), noise std z C B per entry.
Replace-one (against the lender, who knows which users exist) doubles both sensitivities. Both are charged before
the fit; the noise comes from the party's CSPRNG (secure_random.NoiseSource). The released part is a
post-processing of these two statistics (the solve and the public ridge and scale), so the records cover it.

Scope: a linear payment part that sends one partial logit (`model.payment_hidden = []`,
`model.payment_output = "partial_logit"`): its map is s = w . x + b, which the fit writes into the part's layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from fedscore.shared.privacy.mechanisms import GaussianRelease, Neighbouring, Observer
from fedscore.shared.privacy.noise import clip_rows

if TYPE_CHECKING:
    from fedscore.shared.config import PrivacyConfig
    from fedscore.shared.privacy.secure_random import NoiseSource


@dataclass(frozen=True)
class StatisticsFitPlan:
    """The public constants of the fit: the noise multiplier z, the clips C and B, the ridge lambda."""

    noise_multiplier: float
    row_clip: float
    target_clip: float
    ridge: float

    @classmethod
    def from_privacy(cls, privacy: PrivacyConfig) -> StatisticsFitPlan:
        return cls(noise_multiplier=privacy.payment_fit_noise_multiplier, row_clip=privacy.payment_fit_row_clip,
                   target_clip=privacy.payment_fit_target_clip, ridge=privacy.payment_fit_ridge)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gram_release(plan: StatisticsFitPlan, protects: str = "joint.records", seen_by: Observer = "outsider",
                 neighbouring: Neighbouring = "add_remove") -> GaussianRelease:
    """The noisy Gram matrix, released once (rows clipped to C: sensitivity C^2, i.e. 1 in units of `clip`)."""
    return GaussianRelease(noise_multiplier=plan.noise_multiplier,
                           sensitivity=1.0 if neighbouring == "add_remove" else 2.0, clip=plan.row_clip ** 2,
                           count=1, protects=protects, seen_by=seen_by, neighbouring=neighbouring)


def moment_release(plan: StatisticsFitPlan, count: int = 1, protects: str = "joint.records",
                   seen_by: Observer = "outsider", neighbouring: Neighbouring = "add_remove") -> GaussianRelease:
    """The noisy moment vector X^T t, once per fit (sensitivity C B, i.e. 1 in units of `clip`)."""
    return GaussianRelease(noise_multiplier=plan.noise_multiplier,
                           sensitivity=1.0 if neighbouring == "add_remove" else 2.0,
                           clip=plan.row_clip * plan.target_clip, count=count, protects=protects, seen_by=seen_by,
                           neighbouring=neighbouring)


def planned_fit_releases(plan: StatisticsFitPlan, fits: int, protects: str = "joint.records",
                         seen_by: Observer = "outsider",
                         neighbouring: Neighbouring = "add_remove") -> list[GaussianRelease]:
    """Everything `fits` fits release: the Gram matrix once, a moment vector per fit (none without a fit)."""
    if fits <= 0:
        return []
    return [gram_release(plan, protects, seen_by, neighbouring),
            moment_release(plan, fits, protects, seen_by, neighbouring)]


def design_rows(x: torch.Tensor, plan: StatisticsFitPlan) -> torch.Tensor:
    """The fit's rows: the part's inputs with a constant 1 appended (the intercept), clipped to C (float64)."""
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64)
    return clip_rows(torch.cat([x.double(), ones], dim=1), plan.row_clip)


@dataclass
class StatisticsCanaries:
    """Dirac canaries on the fit's two releases, for the white-box one-run audit (as gradient_canaries.py does for
    DP-SGD): each sits on one coordinate of what is released (an upper-triangle entry of the Gram matrix, or an entry
    of the moment vector), is in the run with probability 1/2 (the secret bit, from the party's CSPRNG), and when in
    adds one sensitivity unit there (C^2, resp. C B) before the noise: a worst-case neighbour of that release. The
    party scores (noisy statistic - its users' statistic) at the canary's coordinate in sensitivity units, summed over
    the releases the canary sat in (the Gram matrix once, the moments once per fit): ~1 per release if included, 0 if
    not. Canaries change the part like extra users: only audit runs have them (`audit.gradient_canaries`)."""

    coordinates: torch.Tensor  # int64 [m]: < n_upper an upper-triangle entry (triu_indices order), else a moment entry
    included: torch.Tensor  # bool [m]: the secret bits
    score: torch.Tensor  # float64 [m], in sensitivity units
    releases: torch.Tensor  # int64 [m]: how many releases each canary was scored in
    n_upper: int  # entries of the Gram matrix's upper triangle

    @classmethod
    def draw(cls, m: int, width: int, source: NoiseSource) -> StatisticsCanaries:
        """m distinct coordinates among the Gram's upper triangle and the moments of a `width`-column fit."""
        n_upper = width * (width + 1) // 2
        total = n_upper + width
        m = min(m, total)
        order = torch.argsort(source.uniform((total,)))
        return cls(coordinates=order[:m].to(torch.int64), included=source.bernoulli((m,), 0.5),
                   score=torch.zeros(m, dtype=torch.float64), releases=torch.zeros(m, dtype=torch.int64),
                   n_upper=n_upper)

    def to_state(self) -> dict[str, Any]:
        return {"coordinates": self.coordinates, "included": self.included, "score": self.score,
                "releases": self.releases, "n_upper": self.n_upper}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> StatisticsCanaries:
        return cls(coordinates=state["coordinates"], included=state["included"], score=state["score"],
                   releases=state["releases"], n_upper=int(state["n_upper"]))

    def _in(self, block: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The canaries on the Gram matrix's block or the moments' (positions), and where (index in the block)."""
        gram = self.coordinates < self.n_upper
        which = (gram if block == "gram" else ~gram).nonzero().squeeze(1)
        return which, self.coordinates[which] - (0 if block == "gram" else self.n_upper)

    def add(self, values: torch.Tensor, block: str, unit: float) -> torch.Tensor:
        """`values` (the block's flat statistic) with each included canary's unit added."""
        which, where = self._in(block)
        out = values.clone()
        out[where] += self.included[which].to(out.dtype) * unit
        return out

    def observe(self, released: torch.Tensor, users: torch.Tensor, block: str, unit: float) -> None:
        """Score the block's canaries: (released - users) at their coordinates, in sensitivity units."""
        which, where = self._in(block)
        self.score[which] += (released[where] - users[where]) / unit
        self.releases[which] += 1


def _gaussian(users: torch.Tensor, block: str, unit: float, plan: StatisticsFitPlan, source: NoiseSource,
              canaries: StatisticsCanaries | None) -> torch.Tensor:
    """One flat statistic released: Gaussian noise of std z * unit per entry (unit: its sensitivity), with the audit
    run's canaries added before the noise and scored after it."""
    values = canaries.add(users, block, unit) if canaries is not None else users
    released = values + source.normal(users.shape, plan.noise_multiplier * unit, torch.float64)
    if canaries is not None:
        canaries.observe(released, users, block, unit)
    return released


def noisy_gram(rows: torch.Tensor, plan: StatisticsFitPlan, source: NoiseSource,
               canaries: StatisticsCanaries | None = None) -> torch.Tensor:
    """X^T X plus symmetric Gaussian noise: one draw per upper-triangle entry (the diagonal included), mirrored."""
    gram = rows.T @ rows
    d = gram.shape[0]
    upper = torch.triu_indices(d, d)
    released = _gaussian(gram[upper[0], upper[1]], "gram", plan.row_clip ** 2, plan, source, canaries)
    out = torch.zeros(d, d, dtype=torch.float64)
    out[upper[0], upper[1]] = released
    return out + torch.triu(out, diagonal=1).T


def noisy_moment(rows: torch.Tensor, targets: torch.Tensor, plan: StatisticsFitPlan, source: NoiseSource,
                 canaries: StatisticsCanaries | None = None) -> torch.Tensor:
    """X^T t with the targets clipped to |t| <= B, plus Gaussian noise of std z C B per entry."""
    t = targets.double().clamp(-plan.target_clip, plan.target_clip)
    return _gaussian(rows.T @ t, "moment", plan.row_clip * plan.target_clip, plan, source, canaries)


def ridge_solve(gram: torch.Tensor, moment: torch.Tensor, plan: StatisticsFitPlan) -> torch.Tensor:
    """(G + lambda I)^{-1} m: the weights and (last) the intercept. lambda is public and large next to the Gram
    noise's spread, so the noisy system stays well posed (a least-squares solve, should it still be singular)."""
    system = gram + plan.ridge * torch.eye(gram.shape[0], dtype=torch.float64)
    return torch.linalg.lstsq(system, moment.unsqueeze(1)).solution.squeeze(1)
