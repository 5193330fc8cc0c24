"""`fedscore score` (batch) and `fedscore serve payment|lender` (online), registered by fedscore.cli.

Kept apart from fedscore/cli.py so the training CLI does not grow; imports stay inside the commands so that
`fedscore --help` does not load onnxruntime, grpc or FastAPI.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
serve_app = typer.Typer(help="Online federated scoring: the payment holder's gRPC service and the lender's HTTP API.",
                        no_args_is_help=True)

ModelOpt = Annotated[Path, typer.Option("--model", help="model folder: RUN_DIR/model with manifest.json")]
DataOpt = Annotated[Path, typer.Option("--data", help="DIR with payment/ and/or lender/")]
HostOpt = Annotated[str, typer.Option("--host", help="interface to listen on (loopback by default)")]


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors a user can fix (bad data, bad model folder, missing file, port in use): one red line, exit code 2."""
    from shared.tables import DataError

    try:
        yield
    except (DataError, FileNotFoundError, OSError) as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None


def score_command(model: ModelOpt, data: DataOpt,
                  out: Annotated[Path, typer.Option("--out", help="scores CSV to write")],
                  blacklist: Annotated[Path | None, typer.Option(
                      "--blacklist", help="ids to decline (CSV/Parquet with an id column, or one id per line)")] = None,
                  threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads")] = 1) -> None:
    """Score every applicant in DIR/lender with the exported model (onnxruntime only) and write a CSV."""
    from fedscore.scoring import read_blacklist, score_batch, write_scores

    with _user_errors():
        ids = read_blacklist(blacklist) if blacklist is not None else None
        frame = score_batch(model, data, ids, threads)
        write_scores(frame, out)
    no_history = frame["reasons"].str.contains("no payment history", regex=False).sum()
    tiers = ", ".join(f"{t} {n}" for t, n in sorted(frame["tier"].value_counts().items()))
    console.print(f"wrote {out}: {len(frame)} applicants scored ({tiers}); {int(frame['review_flag'].sum())} for "
                  f"review, {int(no_history)} without payment history")


@serve_app.command("payment")
def serve_payment_command(model: ModelOpt, data: DataOpt,
                          port: Annotated[int, typer.Option(min=1, max=65535)] = 50061,
                          host: HostOpt = "127.0.0.1",
                          state_dir: Annotated[Path | None, typer.Option(
                              "--state-dir", help="the payment party's state dir (RUN_DIR/parties/payment): its "
                              "ledger and noise; every answer is then charged as a release")] = None,
                          budget: Annotated[list[str] | None, typer.Option(
                              "--budget", help="guarantee=eps for this party (default: the run's targets)")] = None,
                          ) -> None:
    """The payment holder: featurise DIR/payment once, then answer GetEmbedding over gRPC."""
    from clients.payment.service import run_payment_service

    with _user_errors():
        guard = _ledger_guard(model, state_dir, budget) if state_dir is not None else None
        console.print(f"loading {data / 'payment'} and the payment part from {model} ...")
        run_payment_service(model, data, host, port, guard=guard, on_ready=console.print)


def _ledger_guard(model: Path, state_dir: Path, budget: list[str] | None):
    from clients.base import parse_budgets
    from clients.payment.release_guard import LedgerGuard
    from fedscore.runs import default_budgets
    from shared.config import FedConfig
    from shared.manifest import load_manifest

    config = FedConfig.model_validate(load_manifest(model).training_config)
    budgets = default_budgets(config)["payment"]
    budgets.update(parse_budgets(";".join(budget or [])))
    return LedgerGuard.from_run(state_dir, config.privacy, budgets)


@serve_app.command("lender")
def serve_lender_command(model: ModelOpt, data: DataOpt,
                         payment_address: Annotated[str, typer.Option(
                             "--payment-address", help="host:port of the payment holder's gRPC service")],
                         port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
                         host: HostOpt = "127.0.0.1",
                         timeout: Annotated[float, typer.Option(min=0.01, help="payment call deadline, s")] = 2.0,
                         blacklist: Annotated[Path | None, typer.Option(help="ids to decline")] = None) -> None:
    """The lender: POST /score {"id": ...} over HTTP, asking the payment service for the embedding."""
    from clients.lender.service import run_lender_service
    from fedscore.scoring import read_blacklist

    with _user_errors():
        ids = read_blacklist(blacklist) if blacklist is not None else None
        console.print(f"lender service on http://{host}:{port} (payment service at {payment_address})")
        run_lender_service(model, data, payment_address, host, port, timeout, ids)


def _standalone() -> None:
    """`python -m fedscore.cli_scoring ...` works before the commands are registered in fedscore.cli."""
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    app.command("score")(score_command)
    app.add_typer(serve_app, name="serve")
    app()


if __name__ == "__main__":
    _standalone()
