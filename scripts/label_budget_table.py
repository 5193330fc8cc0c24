"""What lender.labels@payment costs for a few (randomized response, gradient noise) settings, without training.

Why: the label claim composes randomized response with what the lender computes from its output (its DP-SGD
steps, each gradient exchange) as an RR mixture (shared/privacy/accounting.py). The records a run would charge are
known in advance from the config: the DP-SGD plan (`plan_dp_sgd`, as the lender computes it at alignment for the
number of training users), one DP-SGD record per round, one gradient record per exchange. This builds exactly those
records and prints each setting's epsilon and attack ceiling.

    .venv/bin/python scripts/label_budget_table.py --n-train 24000
    .venv/bin/python scripts/label_budget_table.py --set privacy.label_epsilon=3 \
        --set privacy.gradient_noise_multiplier=4
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedscore.shared.config import FedConfig, load_config

SETTINGS = ((2.0, 3.0), (3.0, 4.0), (3.0, 3.0))  # (label_epsilon, gradient_noise_multiplier)


def label_records(config: FedConfig, n_train: int, exchanges: int) -> list:
    """The records a run with this config charges to lender.labels@payment (`planned_label_records`, the lender's
    own plan): randomized response, the lender's DP-SGD steps of every round, `exchanges` gradient exchanges."""
    from fedscore.shared.privacy.dp_sgd import plan_dp_sgd, planned_label_records

    privacy = config.privacy
    if privacy.label_epsilon is None:
        raise SystemExit("privacy.label_epsilon is unset: the labels are unprotected, there is nothing to compose")
    plan = plan_dp_sgd(privacy, n_train, config.training.rounds, "lender") if privacy.dp_sgd else None
    return planned_label_records(privacy, plan, config.training.rounds, exchanges, "randomized-response:table",
                                 top_released=config.model.lender_part == "top")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=None, help="a run config (TOML); default: the defaults")
    parser.add_argument("--set", action="append", default=[], help="config override key=value, e.g. "
                        "privacy.label_epsilon=3 (given: one row for that config; absent: the built-in settings)")
    parser.add_argument("--n-train", type=int, default=24000, help="training users the DP-SGD plan is made for")
    parser.add_argument("--exchanges", type=int, default=None,
                        help="gradient exchanges (default: rounds - 1, the last round sends none)")
    args = parser.parse_args()

    from fedscore.shared.privacy.accounting import account, attack_ceiling, entries_pld, pld_epsilon
    from fedscore.shared.privacy.dp_sgd import gradient_exchanges
    from fedscore.shared.privacy.mechanisms import flip_probability

    settings = [None] if args.set else list(SETTINGS)
    print(f"n_train={args.n_train}; eps at the config's delta; RR mixture of randomized response, the lender's "
          "DP-SGD and the gradient exchanges")
    print(f"{'RR eps':>6} {'flips':>6} {'noise':>5} {'rounds':>6} {'exch':>4} {'DP-SGD sigma':>12} "
          f"{'downstream eps':>14} {'composed eps':>12} {'best AUC':>8} {'best acc':>8}")
    for setting in settings:
        overrides = list(args.set)
        if setting is not None:
            overrides += [f"privacy.label_epsilon={setting[0]}", f"privacy.gradient_noise_multiplier={setting[1]}"]
        config = load_config(args.config, overrides)
        rounds = config.training.rounds
        exchanges = gradient_exchanges(rounds) if args.exchanges is None else args.exchanges
        records = label_records(config, args.n_train, exchanges)
        delta = config.privacy.delta
        epsilon, _ = account(records, delta)
        downstream = pld_epsilon(records[1:], delta) if len(records) > 1 else 0.0
        ceiling = attack_ceiling(entries_pld([r.report_entry() for r in records], "replace_one"))
        dpsgd = [r for r in records if r.kind == "dp_sgd"]
        sigma = f"{dpsgd[0].noise_multiplier:.3f}" if dpsgd else "off"
        eps_rr = float(config.privacy.label_epsilon or math.nan)
        noise = config.privacy.gradient_noise_multiplier
        print(f"{eps_rr:>6g} {flip_probability(eps_rr):>6.3f} {noise if noise is not None else '-':>5} "
              f"{rounds:>6} {exchanges:>4} {sigma:>12} {downstream:>14.3f} {epsilon:>12.4f} "
              f"{ceiling['auc']:>8.3f} {ceiling['balanced_accuracy']:>8.3f}")


if __name__ == "__main__":
    main()
