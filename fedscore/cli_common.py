"""What every fedscore command shares: one console, one way to show an error the user can fix, and the helpers
several command modules use (progress bar, shared secret, the run report), kept here so that no command module
imports another (cli.py registers cli_deploy's commands; cli_deploy needs these).

Such an error (bad data or config, a bad model folder, a missing file, a port in use, bad TLS material, a party
home that does not allow serving this model, a refused run, a damaged privacy ledger) is one red line and exit
code 2, never a traceback.
Only the exception types of modules already loaded are checked (a module never imported raised none of its errors), so
`fedscore --help` and a refused command load none of the heavy ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedscore.shared.metrics import METRIC_KEYS, METRIC_LABELS
from fedscore.shared.run_folder import RunFolder

console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


# the errors a user can fix, by module: a module that was never imported raised none of its errors, so a refused
# command reports its reason without first importing torch and the accountants (fedscore.shared.privacy) for them
_FIXABLE = {"fedscore.clients.payment.release_guard": "GuardRefused", "fedscore.clients.payment.served": "ServedError",
            "fedscore.shared.config": "ConfigError", "fedscore.shared.data.tables": "DataError",
            "fedscore.shared.privacy.ledger_store": "LedgerDamaged", "fedscore.shared.run_folder": "RunError",
            "fedscore.shared.tls": "TlsError"}


def _fixable() -> tuple[type[BaseException], ...]:
    loaded = [getattr(sys.modules[module], name) for module, name in _FIXABLE.items() if module in sys.modules]
    return (OSError, *loaded)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into `fail`; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, _fixable()):
            fail(str(exc))
        raise


@contextmanager
def progress_bar() -> Iterator[Callable[[str, int, int], None]]:
    """A live progress bar; yields the (stage, done, total) callback a runner reports to."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("starting", total=1)

        def update(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=max(total, 1))

        yield update


def read_secret(path: Path | None) -> str | None:
    """The parties' shared secret from a hex file (`--secret-file`), checked; None without a file."""
    if path is None:
        return None
    try:
        text = path.read_text().strip()
        bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        fail(f"{path}: not a readable hex secret ({exc})")
    if len(text) < 32:
        fail(f"{path}: secret too short (need at least 16 bytes as hex)")
    return text


def report_run(metrics: dict, run_dir: Path) -> None:
    """What a finished run prints: the test metrics beside the references, traffic, keys, privacy, artefacts."""
    table = Table(title=f"test split ({metrics['transport']} transport)")
    for column in ("model", *(METRIC_LABELS[k] for k in METRIC_KEYS)):
        table.add_column(column, justify="right" if column != "model" else "left")

    def row(name: str, m: dict) -> None:
        table.add_row(name, *(f"{m[k]:.4f}" for k in METRIC_KEYS))

    row("federated (payment + lender)", metrics["test"])
    # the references are not in RUN_DIR's shared files: read from the lender's own folder and the local operator's
    # (present only where one operator holds everything, as here)
    from fedscore.baselines import local_evaluation

    local = local_evaluation(run_dir)
    if local.get("lender_only"):
        row(f"lender only ({local['lender_only'].get('model', 'mlp')})", local["lender_only"])
    if local.get("centralized"):
        row(f"centralized, no privacy ({local['centralized']['model']})", local["centralized"])
    console.print(table)
    if local.get("lender_only") or local.get("centralized"):
        console.print("references from parties/ (the lender's own evaluation; the centralized one needs both "
                      "parties' data: local simulation only), not in RUN_DIR's shared files")
    lift_summary(run_dir)
    a = metrics["alignment"]
    console.print(f"aligned {int(a['intersection'])} of {int(a['lender_rows'])} applicants; "
                  f"{metrics['traffic']['messages']} messages, {metrics['traffic']['payload_bytes'] / 1e6:.1f} MB "
                  f"of payloads; {metrics['timing']['total_s']:.1f} s")
    if "e2e" in metrics:
        prints = metrics["e2e"]["fingerprints"]
        console.print(f"payloads end-to-end encrypted; key fingerprints (compare out of band): payment "
                      f"{prints['payment']}, lender {prints['lender']}" if prints else
                      "payloads end-to-end encrypted between the parties (they compare their key fingerprints "
                      "between them; the coordinator holds neither key)")
    folder = RunFolder(run_dir)
    privacy = folder.read_json(folder.privacy_report)
    if privacy.get("void"):
        console.print(f"[bold red]VOID:[/] {privacy['void']}")
    for g in privacy["guarantees"]:
        status = "[bold red]VOID[/] " if g.get("status") == "VOID" else ""
        lifetime = (f"; this run {g['run_epsilon']:.3f}" if g.get("run_epsilon") is not None
                    and abs(g["run_epsilon"] - g["epsilon"]) > 1e-9 else "")
        ceiling = g.get("attack_ceiling")
        best = (f"; best attack AUC {ceiling['auc']:.3f}, accuracy {ceiling['balanced_accuracy']:.3f}"
                if ceiling else "")
        mixture = ", RR mixture" if g.get("composition") == "rr_mixture" else ""
        console.print(f"privacy: {status}{g['protects']} against {g['against']}: eps {g['epsilon']:.3f} over the "
                      f"party's lifetime{lifetime} (delta {g['delta']:g}, {g['accountant']}{mixture}){best}")
    for u in privacy["unprotected"]:
        console.print(f"[yellow]not protected:[/] {u['protects']} against {u['against']}: {u['what']}")
    model = "model/" if folder.model.exists() else "(no model/: each party keeps its part; `fedscore bundle`)"
    console.print(f"artefacts: {run_dir}/report.html, metrics.json, privacy-report.json, {model}, parties/ (each "
                  "party's own folder; the lender's own evaluation in parties/lender/evaluation.json)")


def lift_summary(run_dir: Path) -> None:
    """The lift kept beside the AUCs, from RUN_DIR/parties/evaluation/ (local runs: the operator holds both
    parties' data)."""
    from fedscore.references import read_evaluation

    record = read_evaluation(run_dir)
    if record is None:
        return
    lift = record["lift_kept"]
    kept = f"[bold]{lift:.0%}[/bold] of the lift" if lift is not None else f"n/a ({record['lift_kept_note']})"
    refs = record["references"]
    console.print(f"lift kept: {kept} (federated AUC {record['federated_test_auc']:.4f}; tuned GBDT references "
                  f"chosen on validation: lender only {record['lender_only_auc']:.4f}, ceiling (all columns) "
                  f"{record['ceiling_auc']:.4f}; {refs['test']} test users) - {record['scope']}, "
                  f"{run_dir}/parties/evaluation/")
