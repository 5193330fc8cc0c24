"""RUN_DIR/privacy-report.json: every guarantee, per party, per user, recomputable without our code.

Built from the lifetime ledgers the parties reported (their mechanism records, never data). A guarantee composes
everything the parties ever charged under it (each entry names its run), so a second run on the same people shows
both runs and the lifetime epsilon; `run_epsilon` is this run's share alone. A `joint.*` guarantee (both released
parts, seen by an outsider) composes the records of both parties' ledgers: each party charges only the steps it
took. Against a party ("payment", "lender") the epsilon is the honest per-user figure with no subsampling
amplification: both parties see who is in each exchange. Only the "outsider" view (who sees the released model)
uses Poisson-sampled DP-SGD accounting.

`releases` lists, per party, everything that leaves it and under which guarantee, with what is deliberately
disclosed without DP named "unprotected" and what is derived from public declarations named "public". Everything in
RUN_DIR's top-level files is one of these items (tests/test_run_dir_release.py walks it); what the lender computes
from its labels for itself (default rate, lender-only baseline, training loss) stays in its own folder.
"""

from __future__ import annotations

from typing import Any

from fedscore.shared.config import FedConfig
from fedscore.shared.protocol.bodies import LedgerReport

VIEWS = {
    "payment": "honest per-user epsilon against the payment holder (no subsampling amplification)",
    "lender": "honest per-user epsilon against the lender (no subsampling amplification)",
    "outsider": "against whoever sees the released model parts (Poisson-sampled DP-SGD, amplification applies to "
                "it; the payment part's statistics fit is not subsampled)",
}

VOID_REASON = ("privacy.replayable_noise=true: every privacy draw was derived from the run's seed, so anyone who "
               "knows the config can replay the noise, the label flips and the DP-SGD sampling. No guarantee holds; "
               "this mode exists for tests only.")


def build_privacy_report(config: FedConfig, ledgers: dict[str, Any], refusal: dict[str, str] | None,
                         run_id: str = "") -> dict:
    """`ledgers`: party -> its LedgerReport as outcome.json holds it (validated here, so a malformed one fails
    with the field it lacks)."""
    from fedscore.shared.privacy import account_guarantee, mechanisms_from_dicts
    from fedscore.shared.privacy.accounting import account
    from fedscore.shared.privacy.mechanisms import split_guarantee_key

    privacy = config.privacy
    void = VOID_REASON if privacy.enabled and privacy.replayable_noise else None
    reports = {party: LedgerReport.model_validate(ledger) for party, ledger in ledgers.items()}
    guarantees: list[dict[str, Any]] = []
    keys = list(dict.fromkeys(e.guarantee for report in reports.values() for e in report.entries))
    for key in keys:
        protects, against = split_guarantee_key(key)
        held = {party: [e for e in report.entries if e.guarantee == key] for party, report in reports.items()}
        held = {party: entries for party, entries in held.items() if entries}
        entries = [(party, e) for party, items in held.items() for e in items]
        records = mechanisms_from_dicts([m for _, e in entries for m in e.mechanisms])
        guarantee = account_guarantee(protects, against, records, privacy.delta)  # type: ignore[arg-type]
        this_run = mechanisms_from_dicts([m for _, e in entries if e.run == run_id for m in e.mechanisms])
        runs = list(dict.fromkeys(e.run for _, e in entries))
        guarantees.append({
            **guarantee.to_dict(),
            "status": "VOID" if void else "holds",
            "view": VIEWS[against],
            "scope": f"lifetime of the holding parties' ledgers: {len(runs)} run(s)",
            "run_epsilon": account(this_run, privacy.delta)[0] if run_id else None,
            "runs": runs,
            "held_by": sorted(held),
            "budget": {party: reports[party].budgets.get(key) for party in sorted(held)},
            "per_release": [{"party": party, "run": e.run, "note": e.note, "epsilon_after": e.epsilon_after}
                            for party, e in entries],
        })
    return {
        "delta": privacy.delta,
        "enabled": privacy.enabled,
        "void": void,
        "run_id": run_id,
        "guarantees": guarantees,
        "unprotected": _unprotected(config),
        "releases": releases(config),
        "refusal": refusal,
        "settings": privacy.model_dump(),
        "notes": [
            "epsilon is per user, worst case over users, at the stated delta, composed over each party's lifetime "
            "ledger (every run it took part in)",
            "every draw a guarantee rests on comes from a ChaCha20 keystream keyed from the operating system, "
            "never from the seed" if not void else "VOID: draws were derived from the seed (test mode)",
            "validation/test labels are used only for the aggregate metrics the lender shares; metrics.json is "
            "evaluation-only and never ships in model/",
            "the lender's own evaluation (default rate, lender-only baseline, training loss over its training "
            "labels) stays in its own folder (parties/lender/evaluation.json) and is not released",
            "the last round's gradients are never computed: R rounds give the payment holder R-1 gradient exchanges",
            "the lender's own features are not protected against the payment holder (out of scope)",
            "lender.labels@payment composes everything the payment holder receives that depends on the training "
            "labels: randomized response, then (computed from its output) the lender's DP-SGD steps (Poisson "
            "batches it never sees) and every gradient exchange (a Gaussian on the residual); composition "
            "'rr_mixture' is the tight bound of that post-processing, never above randomized response's epsilon",
            "attack_ceiling: the best AUC and balanced accuracy any attack can reach at telling a user's two "
            "neighbouring inputs apart (e.g. a training label 0 or 1), implied by the guarantee's privacy profile",
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
                    "what": ("the payment holder's partial logits are" if config.model.payment_output == "partial_logit"
                             else "embeddings are") + " sent to the lender without noise"})
    if not privacy.dp_sgd:
        out.append({"protects": "joint.records", "against": "outsider",
                    "what": "the released model parts are trained without DP-SGD"})
    if config.model.lender_part == "gbdt":
        out.append({"protects": "lender.labels and the lender's columns", "against": "whoever holds the lender part",
                    "what": LENDER_OWN_PART})
    return out


LENDER_OWN_PART = ("the lender part (model/lender_part.onnx) is the lender's own gradient-boosted model, fitted on its "
                   "clean training labels without DP after the last exchange (model.lender_part = 'gbdt'): the lender "
                   "keeps it, as it would a model of its own; the payment holder never receives it nor anything "
                   "computed from it (it serves from the payment part alone), so lender.labels@payment does not "
                   "count it")


def _gradient_noise(privacy) -> str:
    """The gradients' Gaussian noise, named where it runs. It is counted: the lender's model is trained with
    DP-SGD (charged to lender.labels@payment too), so each exchange is a Gaussian on the residual with sensitivity
    1, composed with those steps and mixed behind randomized response (shared/privacy/accounting.py)."""
    if not privacy.gradient_noise_on:
        return ", without Gaussian noise (the exchanges are not DP: the claim is randomized response's alone)"
    where = ("on each residual p - y, along its Jacobian row" if privacy.gradient_noise_shape == "residual"
             else "in every coordinate")
    counted = ("counted in the claim with the lender's DP-SGD steps, behind randomized response (RR mixture)"
               if privacy.dp_sgd else "not counted: without DP-SGD the lender's model carries the labels past it")
    return f", plus Gaussian noise {where} (noise multiplier {privacy.gradient_noise_multiplier:g}): {counted}"


def _guarded(on: bool, guarantee: str) -> str:
    return guarantee if on else "unprotected"


def releases(config: FedConfig) -> dict[str, list[dict[str, str]]]:
    """Per party: each thing that leaves it, who receives it, and what covers it (a guarantee key, "public" for
    what is derived from public declarations only, or "unprotected" for what is disclosed by design)."""
    p = config.privacy
    labels = _guarded(p.labels_protected, "lender.labels@payment")
    features = _guarded(p.features_protected, "payment.features@lender")
    model = _guarded(p.dp_sgd, "joint.records@outsider")
    # the centre and scale are DP statistics charged to joint.records@outsider under DP-SGD (clients/base.py)
    scaling = ("public bounds from the schema; centre and scale: DP statistics under joint.records@outsider"
               if p.dp_scaler else "public: derived from the schema's declared bounds and levels")
    return {
        "payment": [
            {"what": "blinded IDs (ECDH PSI response) and the size of its user set", "to": "lender",
             "covered_by": "unprotected: set size disclosed by design; IDs only as blinded points"},
            {"what": "embeddings of every aligned user, each round", "to": "lender", "covered_by": features},
            {"what": "the payment model's parameters, seen through every embedding", "to": "lender",
             "covered_by": features if p.features_protected else "unprotected"},
            {"what": "payment model part (ONNX weights) in model/", "to": "outsider", "covered_by": model},
            {"what": "preprocessing constants in model/", "to": "outsider", "covered_by": scaling},
            {"what": "online embeddings (fedscore serve payment)", "to": "lender",
             "covered_by": "payment.features@lender, charged per answer in the party's lifetime ledger"},
            {"what": "coarse spend signals online", "to": "lender",
             "covered_by": "withheld unless the payment holder serves with --disclose-signals (then unprotected)"},
            {"what": "the size of its user set and its column count (setup reply)", "to": "coordinator",
             "covered_by": "unprotected: released counts"},
            {"what": "payload sizes and message timing", "to": "coordinator", "covered_by": "unprotected: sizes"},
            {"what": "its privacy ledger's records (mechanisms, budgets, notes; no data)", "to": "coordinator",
             "covered_by": "public: mechanism records"},
        ],
        "lender": [
            {"what": "blinded IDs (ECDH PSI request) and the size of its applicant set", "to": "payment",
             "covered_by": "unprotected: set size disclosed by design"},
            {"what": "sorted HMAC tokens of the intersection", "to": "payment",
             "covered_by": "unprotected: intersection membership disclosed by design"},
            {"what": "per-user gradients for the training users in every round but the last (R-1 exchanges; the "
                     "last round's are never computed), from randomized-response labels" + _gradient_noise(p),
             "to": "payment", "covered_by": labels},
            {"what": "lender model part (ONNX weights) in model/", "to": "outsider",
             "covered_by": f"unprotected: {LENDER_OWN_PART}" if config.model.lender_part == "gbdt" else model},
            {"what": "reason-code references in model/", "to": "outsider",
             "covered_by": "public: declared in the lender's schema"},
            {"what": "preprocessing constants in model/", "to": "outsider", "covered_by": scaling},
            {"what": "validation/test-user metrics per round (AUC, KS, Gini, log loss, Brier) and the thinned test "
                     "ROC/KS curves (outcome.json, metrics.json, report.html)", "to": "coordinator",
             "covered_by": "unprotected: validation/test-user metrics the lender chooses to share (computed on "
                           "validation/test users only: no training label enters them)"},
            {"what": "counts: its applicant set, the intersection, the train/validation/test split sizes and its "
                     "column count (alignment.json, outcome.json)", "to": "coordinator",
             "covered_by": "unprotected: released counts"},
            {"what": "payload sizes and message timing", "to": "coordinator", "covered_by": "unprotected: sizes"},
            {"what": "its privacy ledger's records (mechanisms, budgets, notes; no data)", "to": "coordinator",
             "covered_by": "public: mechanism records"},
            {"what": "its own features, through the gradients", "to": "payment",
             "covered_by": "unprotected: out of scope"},
        ],
    }
