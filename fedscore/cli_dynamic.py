"""The dynamic model's commands (issue 21): monthly data, monitor, retrain, the champion registry, book scoring.

Registered by fedscore/cli.py (`register(app, data_app)`); imports stay inside the commands so `fedscore --help`
loads none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from fedscore.cli_common import console, fail, user_errors
from fedscore.shared.run_folder import RunFolder

registry_app = typer.Typer(help="The lender's model registry: versions, champion, challenger, rollback.",
                           no_args_is_help=True)

HomeOpt = Annotated[list[str] | None, typer.Option(
    "--party-home", help="a party's home, party=DIR (default: $FEDSCORE_HOME/parties/<party>)")]
BudgetOpt = Annotated[list[str] | None, typer.Option(
    "--budget", help="a party's own lifetime budget, party:guarantee=eps (default: the config's targets)")]


def _months(text: str) -> tuple[int, int]:
    from fedscore.synth_monthly import parse_months

    try:
        return parse_months(text)
    except ValueError as exc:
        fail(str(exc))


def synth_months(months: int, users: int, seed: int, out: Path, shock: int | None) -> None:
    """`fedscore data synth --months N [--shock K]` (called by cli.data_synth)."""
    from fedscore.synth_monthly import synthesize_months

    with user_errors():
        try:
            meta = synthesize_months(months, users, seed, out, shock)
        except ValueError as exc:
            fail(str(exc))
    rates = ", ".join(f"{i.month}: {i.default_rate:.1%}" for i in meta.info)
    console.print(f"wrote {out}: {months} monthly folders (month-01 .. month-{months:02d}) of {users} applicants, "
                  f"book of {meta.book} borrowers, performance window {meta.performance_window} months"
                  + (f", shock from month {shock}" if shock else "") + f" in {meta.seconds:.1f} s")
    console.print(f"default rate by month: {rates}")


def data_window(data: Annotated[Path, typer.Option(help="ROOT made by `data synth --months`")],
                months: Annotated[str, typer.Option(help="A..B")],
                out: Annotated[Path, typer.Option(help="folder to create (a `fedscore train` data folder)")],
                as_of: Annotated[int | None, typer.Option(help="the month we are in (default: the last)")] = None,
                ) -> None:
    """Assemble months A..B (matured outcomes only) into one folder `fedscore train` reads."""
    from fedscore.synth_monthly import assemble_window

    first, last = _months(months)
    with user_errors():
        try:
            assemble_window(data, first, last, out, as_of)
        except ValueError as exc:
            fail(str(exc))
    console.print(f"wrote {out}: months {first}..{last}")


def monitor_command(model: Annotated[Path, typer.Option("--model", help="RUN_DIR (or RUN_DIR/model) to watch")],
                    data: Annotated[Path, typer.Option("--data", help="ROOT made by `data synth --months`")],
                    month: Annotated[list[str], typer.Option("--month", help="month K, or A..B for several")],
                    out: Annotated[Path | None, typer.Option(
                        "--out", help="folder for monitor.json/.html (default RUN_DIR/monitor; months accumulate)")]
                    = None,
                    party_home: HomeOpt = None,
                    budget: Annotated[float | None, typer.Option(
                        help="the payment holder's lifetime budget for payment.features@lender")] = None,
                    noise: Annotated[float | None, typer.Option(
                        help="noise multiplier of the payment holder's bin counts")] = None) -> None:
    """PSI and characteristic analysis per column against the training reference, score drift, and realised AUC,
    KS and bad rate per band once outcomes mature; writes monitor.json and monitor.html."""
    from fedscore.local_parties import party_homes
    from fedscore.monitor import (
        DEFAULT_MONITOR_BUDGET,
        DEFAULT_NOISE_MULTIPLIER,
        MonitorError,
        monitor_month,
        record_month,
        resolve,
    )
    from fedscore.shared.privacy.ledger import BudgetExceeded

    wanted = [k for text in month for a, b in [_months(text)] for k in range(a, b + 1)]
    with user_errors():
        homes = party_homes(party_home)
        doc = None
        for k in wanted:
            try:
                inputs = resolve(model, data, k)
                target = out or inputs.run_dir / "monitor"
                entry = monitor_month(inputs, homes["payment"], budget or DEFAULT_MONITOR_BUDGET,
                                      noise or DEFAULT_NOISE_MULTIPLIER)
                doc = record_month(target, inputs, entry)
            except (MonitorError, BudgetExceeded) as exc:
                fail(f"month {k}: {exc}")
            act = [f"{side}.{c}" for side in ("payment", "lender") for c, r in entry[side].items()
                   if r["light"] == "act"]
            watch = [f"{side}.{c}" for side in ("payment", "lender") for c, r in entry[side].items()
                     if r["light"] == "watch"]
            realised = entry.get("realised")
            console.print(f"month {k}: score PSI {entry['score']['psi']:.3f} ({entry['score']['light']}); act: "
                          f"{', '.join(act) or 'none'}; watch: {', '.join(watch) or 'none'}"
                          + (f"; cohort {realised['cohort']}: AUC {realised['auc']:.3f}, KS {realised['ks']:.3f}, bad "
                             f"rate {realised['bad_rate']:.1%} (expected {realised['expected_bad_rate']:.1%})"
                             if realised else "")
                          + f"; payment eps {entry['payment_release']['epsilon_after']:.3f}")
    if doc is not None:
        console.print(f"wrote {target}/monitor.json and monitor.html")


def retrain_command(from_: Annotated[Path, typer.Option("--from", help="RUN_DIR of the previous version")],
                    data: Annotated[Path, typer.Option("--data", help="ROOT made by `data synth --months`")],
                    months: Annotated[str, typer.Option("--months", help="the new window, A..B")],
                    out: Annotated[Path, typer.Option("--out", help="run folder to create")],
                    as_of: Annotated[int | None, typer.Option(help="the month we are in (default: the last)")]
                    = None,
                    set_: Annotated[list[str] | None, typer.Option("--set", help="config override")] = None,
                    budget: BudgetOpt = None, party_home: HomeOpt = None,
                    cold: Annotated[bool, typer.Option("--cold", help="start from scratch (the reference)")]
                    = False,
                    register_: Annotated[bool, typer.Option(
                        "--register/--no-register", help="add the new version to the lender's registry")] = True,
                    ) -> None:
    """Warm-start from the previous version and train on the new window; the ledgers compose across versions.
    Refused before anything is charged when the budgets cannot cover it (the account and the ways forward)."""
    from fedscore.budgets import apply_budget_overrides, default_budgets
    from fedscore.local_parties import party_homes
    from fedscore.retrain import RetrainRefused, account, accounts_json, preflight, run_id_of, run_warm
    from fedscore.shared.config import load_config
    from fedscore.synth_monthly import assemble_window

    first, last = _months(months)
    with user_errors():
        folder = RunFolder(from_)
        previous = folder.read_json(folder.config) if folder.config.exists() else None
        if previous is None:
            fail(f"{from_}: no {folder.CONFIG} (not a run folder)")
        config = load_config(None, [*_flatten(previous), *(set_ or [])])
        budgets = apply_budget_overrides(default_budgets(config), budget or [])
        homes = party_homes(party_home)
        try:
            preflight(from_, budgets, homes, config.privacy.delta)
        except RetrainRefused as exc:
            console.print(str(exc), soft_wrap=True, markup=False, style="bold red")
            raise typer.Exit(3) from None
        window = out.parent / f"{out.name}-data"
        try:
            assemble_window(data, first, last, window, as_of)
        except ValueError as exc:
            fail(str(exc))
        metrics = run_warm(config, window, out, None if cold else from_, budgets=budgets, homes=homes)
        accounts = {p: account(homes[p], p, budgets.get(p, {}), config.privacy.delta, run_id_of(out))
                    for p in ("payment", "lender")}
        (out / "parties" / "retrain-account.json").write_text(json.dumps(
            {"from": str(from_), "window": [first, last], "warm": not cold, "accounts": accounts_json(accounts)},
            indent=1))
        version = None
        if register_:
            from fedscore import registry

            prior = next((v.version for v in registry.load(homes["lender"]).versions
                          if Path(v.run_dir) == from_.resolve()), None)
            version = registry.register(homes["lender"], out, (first, last), None if cold else prior)
    console.print(f"trained {out} on months {first}..{last} ({'cold start' if cold else f'warm from {from_}'}): "
                  f"test AUC {metrics['test']['auc']:.4f}, KS {metrics['test']['ks']:.4f}"
                  + (f"; registered as version {version.version}" if version else ""))
    _print_account(accounts)


def _flatten(config: dict, prefix: str = "") -> list[str]:
    """A run's config.json as --set overrides (the new version trains with the previous version's settings)."""
    items = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items += _flatten(value, f"{name}.")
        else:
            items.append(f"{name}={'none' if value is None else json.dumps(value)}")
    return items


def _print_account(accounts) -> None:  # type: ignore[no-untyped-def]
    from fedscore.retrain import MAX_PROJECTED

    table = Table(title="privacy account per guarantee (lifetime, per user, worst case over users)")
    for column in ("party", "guarantee", "run", "eps of the run", "cumulative eps", "budget", "retrains left"):
        table.add_column(column)
    for party, items in accounts.items():
        for g in items:
            for i, r in enumerate(g.runs):
                last = i == len(g.runs) - 1
                table.add_row(party, g.guarantee, r.run, f"{r.epsilon_alone:.3f}", f"{r.cumulative:.3f}",
                              "-" if g.budget is None else f"{g.budget:.3f}",
                              (f"{g.retrains_left}+" if g.retrains_left == MAX_PROJECTED else str(g.retrains_left))
                              if last and g.retrains_left is not None else "")
    console.print(table)


def account_command(from_: Annotated[Path, typer.Option("--from", help="RUN_DIR whose size to project")],
                    budget: BudgetOpt = None, party_home: HomeOpt = None) -> None:
    """Each party's lifetime account: eps per run, cumulative, and how many more retrains like FROM fit."""
    from fedscore.budgets import apply_budget_overrides, default_budgets
    from fedscore.local_parties import party_homes
    from fedscore.retrain import account, run_id_of

    with user_errors():
        config = RunFolder(from_).read_config()
        budgets = apply_budget_overrides(default_budgets(config), budget or [])
        homes = party_homes(party_home)
        run = run_id_of(from_)
        accounts = {p: account(homes[p], p, budgets.get(p, {}), config.privacy.delta, run)
                    for p in ("payment", "lender")}
    _print_account(accounts)


@registry_app.command("show")
def registry_show(party_home: HomeOpt = None) -> None:
    """The versions, the champion and the history."""
    from fedscore import registry
    from fedscore.local_parties import party_homes

    with user_errors():
        home = party_homes(party_home)["lender"]
        reg = registry.load(home)
    table = Table(title=f"registry in {home}")
    for column in ("version", "status", "window", "test AUC", "test KS", "promoted_at", "manifest"):
        table.add_column(column)
    for v in reg.versions:
        table.add_row(str(v.version), v.status, f"{v.window[0]}..{v.window[1]}" if v.window else "-",
                      f"{v.metrics.get('auc', float('nan')):.4f}", f"{v.metrics.get('ks', float('nan')):.4f}",
                      v.promoted_at or "-", v.manifest_sha256[:12])
    console.print(table)
    for h in reg.history:
        reason = f" ({h['reason']})" if "reason" in h else ""
        console.print(f"{h['at']}: {h['action']} version {h['version']}{reason}")


@registry_app.command("add")
def registry_add(run: Annotated[Path, typer.Option("--run", help="a finished run folder")],
                 months: Annotated[str | None, typer.Option("--months", help="the window it trained on, A..B")]
                 = None, party_home: HomeOpt = None) -> None:
    """Register a finished run as a new version (the first becomes the champion)."""
    from fedscore import registry
    from fedscore.local_parties import party_homes

    with user_errors():
        v = registry.register(party_homes(party_home)["lender"], run, _months(months) if months else None)
    console.print(f"version {v.version}: {v.status}")


@registry_app.command("challenge")
def registry_challenge(version: Annotated[int, typer.Option("--version", help="the challenger")],
                       data: Annotated[Path, typer.Option("--data", help="ROOT made by `data synth --months`")],
                       months: Annotated[str | None, typer.Option(
                           "--months", help="matured months to compare on (default: the latest neither trained on)")]
                       = None,
                       as_of: Annotated[int | None, typer.Option(help="the month we are in")] = None,
                       party_home: HomeOpt = None) -> None:
    """Score the challenger beside the champion on the latest matured window; promote it only if AUC and KS are
    both better."""
    from fedscore import registry
    from fedscore.local_parties import party_homes

    with user_errors():
        result = registry.challenge(party_homes(party_home)["lender"], version, data, as_of,
                                    _months(months) if months else None)
    c, h = result["champion"], result["challenger"]
    console.print(f"months {result['months'][0]}..{result['months'][1]}: champion v{c['version']} AUC {c['auc']:.4f} "
                  f"KS {c['ks']:.4f}; challenger v{h['version']} AUC {h['auc']:.4f} KS {h['ks']:.4f}: "
                  + ("[bold green]promoted[/]" if result["promoted"]
                     else "[yellow]not promoted[/] (needs both higher)"))


@registry_app.command("rollback")
def registry_rollback(party_home: HomeOpt = None) -> None:
    """Make the previous champion the champion again."""
    from fedscore import registry
    from fedscore.local_parties import party_homes

    with user_errors():
        v = registry.rollback(party_homes(party_home)["lender"])
    console.print(f"champion is version {v.version} again ({v.run_dir}); restart `fedscore serve lender --model "
                  "LENDER_HOME/champion` to serve it")


def score_command(model: Annotated[Path | None, typer.Option(
                      "--model", help="RUN_DIR/model (or LENDER_HOME/champion)")] = None,
                  data: Annotated[Path | None, typer.Option("--data", help="DIR, or with --book ROOT of monthly data")]
                  = None,
                  out: Annotated[Path | None, typer.Option("--out", help="CSV to write")] = None,
                  blacklist: Annotated[Path | None, typer.Option("--blacklist", help="ids to decline")] = None,
                  threads: Annotated[int, typer.Option(min=1, help="onnxruntime threads")] = 1,
                  book: Annotated[bool, typer.Option("--book", help="re-score the book and propose limit changes")]
                  = False,
                  month: Annotated[int | None, typer.Option("--month", help="with --book: the month")] = None,
                  ) -> None:
    """Score every applicant in DIR/lender (a CSV), or with --book re-score the borrowers on the book for --month and
    propose limit changes (cut / raise / hold, review flags, reason codes)."""
    if model is None or data is None or out is None:
        fail("give --model, --data and --out")
    if not book:
        from fedscore.cli_scoring import score_command as batch

        batch(model, data, out, blacklist, threads)
        return
    if month is None:
        fail("--book needs --month K")
    from fedscore.book import propose
    from fedscore.shared.atomic import atomic_write

    with user_errors():
        try:
            frame = propose(model, data, month)
        except ValueError as exc:
            fail(str(exc))
        atomic_write(out, lambda handle: frame.to_csv(handle, index=False, encoding="utf-8"))
    counts = frame["action"].value_counts().to_dict()
    console.print(f"wrote {out}: {len(frame)} borrowers re-scored for month {month}: cut {counts.get('cut', 0)}, "
                  f"raise {counts.get('raise', 0)}, hold {counts.get('hold', 0)}; {int(frame['review_flag'].sum())} "
                  "for manual review")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    """Add the dynamic model's commands to the CLI."""
    data_app.command("window")(data_window)
    app.command("monitor")(monitor_command)
    app.command("retrain")(retrain_command)
    app.command("account")(account_command)
    app.add_typer(registry_app, name="registry")
