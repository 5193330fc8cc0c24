"""The run folder (RUN_DIR) as one type: every file name in it, how a run starts in it, and whether it can resume.

Why one type: the launchers (fedscore/), the ServerApp and the coordinator (server/), the report, the audit and the
registry all read and write the same folder. Each used to spell the file names itself and check on its own whether
a folder could be resumed; a renamed file or a forgotten check then broke one path only. Here each name is written
once, and `check_resumable` is the one pre-resume check. It lives in shared/ because the coordinator's side and
the operator's tools both import it (it imports neither).

RUN_DIR/config.json          the validated run config both transports read
RUN_DIR/launch.json          what `--resume` needs to start the same run again: data folder, party homes, budgets,
                             transport, party timeout (no secret: that stays in parties/shared-secret.hex, 0600)
RUN_DIR/checkpoint.json      the coordinator's checkpoint after every exchange (server/coordinator.py), with the one
                             reply payload the next step carries (checkpoint-<step>.payload)
RUN_DIR/run.lock             held (filelock) by the one fedscore process running or resuming the run
RUN_DIR/parties/             each party's OWN state directory (parties/<party>/: on its own machine in a
                             deployment), and, in local runs only, the secret the two parties share, the operator's
                             centralized reference (parties/centralized.json) and the tuned references with the lift
                             kept (parties/evaluation/, fedscore/references.py)
RUN_DIR/outcome.json         what the coordinator returned (validation/test metrics per round, sizes, timing, and
                             the `Refusal` if a party refused or the coordinator failed); a crashed attempt's is kept
                             as outcome-attempt-<n>.json
RUN_DIR/metrics.json         test and validation metrics the lender shared, per-round metrics, counts, timing,
                             transport (evaluation only: never in model/); its presence means the run finished
RUN_DIR/alignment.json       alignment sizes (never IDs)
RUN_DIR/privacy-report.json  the composed privacy report, and report.html rendered from it
RUN_DIR/progress.jsonl       the ServerApp's progress lines, relayed by the launcher
RUN_DIR/transcripts/         what each party received, if it recorded (audit.record_transcripts)
RUN_DIR/flower/              the federation's processes, logs and FLWR_HOME (pids.json); a crashed attempt's is kept
                             as flower-attempt-<n>/
RUN_DIR/model/               the assembled bundle (both ONNX parts and the manifest)

RUN_DIR's top level holds only what reaches the coordinator (privacy-report.json `releases` names each item) and
what is derived from it; tests/test_run_dir_release.py walks it against an allow-list.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fedscore.shared.atomic import write_json_atomic, write_private, write_text_atomic
from fedscore.shared.config import FedConfig
from fedscore.shared.folders import InFolder

PARTIES = ("payment", "lender")
DEFAULT_PARTY_TIMEOUT_S = 180.0


class RunError(RuntimeError):
    """The run could not finish, or a run folder cannot be used as asked; the message says which party, step or
    file and why."""


class NotResumable(RunError):
    """The one refusal of `--resume`: the folder is not a run this version can continue (a file is missing, or the
    run already finished). Nothing has been started or changed when it is raised."""


@dataclass(frozen=True)
class Refusal:
    """Why a run stopped, as outcome.json's `error` records it: a party's refusal (`party` and `request` set: its
    own decision, so resuming would meet it again) or a failure of the coordinator (both empty)."""

    party: str
    request: str
    reason: str

    @classmethod
    def failure(cls, reason: str) -> Refusal:
        return cls(party="", request="", reason=reason)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Launch(BaseModel):
    """RUN_DIR/launch.json: everything but the config and the secret that `--resume RUN_DIR` needs (the party
    homes resolved, so a resume from another working directory finds the same ledgers)."""

    model_config = ConfigDict(extra="ignore")

    data: str
    transport: Literal["inprocess", "flower"]
    budgets: dict[str, dict[str, float]]
    homes: dict[str, str]
    party_timeout_s: float = DEFAULT_PARTY_TIMEOUT_S
    insecure: bool = False

    @classmethod
    def of(cls, data_dir: Path, transport: Literal["inprocess", "flower"], budgets: dict[str, dict[str, float]],
           homes: dict[str, Path], party_timeout_s: float = DEFAULT_PARTY_TIMEOUT_S,
           insecure: bool = False) -> Launch:
        return cls(data=str(Path(data_dir).resolve()), transport=transport, budgets=budgets,
                   homes={p: str(Path(h).expanduser().resolve()) for p, h in homes.items()},
                   party_timeout_s=party_timeout_s, insecure=insecure)

    def home_paths(self) -> dict[str, Path]:
        return {party: Path(home) for party, home in self.homes.items()}


@dataclass(frozen=True)
class RunFolder:
    """One run folder. Paths are attributes; nothing is created until a method writes."""

    root: Path

    CONFIG = "config.json"
    LAUNCH = "launch.json"
    CHECKPOINT = "checkpoint.json"
    LOCK = "run.lock"
    OUTCOME = "outcome.json"
    METRICS = "metrics.json"
    ALIGNMENT = "alignment.json"
    PRIVACY_REPORT = "privacy-report.json"
    REPORT_HTML = "report.html"
    AUDIT = "audit.json"
    AUDIT_PLOT = "audit.png"
    PROGRESS = "progress.jsonl"
    TRANSCRIPTS = "transcripts"
    FLOWER = "flower"
    PIDS = "pids.json"  # in flower/: every federation process of the attempt
    CAPTURE = "capture"
    MODEL = "model"
    PARTIES = "parties"
    SECRET = "shared-secret.hex"  # in parties/: local runs only, 0600

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- paths ---------------------------------------------------------------------------------------------------
    config = InFolder(CONFIG)
    launch = InFolder(LAUNCH)
    checkpoint = InFolder(CHECKPOINT)
    lock_file = InFolder(LOCK)
    outcome = InFolder(OUTCOME)
    metrics = InFolder(METRICS)
    alignment = InFolder(ALIGNMENT)
    privacy_report = InFolder(PRIVACY_REPORT)
    report_html = InFolder(REPORT_HTML)
    audit = InFolder(AUDIT)
    audit_plot = InFolder(AUDIT_PLOT)
    progress = InFolder(PROGRESS)
    transcripts = InFolder(TRANSCRIPTS)
    flower = InFolder(FLOWER)
    capture = InFolder(CAPTURE)
    model = InFolder(MODEL)
    parties = InFolder(PARTIES)

    @property
    def pids(self) -> Path:
        return self.flower / self.PIDS

    @property
    def secret(self) -> Path:
        return self.parties / self.SECRET

    def party_state(self, party: str) -> Path:
        """The party's own state folder in a local run (on its own machine in a deployment)."""
        return self.parties / party

    # -- reading -------------------------------------------------------------------------------------------------
    def read_config(self) -> FedConfig:
        return FedConfig.model_validate_json(self.config.read_text())

    def read_launch(self) -> Launch:
        return Launch.model_validate_json(self.launch.read_text())

    def read_secret(self) -> str:
        return self.secret.read_text().strip()

    def read_outcome(self) -> dict[str, Any]:
        return json.loads(self.outcome.read_text())

    def read_json(self, path: Path) -> dict[str, Any]:
        return json.loads(path.read_text())

    @property
    def finished(self) -> bool:
        """metrics.json is written last of a run's own files (the report and bundle follow from it)."""
        return self.metrics.exists()

    # -- starting a run ------------------------------------------------------------------------------------------
    def create(self, config: FedConfig, secret: str | None = None, *, shared_secret: bool = True) -> str:
        """Make the folder, write the config, and keep the secret the two parties share for this run (returned).

        The secret keys the alignment tokens and the split, so the same secret and seed give the same model. It is a
        fresh random one unless given; in a real deployment the parties agree it between them, never via the server:
        `fedscore run` (the coordinator) passes shared_secret=False and no secret reaches its folder. Refuses a
        folder that holds anything but a `flower/` (the launcher may have made it first)."""
        if self.root.exists() and any(p.name != self.FLOWER for p in self.root.iterdir()):
            raise RunError(f"{self.root}: exists and is not empty; choose a new --out folder")
        self.parties.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.config, config.model_dump_json(indent=2))
        if not shared_secret:
            return ""
        secret = secret or secrets.token_hex(16)
        write_private(self.secret, secret)
        return secret

    def write_launch(self, launch: Launch) -> None:
        write_json_atomic(self.launch, launch.model_dump())

    def write_outcome(self, outcome: dict[str, Any], error: Refusal | None) -> None:
        write_json_atomic(self.outcome, {**outcome, "error": error.to_dict() if error else None})

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One fedscore process at a time per run folder: a resume while the run (or another resume) still runs
        would have two workers of one party writing the same state."""
        from filelock import FileLock, Timeout

        lock = FileLock(self.lock_file)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise RunError(f"{self.root} is in use by another fedscore process (a run or a resume still running); "
                           "stop it first") from None
        try:
            yield
        finally:
            lock.release()

    # -- resuming ------------------------------------------------------------------------------------------------
    def check_resumable(self, *, local: bool) -> None:
        """The one check before `--resume`, run before anything starts: raises NotResumable naming what is wrong.

        `local`: the launcher plays both parties (`train`/`federate --resume`) and needs launch.json and the
        shared secret; the coordinator of a deployment (`fedscore run --resume`) has neither. Every resume needs the
        config and the coordinator's checkpoint, a run that has not finished, and a checkpoint with steps left."""
        needed = [self.config, self.launch, self.secret] if local else [self.config]
        for path in needed:
            if not path.exists():
                raise NotResumable(f"{self.root}: no {path.relative_to(self.root)}: not a run folder this version "
                                   "can resume")
        if self.finished:
            raise NotResumable(f"{self.root}: the run already finished ({self.METRICS} exists); nothing to resume")
        if not self.checkpoint.exists():
            raise NotResumable(f"{self.root}: no {self.CHECKPOINT}: nothing to resume (the run stopped before its "
                               "coordinator started); start a new run (what the parties charged stays charged)")
        checkpoint = json.loads(self.checkpoint.read_text())
        if checkpoint["next_step"] >= checkpoint["total_steps"]:
            raise NotResumable(f"{self.root}: run {checkpoint['run_id']!r} already finished all its steps")

    def new_attempt(self) -> None:
        """Set the crashed attempt aside before a resume starts again: its outcome (its failure) becomes
        outcome-attempt-<n>.json and its Flower folder flower-attempt-<n>/; the resumed run writes anew."""
        if self.outcome.exists():
            n = len(list(self.root.glob("outcome-attempt-*.json"))) + 1
            self.outcome.rename(self.root / f"outcome-attempt-{n}.json")
        if self.flower.exists():
            n = len(list(self.root.glob("flower-attempt-*"))) + 1
            self.flower.rename(self.root / f"flower-attempt-{n}")

    def resume_hint(self) -> str:
        """What to do after a run's processes died, once the coordinator has a checkpoint to continue from."""
        if not self.checkpoint.exists() or not self.launch.exists():
            return ""
        command = "federate" if self.read_launch().transport == "flower" else "train"
        return (f"\nthe run is checkpointed in {self.root}: once every party can run again, continue it with "
                f"`fedscore {command} --resume {self.root}`")
