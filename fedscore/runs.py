"""A run folder and what fills it, for both transports.

RUN_DIR/config.json      the validated run config both transports read
RUN_DIR/launch.json      what `--resume` needs to start the same run again: data folder, party homes, budgets,
                         transport, party timeout (no secret: that stays in parties/shared-secret.hex, 0600)
RUN_DIR/checkpoint.json  the coordinator's checkpoint after every exchange (server/coordinator.py), with the one
                         reply payload the next step carries (checkpoint-<step>.payload)
RUN_DIR/parties/         each party's OWN state directory (parties/<party>/: on its own machine in a deployment),
                         and, in local runs only, the secret the two parties share and the operator's centralized
                         reference (parties/centralized.json) and the tuned references with the lift kept
                         (parties/evaluation/, fedscore/references.py); the lender's own evaluation (lender-only
                         baseline, training loss, default rate) is parties/lender/evaluation.json
RUN_DIR/outcome.json     what the coordinator returned (validation/test metrics per round, sizes, timing, refusal)
RUN_DIR/metrics.json     test and validation metrics the lender shared, per-round metrics, counts, timing, transport
                         (evaluation only: never in model/)

RUN_DIR's top level holds only what reaches the coordinator (privacy-report.json `releases` names each item) and
what is derived from it; tests/test_run_dir_release.py walks it against an allow-list.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedscore.server.outcome import read_outcome, write_outcome
from fedscore.shared.atomic import write_json_atomic, write_private, write_text_atomic
from fedscore.shared.config import FedConfig
from fedscore.shared.data.tables import DataError
from fedscore.shared.metrics import METRIC_KEYS
from fedscore.shared.privacy.budgets import parse_budget

EVALUATION_ONLY = ("validation/test-user metrics the lender chose to share, computed with its clean validation/test "
                   "labels (no training label enters them); no privacy guarantee covers them, and they never ship in "
                   "model/. The baselines, training loss and default rate are not here: they are the lender's own "
                   "evaluation (parties/lender/evaluation.json) and, in local runs, the operator's centralized "
                   "reference (parties/centralized.json)")


class RunError(RuntimeError):
    """The run could not finish; the message says which party or step and why."""


def check_data_dir(data_dir: Path) -> None:
    for party in ("payment", "lender"):
        if not (data_dir / party).is_dir():
            raise DataError(f"{data_dir}: no {party}/ folder (expected DIR/payment and DIR/lender)")


def prepare_run_dir(run_dir: Path, config: FedConfig, secret: str | None = None, *, shared_secret: bool = True) -> str:
    """Create the run folder, write the config, and keep the secret the two parties share for this run.

    The secret keys the alignment tokens and the split, so the same secret and seed give the same model. It is a
    fresh random one unless given; in a real deployment the parties agree it between them, never via the server:
    `fedscore run` (the coordinator) passes shared_secret=False and no secret reaches its folder.
    """
    if run_dir.exists() and any(p.name != "flower" for p in run_dir.iterdir()):
        raise RunError(f"{run_dir}: exists and is not empty; choose a new --out folder")
    (run_dir / "parties").mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.json", config.model_dump_json(indent=2))
    if not shared_secret:
        return ""
    secret = secret or secrets.token_hex(16)
    secret_file = run_dir / "parties" / "shared-secret.hex"
    write_private(secret_file, secret)
    return secret


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


def with_slack(target: float) -> float:
    """A budget for an exact eps target: the PLD accountant's pessimistic discretisation (interval 1e-4, an
    absolute error) can land a hair above it, e.g. 0.2001 for randomized response at eps 0.2."""
    return target * 1.0001 + 3e-4


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


Homes = dict[str, Path]  # party -> its home (lifetime ledger), see shared/party_home.py


def party_homes(overrides: list[str] | None = None) -> Homes:
    """Each party's home: `$FEDSCORE_HOME/parties/<party>` unless `party=DIR` overrides it."""
    from fedscore.shared.party_home import default_party_home

    homes = {party: default_party_home(party) for party in ("payment", "lender")}
    for item in overrides or []:
        party, sep, path = item.partition("=")
        if not sep or party not in homes or not path:
            raise RunError(f"--party-home {item!r}: expected party=DIR, e.g. lender=/srv/lender-home")
        homes[party] = Path(path)
    return homes


def party_settings(run_dir: Path, data_dir: Path, secret: str, budgets: Budgets | None = None,
                   homes: Homes | None = None) -> dict[str, Any]:
    from fedscore.clients.base import PartySettings
    from fedscore.shared.party_home import ensure_party_home

    budgets = budgets or {}
    homes = {p: ensure_party_home(h) for p, h in (homes or party_homes()).items()}
    keys = pinned_keys(homes)
    return {p: PartySettings(party=p, data_path=(data_dir / p).resolve(),
                             state_dir=(run_dir / "parties" / p).resolve(), home=homes[p],
                             secret=secret, budgets=budgets.get(p, {}), peer_public_key=keys[p])
            for p in ("payment", "lender")}


def pinned_keys(homes: Homes) -> dict[str, str]:
    """For a local run the operator plays both parties: each party's public key (created in its home on first use)
    pinned in the other's settings. In a deployment each operator pins the key the other handed over, after
    comparing its fingerprint out of band."""
    from fedscore.shared.protocol.e2e import public_key_hex

    public = {p: public_key_hex(homes[p]) for p in ("payment", "lender")}
    return {"payment": public["lender"], "lender": public["payment"]}


def key_fingerprints(homes: Homes | None = None) -> dict[str, str]:
    """Each party's public key fingerprint, for the run summary and the outcome (operators compare them)."""
    from fedscore.shared.protocol.e2e import fingerprint, public_key_hex

    homes = homes or party_homes()
    return {p: fingerprint(bytes.fromhex(public_key_hex(homes[p]))) for p in ("payment", "lender")}



Progress = Callable[[str, int, int], None]
LAUNCH_FILE = "launch.json"
DEFAULT_PARTY_TIMEOUT_S = 180.0


def record_launch(run_dir: Path, data_dir: Path, transport: str, budgets: Budgets, homes: Homes | None,
                  party_timeout_s: float = DEFAULT_PARTY_TIMEOUT_S, insecure: bool = False) -> None:
    """Everything but the config and the secret that `--resume RUN_DIR` needs to start the same run again."""
    homes = homes or party_homes()
    write_json_atomic(run_dir / LAUNCH_FILE, {
        "data": str(Path(data_dir).resolve()), "transport": transport, "budgets": budgets,
        "homes": {p: str(Path(h).expanduser().resolve()) for p, h in homes.items()},
        "party_timeout_s": party_timeout_s, "insecure": insecure})


def read_launch(run_dir: Path) -> tuple[FedConfig, Path, str, Budgets, Homes, dict[str, Any]]:
    """(config, data folder, secret, budgets, homes, the whole launch record) of a run folder to resume."""
    import json

    launch_file, secret_file = run_dir / LAUNCH_FILE, run_dir / "parties" / "shared-secret.hex"
    for path in (run_dir / "config.json", launch_file, secret_file):
        if not path.exists():
            raise RunError(f"{run_dir}: no {path.relative_to(run_dir)}: not a run folder this version can resume")
    if (run_dir / "metrics.json").exists():
        raise RunError(f"{run_dir}: the run already finished (metrics.json exists); nothing to resume")
    launch = json.loads(launch_file.read_text())
    config = FedConfig.model_validate_json((run_dir / "config.json").read_text())
    homes = {p: Path(h) for p, h in launch["homes"].items()}
    return config, Path(launch["data"]), secret_file.read_text().strip(), launch["budgets"], homes, launch


def set_aside_outcome(run_dir: Path) -> None:
    """A crashed attempt's outcome (its failure) is kept as outcome-attempt-<n>.json; the resumed run writes anew."""
    outcome = run_dir / "outcome.json"
    if outcome.exists():
        n = len(list(run_dir.glob("outcome-attempt-*.json"))) + 1
        outcome.rename(run_dir / f"outcome-attempt-{n}.json")


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One fedscore process at a time per run folder: a resume while the run (or another resume) still runs would
    have two workers of one party writing the same state."""
    from filelock import FileLock, Timeout

    lock = FileLock(run_dir / "run.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise RunError(f"{run_dir} is in use by another fedscore process (a run or a resume still running); "
                       "stop it first") from None
    try:
        yield
    finally:
        lock.release()


def resume_hint(run_dir: Path) -> str:
    """What to do after a run's processes died, once the coordinator has a checkpoint to continue from."""
    import json

    if not (run_dir / "checkpoint.json").exists() or not (run_dir / LAUNCH_FILE).exists():
        return ""
    command = "federate" if json.loads((run_dir / LAUNCH_FILE).read_text())["transport"] == "flower" else "train"
    return (f"\nthe run is checkpointed in {run_dir}: once every party can run again, continue it with "
            f"`fedscore {command} --resume {run_dir}`")


def run_inprocess(config: FedConfig, data_dir: Path, run_dir: Path, progress: Progress | None = None,
                  secret: str | None = None, budgets: Budgets | None = None,
                  homes: Homes | None = None) -> dict[str, Any]:
    from fedscore.clients.parties import make_party
    from fedscore.server.coordinator import Coordinator, new_run_id
    from fedscore.shared.protocol.transport import InProcessTransport

    check_data_dir(data_dir)
    secret = prepare_run_dir(run_dir, config, secret)
    budgets = default_budgets(config) if budgets is None else budgets
    record_launch(run_dir, data_dir, "inprocess", budgets, homes)
    settings = party_settings(run_dir, data_dir, secret, budgets, homes)
    parties = {name: make_party(s) for name, s in settings.items()}
    coordinator = Coordinator(config, InProcessTransport(parties), progress=progress,
                              run_id=new_run_id(run_dir.name), checkpoint_dir=run_dir)
    with run_lock(run_dir):
        return _run_coordinator(coordinator, run_dir, data_dir, config, secret, homes)


def resume_inprocess(run_dir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Continue a run whose process died: each party object is rebuilt from its state directory and home (model,
    optimizer, DP-SGD plan, alignment, channel counters; lifetime ledger), the coordinator from its checkpoint."""
    from fedscore.clients.parties import make_party
    from fedscore.server.coordinator import CheckpointError, Coordinator
    from fedscore.shared.protocol.transport import InProcessTransport

    config, data_dir, secret, budgets, homes, _ = read_launch(run_dir)
    check_data_dir(data_dir)
    with run_lock(run_dir):
        settings = party_settings(run_dir, data_dir, secret, budgets, homes)
        parties = {name: make_party(s) for name, s in settings.items()}
        try:
            coordinator = Coordinator.resume(config, InProcessTransport(parties), run_dir, progress)
        except CheckpointError as exc:
            raise RunError(str(exc)) from None
        set_aside_outcome(run_dir)
        return _run_coordinator(coordinator, run_dir, data_dir, config, secret, homes)


def _run_coordinator(coordinator: Any, run_dir: Path, data_dir: Path, config: FedConfig, secret: str,
                     homes: Homes | None) -> dict[str, Any]:
    from fedscore.server.coordinator import PartyRefused

    start = time.perf_counter()
    error = None
    try:
        coordinator.run()
    except PartyRefused as exc:
        error = {"party": exc.party, "request": exc.kind, "reason": exc.reason}
    timing = coordinator.result.timing
    timing["federation_s"] = timing.get("federation_s", 0.0) + time.perf_counter() - start
    write_outcome(run_dir, coordinator.result, error)
    return finish_run(run_dir, data_dir, config, secret, homes)


E2E = "X25519 + HKDF-SHA256 + ChaCha20-Poly1305, keys pinned in each party's settings (shared/protocol/e2e.py)"


def finish_run(run_dir: Path, data_dir: Path | None, config: FedConfig, secret: str | None,
               homes: Homes | None = None, fingerprints: dict[str, str] | None = None,
               bundle: bool = True) -> dict[str, Any]:
    """Write metrics.json from the coordinator's outcome (what the lender shared), the report and the bundle; raise
    if the run was refused.

    The centralized reference needs both parties' data and their secret: a local operator playing both has them and
    writes it to RUN_DIR/parties/centralized.json (fedscore/baselines.py), never into the top-level files; the
    coordinator of a deployment (`fedscore run`) has neither (data_dir None). The lender-only baseline is the
    lender's own evaluation, in its own folder. The key fingerprints come from the homes, or are given. `bundle`:
    gather the two exported parts into RUN_DIR/model (a deployment's parts stay on the parties' machines: `fedscore
    bundle`)."""
    from fedscore.clients.transcript import copy_transcripts
    from fedscore.report import write_reports

    copy_transcripts(run_dir)  # what each party received, if it recorded (audit.record_transcripts)
    outcome = read_outcome(run_dir)
    if outcome.get("error"):
        write_reports(run_dir)  # the report says which party refused and what had been released by then
        err = outcome["error"]
        if err.get("party"):  # a party's own decision: resuming would meet the same refusal
            raise RunError(f"run stopped: party {err['party']!r} refused {err['request']!r}: {err['reason']}")
        raise RunError(f"run stopped: the coordinator failed: {err['reason']}{resume_hint(run_dir)}")
    final = outcome["rounds"][-1]
    t0 = time.perf_counter()
    if config.baselines.enabled and data_dir is not None and secret:
        from fedscore.baselines import write_centralized

        write_centralized(run_dir, _centralized(data_dir, config, secret))
    timing = {**outcome["timing"], "baselines_s": time.perf_counter() - t0}
    timing["total_s"] = timing.get("federation_s", 0.0) + timing["baselines_s"]
    metrics = {
        "evaluation_only": EVALUATION_ONLY,
        "transport": outcome["transport"],
        "test": {k: final[f"test_{k}"] for k in METRIC_KEYS},
        "val": {k: final[f"val_{k}"] for k in METRIC_KEYS if f"val_{k}" in final},
        "rounds": outcome["rounds"],
        "alignment": outcome["alignment"],
        "timing": timing,
        "traffic": {"messages": len(outcome["traffic"]),
                    "payload_bytes": sum(t["sent_bytes"] + t["reply_bytes"] for t in outcome["traffic"])},
        # every party-to-party payload was sealed (there is no switch); what operators compare out of band
        "e2e": {"payloads": E2E, "fingerprints": key_fingerprints(homes) if fingerprints is None else fingerprints},
    }
    write_json_atomic(run_dir / "metrics.json", metrics)
    if config.baselines.enabled and config.baselines.references and data_dir is not None and secret:
        # the lift kept between tuned references: the local operator's own evaluation, in RUN_DIR/evaluation/ only
        from fedscore.references import write_evaluation

        t1 = time.perf_counter()
        write_evaluation(run_dir, data_dir, config, secret, metrics["test"]["auc"])
        metrics["timing"]["references_s"] = time.perf_counter() - t1
    write_json_atomic(run_dir / "alignment.json", {  # sizes only, never IDs
        k: outcome["alignment"][k] for k in ("method", "payment_rows", "lender_rows", "intersection", "train",
                                             "val", "test") if k in outcome["alignment"]})
    from fedscore.bundle import assemble_bundle

    privacy = write_reports(run_dir)
    if bundle:
        assemble_bundle(run_dir, config.model_dump(), privacy["guarantees"])
    return metrics


def _centralized(data_dir: Path, config: FedConfig, secret: str) -> dict[str, Any]:
    from fedscore.baselines import centralized_baselines

    return centralized_baselines(data_dir, config, bytes.fromhex(secret))


def run_blacklist(data_dir: Path, run_dir: Path, secret: str | None = None, homes: Homes | None = None) -> Path:
    """The blacklist check between the two local parties; returns the lender's hits file (its own state dir)."""
    from fedscore.clients.parties import make_party
    from fedscore.server.coordinator import PartyRefused, check_blacklist
    from fedscore.shared.protocol.transport import InProcessTransport

    check_data_dir(data_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = party_settings(run_dir, data_dir, secret or secrets.token_hex(16), homes=homes)
    try:
        check_blacklist(InProcessTransport({name: make_party(s) for name, s in settings.items()}))
    except PartyRefused as exc:
        raise RunError(f"blacklist check stopped: {exc}") from exc
    return settings["lender"].state_dir / "blacklist-hits.csv"
