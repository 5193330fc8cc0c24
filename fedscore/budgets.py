"""The privacy budgets a local operator sets for the two parties it plays (`--budget party:guarantee=eps`).

Each party enforces its own budget against its lifetime ledger (shared/privacy/ledger.py), whatever the coordinator
asks; these are only the values a local run hands to each party's settings, and what launch.json keeps for a resume.
"""

from __future__ import annotations

from fedscore.shared.config import FedConfig
from fedscore.shared.privacy.budgets import parse_budget, with_slack
from fedscore.shared.run_folder import RunError

Budgets = dict[str, dict[str, float]]  # party -> guarantee key -> max epsilon


def default_budgets(config: FedConfig) -> Budgets:
    """What each party would set in its own node config to allow exactly the eps targets the run plans.

    In a real deployment each party writes its own; for a local run the operator plays both, and `--budget
    party:key=eps` overrides one. A noise multiplier given without a target gets no default budget: the party
    then refuses until its operator sets one.
    """
    privacy = config.privacy
    budgets: Budgets = {"payment": {}, "lender": {}}
    if not privacy.enabled:
        return budgets
    if privacy.label_epsilon is not None:
        # the composed label claim (RR mixture of randomized response, the lender's DP-SGD and every gradient
        # exchange) never exceeds randomized response's own epsilon: that is the cap
        budgets["lender"]["lender.labels@payment"] = with_slack(privacy.label_epsilon)
        budgets["lender"]["lender.labels@outsider"] = with_slack(privacy.label_epsilon)
    if privacy.feature_epsilon is not None and privacy.feature_noise_multiplier is None:
        budgets["payment"]["payment.features@lender"] = with_slack(privacy.feature_epsilon)
    if privacy.outsider_epsilon is not None and privacy.dpsgd_noise_multiplier is None:
        for party in budgets:
            budgets[party]["joint.records@outsider"] = with_slack(privacy.outsider_epsilon)
    return budgets


def apply_budget_overrides(budgets: Budgets, overrides: list[str]) -> Budgets:
    """'lender:lender.labels@payment=1.5' -> budgets["lender"]["lender.labels@payment"] = 1.5"""
    for item in overrides:
        party, sep, rest = item.partition(":")
        if not sep or party not in budgets:
            raise RunError(f"--budget {item!r}: expected party:guarantee=epsilon, e.g. lender:lender.labels@payment=2")
        try:
            key, epsilon = parse_budget(rest)
        except ValueError as exc:
            raise RunError(f"--budget {item!r}: {exc}") from None
        budgets[party][key] = epsilon
    return budgets
