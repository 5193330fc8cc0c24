"""Retraining on a new window under the parties' lifetime budgets (issue 21): warm start, the account, refusals.

Warm start: each party starts its part from its own part of the previous version (RUN_DIR/parties/<party>/state.pt,
the weights it exported and released with that version), instead of the seeded initialisation. That costs no
privacy: the previous parts were released (DP-SGD, charged to the ledgers when they were trained), so starting
from them is post-processing of what was already charged. Everything the new run releases is charged again, to the
same lifetime ledgers: the ledgers compose every version's releases per user, worst case over users (a user in
both windows; the ledger does not know who was in which run, so it assumes everyone was).

The account is built from the ledger's public API (shared/privacy/ledger.py: Ledger.entries, Ledger.check,
BudgetExceeded): per guarantee and per run, what that run charged alone and the cumulative eps after it, and, at the
size of the previous version (the same records again, under a fresh randomized-response draw), how many more
retrains the budgets allow. A retrain the budgets cannot cover is refused before anything is charged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedscore.budgets import Budgets
from fedscore.local_parties import Homes
from fedscore.shared.run_folder import RunError, RunFolder

MAX_PROJECTED = 5  # retrains projected at most (5 means "5 or more"): each probe is a full PLD composition


@dataclass
class RunCharge:
    run: str
    charges: int
    epsilon_alone: float  # this run's records composed on their own
    cumulative: float  # the guarantee's lifetime eps after this run's last charge


@dataclass
class GuaranteeAccount:
    party: str
    guarantee: str
    spent: float
    budget: float | None
    runs: list[RunCharge] = field(default_factory=list)
    next_would_be: float | None = None  # after one more retrain at the previous version's size
    retrains_left: int | None = None  # how many more such retrains fit in the budget (None: nothing to project)

    @property
    def remaining(self) -> float | None:
        return None if self.budget is None else max(0.0, self.budget - self.spent)


def _ledger(home: Path, party: str, budgets: dict[str, float], delta: float):
    from fedscore.shared.party_home import PartyHome
    from fedscore.shared.privacy.ledger import Ledger

    return Ledger(PartyHome(home).ledger, budgets, delta, party=party)


def _renamed(items: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """A run's records as a new run would make them: its own randomized-response draw (a new name), nothing else
    changed, so the projection composes them as a separate draw, never as post-processing of the old one."""
    out = []
    for item in items:
        item = dict(item)
        for key in ("draw", "computed_from"):
            if item.get(key):
                item[key] = f"{item[key]}#{tag}"
        out.append(item)
    return out


def account(home: Path, party: str, budgets: dict[str, float], delta: float,
            template_run: str | None = None, max_k: int | None = None) -> list[GuaranteeAccount]:
    """The party's account per guarantee, and with `template_run` the projection of up to `max_k` (default
    MAX_PROJECTED) more runs like it: `retrains_left == max_k` reads "max_k or more"."""
    from fedscore.shared.privacy.accounting import account as compose
    from fedscore.shared.privacy.mechanisms import mechanisms_from_dicts

    ledger = _ledger(home, party, budgets, delta)
    entries = ledger.entries
    result = []
    for guarantee in dict.fromkeys([*budgets, *(e["guarantee"] for e in entries)]):
        mine = [e for e in entries if e["guarantee"] == guarantee]
        runs: dict[str, list[dict[str, Any]]] = {}
        for e in mine:  # the monitor's releases (run "monitor:<data>") are one line: monitoring
            run = e.get("run", "")
            runs.setdefault("monitoring" if run.startswith("monitor:") else run, []).append(e)
        charges = [RunCharge(run=run or "(untagged)", charges=len(es),
                             epsilon_alone=compose(mechanisms_from_dicts([m for e in es for m in e["mechanisms"]]),
                                                   delta)[0],
                             cumulative=float(es[-1]["epsilon_after"])) for run, es in runs.items()]
        item = GuaranteeAccount(party, guarantee, ledger.epsilon(guarantee) if mine else 0.0,
                                budgets.get(guarantee), charges)
        template = [m for e in runs.get(template_run or "", []) for m in e["mechanisms"]]
        if template:
            item.retrains_left, item.next_would_be = _project(ledger, guarantee, template, max_k or MAX_PROJECTED)
        result.append(item)
    return result


def _project(ledger: Any, guarantee: str, template: list[dict[str, Any]], cap: int) -> tuple[int, float]:
    """(how many more runs like `template` the budget takes, capped at `cap`; eps after one more): doubling, then
    bisection, each probe one Ledger.check (nothing recorded). A probe of k runs composes k more randomized-response
    draws, so its cost grows with k: the preflight asks for one, the report for a few."""
    from fedscore.shared.privacy.ledger import BudgetExceeded
    from fedscore.shared.privacy.mechanisms import mechanisms_from_dicts

    def fits(k: int) -> tuple[bool, float]:
        planned = [m for j in range(1, k + 1) for m in _renamed(template, f"projected-{j}")]
        try:
            return True, ledger.check(mechanisms_from_dicts(planned), guarantee)
        except BudgetExceeded as exc:
            return False, exc.would_be

    ok, next_eps = fits(1)
    if not ok:
        return 0, next_eps
    good, bad = 1, None
    while bad is None and good < cap:
        k = min(2 * good, cap)
        if fits(k)[0]:
            good = k
        else:
            bad = k
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid)[0] else (good, mid)
    return good, next_eps


def run_id_of(run_dir: Path) -> str:
    """The id every ledger entry of that run is tagged with (RUN_DIR/outcome.json)."""
    path = RunFolder(run_dir).outcome
    if not path.exists():
        raise RunError(f"{run_dir}: no {path.name} (not a finished run folder)")
    run_id = json.loads(path.read_text()).get("run_id", "")
    if not run_id:
        raise RunError(f"{path}: no run_id: cannot find this version's charges in the ledgers")
    return str(run_id)


class RetrainRefused(RunError):
    """A retrain the budgets cannot cover: the message is the whole account and the ways forward."""


def refusal_text(blocking: list[GuaranteeAccount], homes: Homes) -> str:
    lines = ["retrain refused before anything was charged or released: the parties' lifetime budgets cannot "
             "cover another version at this size"]
    for g in blocking:
        budget = "none set" if g.budget is None else f"{g.budget:.4g}"
        lines.append(f"  {g.party}: {g.guarantee}: spent eps {g.spent:.4g} of budget {budget} "
                     f"(left {0.0 if g.remaining is None else g.remaining:.4g}); this retrain would take it to "
                     f"{g.next_would_be:.4g}" if g.next_would_be is not None else
                     f"  {g.party}: {g.guarantee}: spent eps {g.spent:.4g}, budget {budget}")
        for r in g.runs:
            lines.append(f"      run {r.run}: {r.charges} charge(s), eps {r.epsilon_alone:.4g} alone, "
                         f"{r.cumulative:.4g} cumulative after it")
    need = ", ".join(f"--budget {g.party}:{g.guarantee}={g.next_would_be * 1.001:.3g}" for g in blocking
                     if g.next_would_be is not None)
    lines += ["ways forward:",
              f"  - a larger lifetime budget, if each party's policy allows it: {need or '--budget party:key=EPS'}",
              "  - a window of new people only: the ledger composes worst case over users (it assumes everyone was "
              "in every run), so a cohort of people never in an earlier run is accounted on its own only in a "
              "home of its own (--party-home payment=DIR --party-home lender=DIR) and only if no person in it was "
              "in an earlier window; the lender can check that on its own applicants",
              "  - synthetic experiments: a separate home that real people's ledgers never see, e.g. "
              "FEDSCORE_HOME=$(mktemp -d) or --party-home party=DIR",
              "  - fewer releases per version (e.g. --set training.rounds=2, or larger noise) make each retrain "
              "cheaper",
              f"party homes: {', '.join(f'{p}={h}' for p, h in homes.items())}"]
    return "\n".join(lines)


def preflight(from_run: Path, budgets: Budgets, homes: Homes, delta: float) -> dict[str, list[GuaranteeAccount]]:
    """Each party's account with the previous version as the template; RetrainRefused if any guarantee cannot
    take one more version."""
    template = run_id_of(from_run)
    accounts = {party: account(homes[party], party, budgets.get(party, {}), delta, template, max_k=1)
                for party in ("payment", "lender")}
    for party, items in accounts.items():
        if budgets.get(party) and not any(r.run == template for g in items for r in g.runs):
            raise RetrainRefused(f"{party}: its ledger ({homes[party]}) holds no charge of the previous version's run "
                                 f"{template}: these are not the homes that trained {from_run}, so the account "
                                 "would leave that version out; give the same --party-home (or FEDSCORE_HOME) as "
                                 "that run (RUN_DIR/launch.json lists them)")
    blocking = [g for gs in accounts.values() for g in gs if g.retrains_left == 0]
    if blocking:
        raise RetrainRefused(refusal_text(blocking, homes))
    return accounts


def accounts_json(accounts: dict[str, list[GuaranteeAccount]]) -> dict[str, Any]:
    from dataclasses import asdict

    return {party: [{**asdict(g), "remaining": g.remaining} for g in gs] for party, gs in accounts.items()}


# ---------------------------------------------------------------------------------------------- warm start


def previous_weights(from_run: Path) -> dict[str, dict[str, Any]]:
    """Each party's final weights of the previous version, from its own state folder."""
    from fedscore.clients.state_store import read_state

    weights = {}
    for party in ("payment", "lender"):
        path = RunFolder(from_run).party_state(party) / "state.pt"
        if not path.exists():
            raise RunError(f"{path}: missing: the {party}'s part of the previous version is not here to warm-start "
                           "from (in a deployment each party warm-starts from its own state folder)")
        state = read_state(path)
        if "model" not in state:
            raise RunError(f"{path}: no trained model in the {party}'s state (was the run finished?)")
        weights[party] = state["model"]
    return weights


def _load_warm(party: Any, weights: dict[str, Any]) -> None:
    current = party.state.get("model")
    if current is None:
        return
    shapes = {k: tuple(v.shape) for k, v in current.items()}
    given = {k: tuple(v.shape) for k, v in weights.items()}
    if shapes != given:
        raise RunError(f"{party.name}: cannot warm-start: the previous version's part has shapes {given}, this "
                       f"run's {shapes} (a different schema or model config)")
    party.state["model"] = {k: v.clone() for k, v in weights.items()}


def warm_parties(settings: dict[str, Any], weights: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The two parties, each replacing its freshly initialised part by its previous one right after alignment
    (where each initialises its model), before any training or release."""
    from fedscore.clients.lender.party import LenderParty
    from fedscore.clients.payment.party import PaymentParty

    class WarmPayment(PaymentParty):
        def _accept_alignment(self, payload: bytes) -> int:
            n = super()._accept_alignment(payload)
            _load_warm(self, weights["payment"])
            return n

    class WarmLender(LenderParty):
        def on_align_match(self, message):  # type: ignore[no-untyped-def]
            reply = super().on_align_match(message)
            if not reply.header.error:
                _load_warm(self, weights["lender"])
            return reply

    return {"payment": WarmPayment(settings["payment"]), "lender": WarmLender(settings["lender"])}


def run_warm(config: Any, data_dir: Path, run_dir: Path, from_run: Path | None, progress: Any = None,
             budgets: Budgets | None = None, homes: Homes | None = None) -> dict[str, Any]:
    """`runs.run_inprocess` with warm-started parties (from_run None: a fresh start, the from-scratch reference)."""
    from fedscore.local_parties import check_data_dir
    from fedscore.runs import run_inprocess

    check_data_dir(data_dir)
    weights = previous_weights(from_run) if from_run is not None else None
    warm = (lambda settings: warm_parties(settings, weights)) if weights is not None else None
    return run_inprocess(config, data_dir, run_dir, progress, budgets=budgets, homes=homes, parties=warm)
