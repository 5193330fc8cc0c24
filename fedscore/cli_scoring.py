"""`fedscore score` (batch) and `fedscore serve payment|lender` (online), registered by fedscore.cli.

Kept apart from fedscore/cli.py so the training CLI does not grow; imports stay inside the commands so that
`fedscore --help` does not load onnxruntime, grpc or FastAPI.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fedscore.cli_common import console, fail, user_errors, warn

if TYPE_CHECKING:
    from fedscore.clients.payment.release_guard import LedgerGuard
    from fedscore.clients.payment.service import PaymentScoringService

serve_app = typer.Typer(help="Online federated scoring: the payment holder's gRPC service and the lender's HTTP API.",
                        no_args_is_help=True)

ModelOpt = Annotated[Path, typer.Option("--model", help="model folder: RUN_DIR/model with manifest.json")]
DataOpt = Annotated[Path, typer.Option("--data", help="DIR with payment/ and/or lender/")]
HostOpt = Annotated[str, typer.Option("--host", help="interface to listen on (loopback by default)")]








def score_command(model: ModelOpt, data: DataOpt,
                  out: Annotated[Path, typer.Option("--out", help="scores CSV to write")],
                  blacklist: Annotated[Path | None, typer.Option(
                      "--blacklist", help="ids to decline (CSV/Parquet with an id column, or one id per line)")] = None,
                  threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads")] = 1) -> None:
    """Score every applicant in DIR/lender with the exported model (onnxruntime only) and write a CSV."""
    from fedscore.scoring import read_blacklist, score_batch, write_scores

    with user_errors():
        ids = read_blacklist(blacklist) if blacklist is not None else None
        frame = score_batch(model, data, ids, threads)
        write_scores(frame, out)
    no_history = frame["reasons"].str.contains("no payment history", regex=False).sum()
    tiers = ", ".join(f"{t} {n}" for t, n in sorted(frame["tier"].value_counts().items()))
    console.print(f"wrote {out}: {len(frame)} applicants scored ({tiers}); {int(frame['review_flag'].sum())} for "
                  f"review, {int(no_history)} without payment history; reasons by {frame.attrs['reasons_by']}")


def _server_credentials(host: str, tls_cert: Path | None, tls_key: Path | None, client_ca: Path | None,
                        insecure_local: bool):  # -> grpc.ServerCredentials | None
    """Mutual TLS, or plaintext on loopback only when asked for by name; anything else stops before loading data."""
    from fedscore.clients.payment.service import LOOPBACK_HOSTS
    from fedscore.shared.tls import mutual_tls_server_credentials

    given = {"--tls-cert": tls_cert, "--tls-key": tls_key, "--client-ca": client_ca}
    if insecure_local:
        if any(v is not None for v in given.values()):
            fail("--insecure-local serves plaintext; drop it to use --tls-cert/--tls-key/--client-ca")
        if host not in LOOPBACK_HOSTS:
            fail(f"--insecure-local binds to loopback only, not {host}; use mutual TLS to listen on {host}")
        return None
    missing = [flag for flag, value in given.items() if value is None]
    if len(missing) == len(given):
        fail("refusing to serve without TLS: pass --tls-cert, --tls-key and --client-ca (the lender's CA; mutual "
              "TLS; `fedscore certs --out DIR` makes a local set), or --insecure-local to serve on 127.0.0.1 only")
    if missing:
        fail(f"mutual TLS needs {', '.join(missing)} as well")
    return mutual_tls_server_credentials(tls_cert, tls_key, client_ca)  # type: ignore[arg-type]


def _payment_budgets(training_config: dict, budget: list[str] | None) -> dict[str, float]:
    """The run's targets for the payment party (what its node config would hold), then --budget overrides."""
    from fedscore.budgets import default_budgets
    from fedscore.clients.payment.release_guard import GuardRefused
    from fedscore.shared.config import FedConfig
    from fedscore.shared.privacy.budgets import parse_budgets

    try:
        config = FedConfig.model_validate(training_config)
        budgets = default_budgets(config)["payment"]
        budgets.update(parse_budgets(budget or []))
    except ValueError as exc:
        raise GuardRefused(f"cannot work out the payment budgets: {' '.join(str(exc).split())}") from None
    return budgets


@serve_app.command("payment")
def serve_payment_command(
        model: ModelOpt, data: DataOpt,
        port: Annotated[int, typer.Option(min=1, max=65535)] = 50061,
        host: HostOpt = "127.0.0.1",
        party_home: Annotated[Path | None, typer.Option(
            "--party-home", help="the payment party's home: ledger, served intersections (default "
            "$FEDSCORE_HOME/parties/payment)")] = None,
        budget: Annotated[list[str] | None, typer.Option(
            "--budget", help="guarantee=eps for this party (default: the run's targets)")] = None,
        tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="server certificate (PEM)")] = None,
        tls_key: Annotated[Path | None, typer.Option("--tls-key", help="server private key (PEM)")] = None,
        client_ca: Annotated[Path | None, typer.Option(
            "--client-ca", help="CA that signed the lender's client certificate (PEM); clients without one are "
            "refused")] = None,
        insecure_local: Annotated[bool, typer.Option(
            "--insecure-local", help="no TLS, bound to 127.0.0.1 only (tests, one machine)")] = False,
        allow_unprotected: Annotated[bool, typer.Option(
            "--allow-unprotected", help="serve a model trained without feature protection: clean embeddings, "
            "recorded as unprotected")] = False,
        disclose_signals: Annotated[bool, typer.Option(
            "--disclose-signals", help="send spend_level, stability, recent_spend_anomaly exactly (unprotected, "
            "recorded); default: withheld")] = False,
        threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads")] = 1,
        charge_ahead: Annotated[int, typer.Option(
            "--charge-ahead", min=0, help="keep the ledger's charged worst case this many releases above the "
            "answered one, composed in the background (0: charge exactly at each raise, the answer waits)")] = 1,
        reserve: Annotated[int, typer.Option(
            "--reserve", min=1, help="releases per background charge (over-count <= charge-ahead + reserve - 1)")]
        = 1) -> None:
    """The payment holder: answer GetEmbedding over gRPC for the intersection recorded for this model version only,
    every answer charged to the party's ledger and noised as in training."""
    from fedscore.clients.payment.service import run_payment_service
    from fedscore.shared.party_home import default_party_home

    with user_errors():
        credentials = _server_credentials(host, tls_cert, tls_key, client_ca, insecure_local)
        service, guard = prepare_payment_service(model, data, party_home or default_party_home("payment"), budget,
                                                 allow_unprotected, disclose_signals, threads, ahead=charge_ahead,
                                                 reserve=reserve)
        try:
            run_payment_service(service, host, port, credentials, on_ready=console.print)
        finally:
            guard.close()


def prepare_payment_service(model: Path, data: Path, home: Path, budget: list[str] | None = None,
                            allow_unprotected: bool = False, disclose_signals: bool = False,
                            threads: int = 1, *, ahead: int = 1,
                            reserve: int = 1) -> tuple[PaymentScoringService, LedgerGuard]:
    """Everything `serve payment` checks and loads before listening: the bundle, the served record for its payment
    part, the ledger guard, the disclosures. The guard holds the party home until closed."""
    from fedscore.clients.payment.release_guard import (
        SIGNALS_DISCLOSURE,
        LedgerGuard,
        check_not_replayable,
        record_disclosure,
    )
    from fedscore.clients.payment.served import load_served
    from fedscore.clients.payment.service import PaymentScoringService
    from fedscore.shared.party_home import PartyHome, ensure_party_home
    from fedscore.shared.scoring.bundle import load_scoring_bundle

    bundle = load_scoring_bundle(model, parties=("payment",))  # the lender's part is the lender's alone
    home = ensure_party_home(home)
    served = load_served(home, bundle.part_sha256("payment"))
    check_not_replayable(served, bundle.manifest.training_config)
    guard = LedgerGuard(home, served, _payment_budgets(bundle.manifest.training_config, budget),
                        allow_unprotected=allow_unprotected, ahead=ahead, reserve=reserve)
    try:
        if guard.sigma is None:
            warn("embeddings leave WITHOUT noise (feature protection was off in training); recorded as "
                  f"unprotected in {PartyHome(home).disclosures}")
        if disclose_signals:
            record_disclosure(home, "payment.signals", SIGNALS_DISCLOSURE)
            warn(f"unprotected: {SIGNALS_DISCLOSURE}; recorded in {PartyHome(home).disclosures}")
        console.print(f"loading {data / 'payment'} and the payment part from {model} ...")
        return PaymentScoringService.from_bundle(bundle, data, served, guard, disclose_signals, threads), guard
    except BaseException:
        guard.close()
        raise


def _payment_channel(payment_address: str, payment_ca: Path | None, client_cert: Path | None,
                     client_key: Path | None, insecure_payment: bool):  # -> grpc.ChannelCredentials | None
    """Mutual TLS to the payment service, or plaintext to a loopback address when asked for by name."""
    from fedscore.clients.payment.service import LOOPBACK_HOSTS
    from fedscore.shared.tls import mutual_tls_channel_credentials

    given = {"--payment-ca": payment_ca, "--client-cert": client_cert, "--client-key": client_key}
    if insecure_payment:
        host = payment_address.rsplit(":", 1)[0].strip("[]")
        if any(v is not None for v in given.values()):
            fail("--insecure-payment is plaintext; drop it to use --payment-ca/--client-cert/--client-key")
        if host not in LOOPBACK_HOSTS:
            fail(f"--insecure-payment reaches loopback addresses only, not {payment_address}")
        return None
    missing = [flag for flag, value in given.items() if value is None]
    if missing:
        fail(f"the payment service needs mutual TLS: pass {', '.join(missing)} (or --insecure-payment for a "
              "payment service started with --insecure-local on this machine)")
    return mutual_tls_channel_credentials(payment_ca, client_cert, client_key)  # type: ignore[arg-type]


@serve_app.command("lender")
def serve_lender_command(
        model: ModelOpt, data: DataOpt,
        payment_address: Annotated[str, typer.Option(
            "--payment-address", help="host:port of the payment holder's gRPC service")],
        port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
        host: HostOpt = "127.0.0.1",
        timeout: Annotated[float, typer.Option(min=0.01, help="payment call deadline, s")] = 2.0,
        blacklist: Annotated[Path | None, typer.Option(help="ids to decline")] = None,
        payment_ca: Annotated[Path | None, typer.Option(
            "--payment-ca", help="CA that signed the payment service's certificate (PEM)")] = None,
        client_cert: Annotated[Path | None, typer.Option(
            "--client-cert", help="the lender's client certificate (PEM)")] = None,
        client_key: Annotated[Path | None, typer.Option("--client-key", help="its private key (PEM)")] = None,
        insecure_payment: Annotated[bool, typer.Option(
            "--insecure-payment", help="plaintext to a payment service on loopback (its --insecure-local)")] = False,
        api_token_file: Annotated[Path | None, typer.Option(
            "--api-token-file", help="the bearer token callers must send (created with a fresh token if missing; "
            "default: $FEDSCORE_HOME/parties/lender/api-token)")] = None,
) -> None:
    """The lender: POST /score {"id": ...} over HTTP, asking the payment service for the embedding."""
    from fedscore.clients.lender.service import run_lender_service
    from fedscore.scoring import read_blacklist
    from fedscore.shared.party_home import PartyHome

    with user_errors():
        from fedscore.shared.scoring.bundle import load_scoring_bundle, refuse_void_bundle

        refuse_void_bundle(load_scoring_bundle(model))
        credentials = _payment_channel(payment_address, payment_ca, client_cert, client_key, insecure_payment)
        ids = read_blacklist(blacklist) if blacklist is not None else None
        token_file = api_token_file or PartyHome.default("lender").api_token
        token = api_token(token_file)
        console.print(f"lender service on http://{host}:{port} (payment service at {payment_address}, "
                      f"{'mutual TLS' if credentials else 'plaintext, loopback'}); callers send "
                      f"'Authorization: Bearer <the token in {token_file}>'")
        run_lender_service(model, data, payment_address, host, port, timeout, ids, credentials, api_token=token)


def api_token(path: Path) -> str:
    """The lender API's bearer token from `path`, or a fresh one written there (owner-only) on first use."""
    import secrets

    if not path.exists():
        from fedscore.shared.atomic import write_private

        write_private(path, secrets.token_urlsafe(32) + "\n", exclusive=True)
    if path.stat().st_mode & 0o077:
        fail(f"{path}: readable by other users; chmod 600 it (it holds the lender API's bearer token)")
    token = path.read_text().strip()
    if len(token) < 16:
        fail(f"{path}: the token must be at least 16 characters")
    return token


def _standalone() -> None:
    """`python -m fedscore.cli_scoring ...` works before the commands are registered in fedscore.cli."""
    app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
    app.command("score")(score_command)
    app.add_typer(serve_app, name="serve")
    app()


if __name__ == "__main__":
    _standalone()
