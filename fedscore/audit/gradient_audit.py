"""The white-box one-run audit of each released part's DP-SGD, from its Dirac gradient canaries.

Each party recorded, in its state, its canaries' coordinates, secret inclusion bits and scores
(shared/privacy/gradient_canaries.py). The auditor guesses "included" where a score is above the public midpoint
and turns the guesses into a 95% lower bound (one_run.audit), held against the claim for that part's DP-SGD alone:
its own steps, noise multiplier and sample rate (add/remove neighbours), before composing with the other part.

In the (VOID) replayable mode the auditor also replays the DP-SGD noise from the public seed and subtracts it,
exactly as a counterparty holding the seed could: every canary is then read without noise, and the bound exceeds the
claim (the negative control).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedscore.audit.one_run import audit
from fedscore.clients.state import PartyState
from fedscore.shared.privacy.gradient_canaries import GradientCanaries, flat_split

DESIGN = ("m Dirac canaries per part, each a user whose clipped gradient is clip * e_j on its own parameter "
          "coordinate j, in the run with probability 1/2 and then Poisson-sampled into each step like a user; the "
          "party scores coordinate j of (noisy sum - real users' clipped sum) over its steps (white box)")


def replayed_noise(seed: int, party: str, record: dict[str, Any], shapes: list[torch.Size]) -> np.ndarray:
    """The DP-SGD noise at each canary's coordinate, summed over the steps, recomputed from the public seed the way
    the (VOID) replayable stream draws it: per step the users' Poisson mask, then each parameter's noise in order."""
    from fedscore.shared.privacy.secure_random import NoiseSource

    plan = record["plan"]
    coordinates = record["coordinates"]
    split = flat_split(shapes, coordinates)
    std = float(plan["noise_multiplier"]) * float(plan["clip"])
    total = np.zeros(len(coordinates))
    for round_ in record["rounds"]:
        source = NoiseSource.replayable_from(seed, party, "dpsgd", str(round_))
        for _ in range(int(plan["steps_per_round"])):
            if not bool(source.bernoulli((int(record["n"]),), float(plan["sample_rate"])).any()):
                continue
            for shape, (which, where) in zip(shapes, split, strict=True):
                noise = source.normal(shape, std, torch.float32).reshape(-1)
                total[which.numpy()] += noise[where].double().numpy()
    return total


def part_claim(record: dict[str, Any], delta: float) -> float:
    """Epsilon of this part's DP-SGD alone, over the steps it was charged for (rounds x steps per round)."""
    from fedscore.shared.privacy import epsilon_for
    from fedscore.shared.privacy.dp_sgd import DpSgdPlan, part_release

    plan = DpSgdPlan(**record["plan"])
    return float(epsilon_for([part_release(plan, plan.steps_per_round * len(record["rounds"]))], delta))


def gradient_canary_audits(party_states: dict[str, PartyState], seed: int, replayable: bool,
                           delta: float, confidence: float) -> list[dict[str, Any]]:
    """One audit row per part that ran gradient canaries."""
    rows = []
    for party, state in party_states.items():
        record = state.gradient_canaries
        if not record:
            continue
        canaries = GradientCanaries.from_state(record)
        plan = record["plan"]
        midpoint = canaries.midpoint(float(plan["sample_rate"]), float(plan["clip"]))
        score = canaries.score.numpy()
        strategies = {"score": score - midpoint}
        if replayable:
            shapes = [torch.Size(shape) for shape in record["shapes"]]
            strategies["replay"] = score - replayed_noise(seed, party, record, shapes) - midpoint
        claim = part_claim(record, delta)
        result = audit(strategies, canaries.included.numpy().astype(int), delta, confidence)
        rows.append({"guarantee": f"joint.records@outsider ({party} part's DP-SGD, white box)", "claim": claim,
                     "claim_status": "VOID (replayable noise)" if replayable else "holds",
                     **result.to_dict(), "violation": result.epsilon_lower_bound > claim,
                     "steps": canaries.steps, "canary_design": DESIGN})
    return rows


STATISTICS_DESIGN = ("m Dirac canaries on the payment part's statistics fit, each on its own coordinate of what is "
                     "released (a Gram matrix entry or a moment), in the run with probability 1/2, adding one "
                     "sensitivity unit there before the noise; the party scores (noisy statistic - its users' "
                     "statistic) at that coordinate, in units, over the releases it sat in (white box)")


def statistics_fit_audits(party_states: dict[str, PartyState], replayable: bool, delta: float,
                          confidence: float) -> list[dict[str, Any]]:
    """One audit row for a payment part fitted from noisy statistics that ran canaries (shared/privacy/
    statistics_fit.py): each canary's score against the public midpoint (half a unit per release it sat in), held to
    the fit's own claim. A canary sits in one release kind only, so the claim is the larger of the two: the
    moments' `fits` Gaussians (add/remove), at least the Gram matrix's one."""
    from fedscore.shared.privacy import epsilon_for
    from fedscore.shared.privacy.statistics_fit import StatisticsCanaries, StatisticsFitPlan, moment_release

    rows = []
    for party, state in party_states.items():
        record = getattr(state, "statistics_canaries", None)
        plan = getattr(state, "statistics_fit", None)
        if not record or not plan:
            continue
        canaries = StatisticsCanaries.from_state(record)
        fits = max(1, int(canaries.releases.max()))
        claim = float(epsilon_for([moment_release(StatisticsFitPlan(**plan), fits)], delta))
        scores = (canaries.score - canaries.releases.to(torch.float64) / 2).numpy()
        result = audit({"score": scores}, canaries.included.numpy().astype(int), delta, confidence)
        rows.append({"guarantee": f"joint.records@outsider ({party} part's statistics fit, white box)",
                     "claim": claim, "claim_status": "VOID (replayable noise)" if replayable else "holds",
                     **result.to_dict(),
                     "violation": result.epsilon_lower_bound > claim, "steps": fits,
                     "canary_design": STATISTICS_DESIGN})
    return rows
