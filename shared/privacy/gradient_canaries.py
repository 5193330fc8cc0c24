"""Dirac gradient canaries: the white-box one-run audit of a part's DP-SGD (Steinke, Nasr, Jagielski 2023, Sec. 6).

Why: the black-box release audit (the released model's loss on input canaries) has little power, so a DP-SGD whose
noise were missing or replayable could still pass it. Here the auditor is the party itself, which sees everything
but the mechanism's randomness: m canaries, each a worst-case user whose clipped gradient is `clip` times one unit
vector e_j (a distinct parameter coordinate j per canary), each included in the run with probability 1/2 (the
secret bit) and, when included, Poisson-sampled into every step at the part's own sample rate q, exactly like a
user. After each step's noise the party adds to canary j's score the coordinate j of (noisy sum - the real users'
clipped sum) = that step's canary term + Gaussian noise. An included canary scores about clip * q * T over T steps,
an excluded one zero mean; the auditor guesses "included" for score > clip * q * T / 2 (the public midpoint).

The claim it is held to is this part's DP-SGD alone (add/remove neighbours, amplified by the Poisson sampling that
the canaries undergo like any user). The real users' sampling is independent of the canaries' bits, so subtracting
their sum only removes interference; the bound stays valid.

Canaries change the trained part (like m extra users): only audit runs turn them on (`audit.gradient_canaries`).
The inclusion bits and the per-step sampling come from the party's NoiseSource (OS-keyed), never from `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedscore.shared.privacy.secure_random import NoiseSource


@dataclass
class GradientCanaries:
    """m canaries on one part: where each sits (flat parameter index), whether it is in the run (the secret), and
    the score the auditor accumulates. `steps` counts the DP-SGD steps taken (the midpoint needs it)."""

    coordinates: torch.Tensor  # int64 [m], distinct flat indices into the part's parameters (in .parameters() order)
    included: torch.Tensor  # bool [m]: the secret bits
    score: torch.Tensor  # float64 [m]
    steps: int = 0

    @classmethod
    def draw(cls, m: int, n_parameters: int, source: NoiseSource) -> GradientCanaries:
        """m distinct coordinates (as many as the part has, at most) and m secret bits, all from `source`."""
        m = min(m, n_parameters)
        order = torch.argsort(source.uniform((n_parameters,)))
        return cls(coordinates=order[:m].to(torch.int64), included=source.bernoulli((m,), 0.5),
                   score=torch.zeros(m, dtype=torch.float64))

    def to_state(self) -> dict:
        return {"coordinates": self.coordinates, "included": self.included, "score": self.score,
                "steps": self.steps}

    @classmethod
    def from_state(cls, state: dict) -> GradientCanaries:
        return cls(coordinates=state["coordinates"], included=state["included"], score=state["score"],
                   steps=int(state["steps"]))

    def step_terms(self, sample_rate: float, clip: float, source: NoiseSource) -> torch.Tensor:
        """This step's canary term per canary: clip if it is included and Poisson-sampled now, else 0."""
        sampled = source.bernoulli((len(self.included),), sample_rate) & self.included
        return sampled.to(torch.float64) * clip

    def midpoint(self, sample_rate: float, clip: float) -> float:
        """Half the expected score of an included canary: public (rate, clip, steps), so the guess is too."""
        return clip * sample_rate * self.steps / 2


def flat_split(shapes: list[torch.Size], coordinates: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each parameter (in order): which canaries sit in it (positions into `coordinates`) and where (flat index
    inside that parameter)."""
    out, start = [], 0
    for shape in shapes:
        size = int(torch.Size(shape).numel())
        inside = ((coordinates >= start) & (coordinates < start + size)).nonzero().squeeze(1)
        out.append((inside, coordinates[inside] - start))
        start += size
    return out
