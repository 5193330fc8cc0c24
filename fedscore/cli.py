"""The `fedscore` command line: data, train (in-process), federate (real local Flower federation), demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedscore.cli_common import console, fail, user_errors
from fedscore.cli_common import progress_bar as _progress_bar
from fedscore.cli_common import read_secret as _secret
from fedscore.cli_common import report_run as _report
from fedscore.cli_deploy import bundle_command, keys_command, node_command, run_command, superlink_command
from fedscore.cli_dynamic import register as register_dynamic
from fedscore.cli_dynamic import score_command
from fedscore.cli_ledger import ledger_app
from fedscore.cli_scoring import serve_app
from fedscore.shared.run_folder import RunFolder

app = typer.Typer(help="Privacy-preserving vertical federated credit scoring.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Make or convert party data (DIR/payment and DIR/lender).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.command("score")(score_command)
app.add_typer(serve_app, name="serve")
app.command("superlink")(superlink_command)
app.command("node")(node_command)
app.command("run")(run_command)
app.command("keys")(keys_command)
app.command("bundle")(bundle_command)
app.add_typer(ledger_app, name="ledger")
register_dynamic(app, data_app)  # monitor, retrain, account, registry, data window (issue 21)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML run config")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override, e.g. training.rounds=5")]
BudgetOpt = Annotated[list[str] | None, typer.Option(
    "--budget", help="a party's own budget, party:guarantee=eps (default: the config's targets), "
    "e.g. lender:lender.labels@payment=1.5")]
SecretOpt = Annotated[Path | None, typer.Option("--secret-file", help="hex secret the parties share (default: new)")]
HomeOpt = Annotated[list[str] | None, typer.Option(
    "--party-home", help="a party's home, party=DIR: its lifetime privacy ledger, kept across runs and services "
    "(default: $FEDSCORE_HOME/parties/<party>, FEDSCORE_HOME defaulting to ~/.fedscore)")]


def _load(config: Path | None, overrides: list[str] | None):
    from fedscore.shared.config import load_config

    return load_config(config, overrides or [])


def _budgets(config, overrides: list[str] | None):
    from fedscore.budgets import apply_budget_overrides, default_budgets

    return apply_budget_overrides(default_budgets(config), overrides or [])


@data_app.command("synth")
def data_synth(users: Annotated[int, typer.Option(min=100)] = 20000, seed: int = 0,
               out: Annotated[Path, typer.Option(help="folder to create")] = Path("data/synth"),
               months: Annotated[int | None, typer.Option(help="monthly snapshots (users = applicants a month)")]
               = None, shock: Annotated[int | None, typer.Option(help="with --months: the shock's month")] = None,
               ) -> None:
    """Generate the embedded default data: payment transactions and lender applicants with partial overlap."""
    from fedscore.synth import synthesize

    if months is not None or shock is not None:
        from fedscore.cli_dynamic import synth_months

        synth_months(months or 24, users, seed, out, shock)
        return

    with user_errors():
        try:
            summary = synthesize(users, seed, out)
        except ValueError as exc:
            fail(str(exc))
    console.print(f"wrote {out}: {summary.payment_users} payment users ({summary.transactions} transactions), "
                  f"{summary.lender_rows} applicants, overlap {summary.overlap}, "
                  f"default rate {summary.default_rate:.1%} in {summary.seconds:.1f} s")


@data_app.command("uci")
def data_uci(csv: Annotated[Path, typer.Option(help="UCI_Credit_Card.csv")],
             split: Annotated[str, typer.Option(help="scenario or fate")] = "scenario",
             out: Annotated[Path, typer.Option()] = Path("data/uci")) -> None:
    """Cut the real UCI Taiwan credit-default data into the two parties' folders."""
    from fedscore.uci import convert_uci

    with user_errors():
        info = convert_uci(csv, split, out)  # type: ignore[arg-type]
    console.print(f"wrote {out}: {info['rows']} rows, lender {info['lender_columns']} columns, "
                  f"payment {info['payment_columns']} columns ({split} split)")


@data_app.command("schema")
def data_schema(table: Annotated[Path, typer.Option(help="the party's table: applicants.* or features.*")],
                out: Annotated[Path, typer.Option(help="where to write it, e.g. DIR/lender/schema.toml")]) -> None:
    """Draft a schema.toml from your own table, to review: its bounds must become public declarations."""
    from fedscore.schema_draft import REVIEW_NOTE, write_draft

    with user_errors():
        schema = write_draft(table, out)
    console.print(f"wrote a draft {out} with {len(schema.columns)} columns")
    console.print(f"[yellow]{REVIEW_NOTE}[/yellow]")


ResumeOpt = Annotated[Path | None, typer.Option(
    "--resume", help="RUN_DIR of a run whose processes died: continue it (same run id, config, data, homes and "
    "budgets, from RUN_DIR/launch.json); give no other option but --party-timeout")]
PartyTimeoutOpt = Annotated[float | None, typer.Option(
    "--party-timeout", min=1, help="seconds a party's SuperNode may stay disconnected before the run stops "
    "(default 180; resume with --resume)")]


def _run(runner, data: Path | None, out: Path | None, config: Path | None, set_: list[str] | None,
         secret_file: Path | None, budget: list[str] | None, party_home: list[str] | None,
         **extra) -> None:
    """train and federate differ only in the transport: same config, secret, budgets, homes, progress, report."""
    from fedscore.local_parties import party_homes

    if data is None or out is None:
        fail("give --data DIR and --out RUN_DIR for a new run, or --resume RUN_DIR to continue one")
    with user_errors():
        cfg = _load(config, set_)
        homes = party_homes(party_home)
        with _progress_bar() as progress:
            metrics = runner(cfg, data, out, progress=progress, secret=_secret(secret_file),
                             budgets=_budgets(cfg, budget), homes=homes, **extra)
    _report(metrics, out)


def _resume(resumer, run_dir: Path, others: dict[str, object], **extra) -> None:
    """`--resume RUN_DIR`: everything else comes from the run folder, so other options would be ignored: refuse."""
    given = [f"--{name.rstrip('_').replace('_', '-')}" for name, value in others.items() if value]
    if given:
        fail(f"--resume takes the run's own settings from {RunFolder(run_dir).launch}; drop {', '.join(given)}")
    with user_errors(), _progress_bar() as progress:
        metrics = resumer(run_dir.resolve(), progress=progress, **extra)
    _report(metrics, run_dir)


@app.command()
def train(data: Annotated[Path | None, typer.Option(help="DIR with payment/ and lender/")] = None,
          out: Annotated[Path | None, typer.Option(help="run folder to create")] = None,
          config: ConfigOpt = None, set_: SetOpt = None, secret_file: SecretOpt = None,
          budget: BudgetOpt = None, party_home: HomeOpt = None, resume: ResumeOpt = None) -> None:
    """Train in one process (parties as objects): the fast path and the reference."""
    from fedscore.runs import resume_inprocess, run_inprocess

    if resume is not None:
        _resume(resume_inprocess, resume, {"data": data, "out": out, "config": config, "set": set_,
                                           "secret_file": secret_file, "budget": budget, "party_home": party_home})
        return
    _run(run_inprocess, data, out, config, set_, secret_file, budget, party_home)


@app.command()
def federate(data: Annotated[Path | None, typer.Option(help="DIR with payment/ and lender/")] = None,
             out: Annotated[Path | None, typer.Option(help="run folder to create")] = None,
             config: ConfigOpt = None, set_: SetOpt = None, secret_file: SecretOpt = None,
             budget: BudgetOpt = None, party_home: HomeOpt = None, resume: ResumeOpt = None,
             party_timeout: PartyTimeoutOpt = None,
             insecure: Annotated[bool, typer.Option(
                 "--insecure", help="plaintext on 127.0.0.1 without SuperNode authentication (default: TLS with a "
                 "throwaway CA, only the parties' registered SuperNode keys may join)")] = False) -> None:
    """Train through a real local Flower federation: SuperLink + one SuperNode per party + ServerApp, over TLS with
    SuperNode authentication (the one-host form of `fedscore superlink` + `node` + `run`)."""
    from fedscore.federation import resume_federated, run_federated

    if resume is not None:
        _resume(resume_federated, resume, {"data": data, "out": out, "config": config, "set": set_,
                                           "secret_file": secret_file, "budget": budget, "party_home": party_home,
                                           "insecure": insecure or None},
                party_timeout_s=party_timeout)
        return
    extra = {} if party_timeout is None else {"party_timeout_s": party_timeout}
    _run(run_federated, data, out, config, set_, secret_file, budget, party_home, insecure=insecure, **extra)


# the synthetic data has a rarer default (7.5%) than UCI (22%): DP-SGD needs more steps there (BENCHMARKS.md)
DEMO_SETTINGS = ["privacy.dpsgd_local_epochs=6"]


@app.command()
def demo(users: Annotated[int, typer.Option(min=1000)] = 100000,
         out: Annotated[Path, typer.Option(help="folder for data/ and run/")] = Path("runs/demo"),
         set_: SetOpt = None) -> None:
    """Synthetic data -> real local Flower federation -> results against the two baselines.

    The demo's people are synthetic and regenerated on every run, so its parties keep their homes (lifetime
    ledgers) inside OUT/party-homes, wiped with the rest: a real deployment keeps them across runs."""
    import shutil

    from fedscore.federation import run_federated
    from fedscore.synth import synthesize

    with user_errors():
        cfg = _load(None, [*DEMO_SETTINGS, *(set_ or [])])
        if out.exists():
            shutil.rmtree(out)
        console.print(f"generating {users} synthetic users ...")
        summary = synthesize(users, cfg.seed, out / "data")
        console.print(f"payment holder: {summary.payment_users} users, {summary.transactions} transactions; "
                      f"lender: {summary.lender_rows} applicants ({summary.default_rate:.1%} default)")
        with _progress_bar() as progress:
            homes = {party: out / "party-homes" / party for party in ("payment", "lender")}
            metrics = run_federated(cfg, out / "data", out / "run", progress=progress, homes=homes)
    _report(metrics, out / "run")


@app.command()
def blacklist(data: Annotated[Path, typer.Option(help="DIR with lender/applicants.* and payment/fraud_list.*")],
              out: Annotated[Path, typer.Option(help="folder for the parties' state")],
              party_home: HomeOpt = None) -> None:
    """Private blacklist check (PSI): the lender learns which applicants are on the payment holder's fraud list;
    the payment holder learns only how many applicants were checked."""
    from fedscore.blacklist_check import run_blacklist
    from fedscore.local_parties import party_homes

    with user_errors():
        hits = run_blacklist(data, out, homes=party_homes(party_home))
    count = len(hits.read_text().splitlines()) - 1
    console.print(f"lender: {count} applicant(s) on the payment holder's fraud list -> {hits} "
                  f"(use with `fedscore score --blacklist {hits}` to flag them for manual review)")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run folder made by train or federate")]) -> None:
    """Rebuild RUN_DIR/privacy-report.json and RUN_DIR/report.html from the run's own files."""
    from fedscore.report import write_reports

    folder = RunFolder(run_dir)
    if not folder.outcome.exists():
        fail(f"{run_dir}: no {folder.OUTCOME} (not a finished run folder)")
    write_reports(run_dir)
    console.print(f"wrote {folder.privacy_report} and {folder.report_html}")


@app.command()
def certs(out: Annotated[Path, typer.Option("--out", help="folder to create (must not hold these files yet)")],
          server_name: Annotated[list[str] | None, typer.Option(
              "--server-name", help="DNS name or IP the server certificate is valid for (repeat; localhost and "
              "127.0.0.1 are always added)")] = None,
          client: Annotated[list[str] | None, typer.Option(
              "--client", help="a client certificate to issue (repeat; default: lender)")] = None,
          node: Annotated[list[str] | None, typer.Option(
              "--node", help="a SuperNode authentication key pair to write, <node>-node.key/.pub (repeat)")] = None,
          ) -> None:
    """Write a throwaway local PKI (tests, one machine): ca.pem, server.pem/.key (the payment service's mutual TLS,
    or the SuperLink's: `fedscore superlink --ca ca.pem --tls-cert server.pem --tls-key server.key`),
    <client>.pem/.key, and SuperNode keys. Keys are owner-only; the CA key is not kept."""
    from fedscore.shared.tls import TlsError, make_local_pki, node_key_fingerprint, write_node_auth_key

    try:
        # loopback names always: the operator's own tools (health check, `flwr supernode register`) reach a
        # SuperLink bound to 0.0.0.0 at 127.0.0.1
        names = [*server_name, *(n for n in ("localhost", "127.0.0.1") if n not in server_name)] if server_name \
            else None
        pki = make_local_pki(out, server_names=names, clients=client)
        nodes = {name: write_node_auth_key(out / f"{name}-node.key", out / f"{name}-node.pub")
                 for name in node or []}
    except (TlsError, OSError) as exc:
        fail(str(exc))
    clients = ", ".join(f"{name}: {cert.name} + {key.name}" for name, (cert, key) in pki.clients.items())
    console.print(f"wrote {out}: CA {pki.ca.name}; server {pki.server_cert.name} + {pki.server_key.name}; {clients}")
    for name, pub in nodes.items():
        console.print(f"SuperNode key {name}: {pub.name} (register it) + {name}-node.key (its --auth-key); "
                      f"fingerprint {node_key_fingerprint(pub)}")


@app.command()
def experiment(grid: Annotated[Path, typer.Option("--grid", help="GRID.toml: data, seeds, splits, [grid], [set]")],
               out: Annotated[Path, typer.Option("--out", help="folder for results.csv/.md, frontier.png, runs/")],
               jobs: Annotated[int, typer.Option("--jobs", min=1, help="runs in parallel processes")] = 1,
               resume: Annotated[bool, typer.Option("--resume", help="skip runs already finished in OUT")] = False,
               ) -> None:
    """Run every grid cell x seed x keyed split (fresh party homes per run) and tabulate the privacy/utility
    frontier: OUT/results.csv (one row per run), OUT/results.md (per cell), OUT/frontier.png."""
    from fedscore.experiment import lift_frontier, load_grid, plot_frontier, run_experiment, summary, write_markdown

    with user_errors():
        runs = load_grid(grid, out)
        if not resume and (out / "results.csv").exists():
            fail(f"{out}: already holds results.csv; pass --resume to continue it, or choose a new --out")
        with _progress_bar() as progress:
            frame, ran = run_experiment(runs, out, jobs=jobs, resume=resume, progress=progress)
        axes = [k for k in runs[0].settings] if runs else []
        table = summary(frame, axes)
        write_markdown(table, out / "results.md", lift_frontier(frame, axes))
        plot_frontier(frame, axes, out / "frontier.png")
    failed = int((frame["error"].fillna("") != "").sum()) if "error" in frame else 0
    console.print(f"ran {ran} of {len(runs)} runs ({len(runs) - ran} already done, {failed} failed); wrote "
                  f"{out}/results.csv, results.md, frontier.png")


AUDIT_CANARIES = 4000  # about 2000 train: the label bound then reaches 1.2 under randomized response at eps 2
AUDIT_GRADIENT_CANARIES = 1000  # per DP-SGD part (capped at its parameter count)


@app.command()
def audit(run_dir: Annotated[Path | None, typer.Argument(help="a finished run recorded with transcripts")] = None,
          data: Annotated[Path | None, typer.Option(help="train first, in process, from DIR (then --out)")] = None,
          out: Annotated[Path | None, typer.Option(help="with --data: the run folder to create")] = None,
          config: ConfigOpt = None, set_: SetOpt = None, budget: BudgetOpt = None, party_home: HomeOpt = None,
          canaries: Annotated[int, typer.Option(min=0, help="with --data: canary users for the one-run audit")]
          = AUDIT_CANARIES,
          gradient_canaries: Annotated[int, typer.Option(min=0, help="with --data: Dirac gradient canaries per "
                                                         "DP-SGD part (white-box audit)")] = AUDIT_GRADIENT_CANARIES,
          ) -> None:
    """Attack what each party saw and audit the label guarantee and each DP-SGD part in one run; adds "Attacks and
    audit" to privacy-report.json and report.html. Exits 1 when an audit's lower bound exceeds a claimed epsilon.

    `fedscore audit RUN_DIR` audits a run made with --set audit.record_transcripts=true; `fedscore audit --data DIR
    --out RUN_DIR [--set ...]` trains that run first (in process, transcripts and canaries on, baselines off unless
    --set baselines.enabled=true, fresh party homes in RUN_DIR/party-homes unless --party-home)."""
    from fedscore.audit.section import run_audit
    from fedscore.audit.views import AuditError

    with user_errors():
        if data is not None:
            if out is None and run_dir is None:
                fail("--data needs --out RUN_DIR (the run folder to create)")
            target = out or run_dir
            assert target is not None
            from fedscore.runs import run_inprocess

            # baselines off unless --set turns them on: an audit run is there to be attacked
            cfg = _load(config, ["baselines.enabled=false", *(set_ or []), "audit.record_transcripts=true",
                                 f"audit.canaries={canaries}", f"audit.gradient_canaries={gradient_canaries}"])
            homes = ({p: target / "party-homes" / p for p in ("payment", "lender")} if not party_home
                     else _homes(party_home))
            with _progress_bar() as progress:
                run_inprocess(cfg, data, target, progress=progress, budgets=_budgets(cfg, budget), homes=homes)
            run_dir = target
        if run_dir is None:
            fail("give RUN_DIR, or --data DIR --out RUN_DIR")
        assert run_dir is not None
        try:
            section = run_audit(run_dir)
        except AuditError as exc:
            fail(str(exc))
    _audit_summary(section, run_dir)
    if section["violations"]:
        raise typer.Exit(1)


def _homes(overrides: list[str]):
    from fedscore.local_parties import party_homes

    return party_homes(overrides)


def _audit_summary(section: dict, run_dir: Path) -> None:
    table = Table(title="attacks (pooled over exchanges)")
    for column in ("attacker", "attack", "value", "chance", "ceiling"):
        table.add_column(column, justify="left" if column in ("attacker", "attack") else "right")

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in section["labels_vs_payment"]["attacks"]:
        if r["exchange"] in ("pooled over exchanges", "final model"):
            style = "red" if r["above_ceiling"] else None
            table.add_row("payment holder", r["attack"], fmt(r["value"]), fmt(r["chance"]), fmt(r["ceiling"]),
                          style=style)
    mem = section["membership_vs_outsider"]
    table.add_row("outsider", mem["attack"], fmt(mem["value"]), fmt(mem["chance"]), fmt(mem["ceiling"]),
                  style="red" if mem["above_ceiling"] else None)
    for r in section["features_vs_lender"]["results"][-1:]:
        table.add_row("lender", f"feature reconstruction R^2 ({r['exchange']})", fmt(r["pooled_r2"]), "0.000", "-")
    excess = section["features_vs_lender"].get("excess_over_score")
    if excess:
        for name, row in excess["inputs"].items():
            table.add_row("lender", f"feature reconstruction R^2 ({name})", fmt(row["pooled_r2"]), "0.000", "-")
        if excess.get("inverted"):  # the same without inverting the lender's own part: a regressor's view
            table.add_row("lender", "excess over the score, not inverted", fmt(excess["plain_excess"]), "0.000", "-")
        table.add_row("lender", "excess: everything received over the final score", fmt(excess["excess"]), "0.000",
                      fmt(excess["bar"]), style=None if excess["within_bar"] else "red")
    console.print(table)
    for a in section["one_run_audits"]:
        if a.get("epsilon_lower_bound") is None:
            console.print(f"one-run audit {a['guarantee']}: {a.get('note', 'not run')}")
            continue
        claim = "no claim" if a["claim"] is None else f"claimed {a['claim']:.3f} ({a['claim_status']})"
        verdict = "[bold red]VIOLATION[/]" if a["violation"] else "consistent"
        console.print(f"one-run audit {a['guarantee']}: {a['confidence']:.1%} lower bound "
                      f"{a['epsilon_lower_bound']:.3f}, {claim}: "
                      f"{verdict} ({a['correct']}/{a['guesses']} guesses right of {a['canaries']} canaries: "
                      f"{a['policy']})")
    console.print(f"audit took {section['seconds']:.1f} s; wrote {run_dir}/audit.json, audit.png, "
                  "privacy-report.json, report.html")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
