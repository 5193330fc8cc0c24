"""RUN_DIR/privacy-report.json: every guarantee, per party, per user, recomputable without our code.

Built from the ledgers the parties reported (their mechanism records, never data). Each guarantee lists the exact
mechanisms behind it in dp-accounting terms, so anyone can recompute its epsilon (see
shared.privacy.recompute_from_report). Against a party ("payment", "lender") the epsilon is the honest per-user
figure with no subsampling amplification: both parties see who is in each exchange. Only the "outsider" view (who
sees the released model) uses Poisson-sampled DP-SGD accounting.
"""

from __future__ import annotations

from typing import Any

from shared.config import FedConfig

VIEWS = {
    "payment": "honest per-user epsilon against the payment holder (no subsampling amplification)",
    "lender": "honest per-user epsilon against the lender (no subsampling amplification)",
    "outsider": "against whoever sees the released model parts (Poisson-sampled DP-SGD, amplification applies)",
}


def build_privacy_report(config: FedConfig, ledgers: dict[str, Any], refusal: dict[str, str] | None) -> dict:
    from shared.privacy import account_guarantee, mechanisms_from_dicts
    from shared.privacy.mechanisms import split_guarantee_key

    privacy = config.privacy
    guarantees: list[dict[str, Any]] = []
    keys = list(dict.fromkeys(e["guarantee"] for ledger in ledgers.values() for e in ledger["entries"]))
    for key in keys:
        protects, against = split_guarantee_key(key)
        candidates = []
        for party, ledger in ledgers.items():
            entries = [e for e in ledger["entries"] if e["guarantee"] == key]
            if entries:
                records = mechanisms_from_dicts([m for e in entries for m in e["mechanisms"]])
                guarantee = account_guarantee(protects, against, records, privacy.delta)  # type: ignore[arg-type]
                candidates.append((guarantee.epsilon, party, entries, guarantee))
        # a joint guarantee is held by both parties with the same records: report the larger (never under-count)
        _, party, entries, guarantee = max(candidates, key=lambda c: c[0])
        guarantees.append({
            **guarantee.to_dict(),
            "view": VIEWS[against],
            "held_by": sorted(c[1] for c in candidates),
            "budget": ledgers[party]["budgets"].get(key),
            "per_release": [{"note": e["note"], "epsilon_after": e["epsilon_after"]} for e in entries],
        })
    return {
        "delta": privacy.delta,
        "enabled": privacy.enabled,
        "guarantees": guarantees,
        "unprotected": _unprotected(config),
        "refusal": refusal,
        "settings": privacy.model_dump(),
        "notes": [
            "epsilon is per user, worst case over users, at the stated delta",
            "validation/test labels are used only for the metrics the lender shares (aggregates)",
            "the lender's own features are not protected against the payment holder (out of scope); the "
            "coordinator sees payload sizes only (payloads are opaque to it)",
        ],
    }


def _unprotected(config: FedConfig) -> list[dict[str, str]]:
    privacy = config.privacy
    out = []
    if not privacy.labels_protected:
        out.append({"protects": "lender.labels", "against": "payment",
                    "what": "gradients computed from clean labels are sent to the payment holder"})
    if not privacy.features_protected:
        out.append({"protects": "payment.features", "against": "lender",
                    "what": "embeddings are sent to the lender without noise"})
    if not privacy.dp_sgd:
        out.append({"protects": "joint.records", "against": "outsider",
                    "what": "the released model parts are trained without DP-SGD"})
    return out
