"""`fedscore superlink`, `fedscore node`, `fedscore run`, `fedscore keys`: the deployment commands, registered by
fedscore.cli. Each operator runs its own on its own host (fedscore/deploy.py says who runs what)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedscore.cli_common import console, fail, progress_bar, read_secret, report_run, user_errors

PartyOpt = Annotated[str, typer.Option("--party", help="payment or lender")]
CaOpt = Annotated[Path | None, typer.Option(
    "--ca", help="CA certificate (PEM) that issued the SuperLink's certificate (TLS, the default)")]
InsecureOpt = Annotated[bool, typer.Option(
    "--insecure", help="plaintext and no node authentication: loopback addresses only (tests, one machine)")]
HomeOpt = Annotated[Path | None, typer.Option(
    "--party-home", help="this party's home: lifetime ledger, payload and SuperNode keys (default "
    "$FEDSCORE_HOME/parties/<party>)")]


def _party(party: str) -> str:
    if party not in ("payment", "lender"):
        fail(f"--party {party!r}: expected payment or lender")
    return party


def _tls_choice(ca: Path | None, insecure: bool, superlink: str) -> Path | None:
    """TLS unless --insecure, which is refused here, before anything is loaded or written, for a SuperLink that is
    not on loopback (serve_node and run_on_superlink check it again for their other callers)."""
    from fedscore.flower.launch import refuse_insecure_off_loopback, split_address

    if insecure and ca is not None:
        fail("--insecure is plaintext; drop it to use --ca")
    if not insecure and ca is None:
        fail("TLS is the default: pass --ca (the CA that issued the SuperLink's certificate), or --insecure for a "
             "SuperLink on this machine's loopback")
    if insecure:
        with user_errors():
            refuse_insecure_off_loopback(split_address(superlink)[0], "the SuperLink address")
    return ca


def superlink_command(
        folder: Annotated[Path, typer.Option("--dir", help="the SuperLink's folder: logs, nodes.json")],
        host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 9093,
        ca: CaOpt = None,
        tls_cert: Annotated[Path | None, typer.Option("--tls-cert", help="the SuperLink's certificate (PEM)")] = None,
        tls_key: Annotated[Path | None, typer.Option("--tls-key", help="its private key (PEM)")] = None,
        register: Annotated[list[str] | None, typer.Option(
            "--register", help="PARTY=FILE: a party's SuperNode public key (its supernode-auth.pub); only the "
            "registered keys may join (repeat for payment and lender)")] = None,
        insecure: InsecureOpt = False) -> None:
    """The coordinator's operator: serve the SuperLink (TLS, SuperNode authentication) until Ctrl-C."""
    from fedscore.deploy import serve_superlink
    from fedscore.shared.tls import SuperLinkTls

    keys: dict[str, Path] = {}
    for item in register or []:
        party, sep, path = item.partition("=")
        if not sep or party not in ("payment", "lender") or not path:
            fail(f"--register {item!r}: expected payment=FILE or lender=FILE")
        keys[party] = Path(path)
    given = {"--ca": ca, "--tls-cert": tls_cert, "--tls-key": tls_key}
    if insecure:
        if any(v is not None for v in given.values()):
            fail("--insecure is plaintext; drop it to use --ca/--tls-cert/--tls-key")
        tls = None
    else:
        missing = [flag for flag, value in given.items() if value is None]
        if missing:
            fail(f"TLS is the default: pass {', '.join(missing)} (`fedscore certs --out DIR --server-name HOST` "
                 "makes a local set), or --insecure to serve plaintext on loopback")
        tls = SuperLinkTls(ca=ca, cert=tls_cert, key=tls_key)  # type: ignore[arg-type]

    def ready(info: dict) -> None:
        console.print(f"SuperLink on {info['address']} ({'TLS' if info['tls'] else 'plaintext, loopback only'}"
                      f"{', SuperNode authentication' if info['node_auth'] else ''}); Ctrl-C stops it")
        for party, entry in info["nodes"].items():
            console.print(f"registered {party}: node {entry['node_id']}, key fingerprint {entry['key_fingerprint']} "
                          "(compare with the party out of band)")
        console.print(f"start runs on this host: fedscore run --superlink {info['address']} "
                      f"--nodes {folder / 'nodes.json'} ...")

    with user_errors():
        try:
            serve_superlink(folder, host, port, tls, keys, ready)
        except KeyboardInterrupt:
            console.print("SuperLink stopped")


def node_command(
        party: PartyOpt,
        data: Annotated[Path, typer.Option("--data", help="DIR with this party's folder (DIR/payment or "
                                                          "DIR/lender)")],
        superlink: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the coordinator's SuperLink")],
        secret_file: Annotated[Path, typer.Option(
            "--secret-file", help="hex secret the two parties agreed between them (never via the coordinator)")],
        peer_key: Annotated[str, typer.Option(
            "--peer-key", help="the other party's payload key: its identity.pub file or the key as hex, pinned "
            "after comparing its fingerprint out of band")],
        ca: CaOpt = None,
        party_home: HomeOpt = None,
        auth_key: Annotated[Path | None, typer.Option(
            "--auth-key", help="the SuperNode's private key (default: supernode-auth.key in the party home)")] = None,
        budget: Annotated[list[str] | None, typer.Option(
            "--budget", help="this party's own budget, guarantee=eps, e.g. lender.labels@payment=2 (default: the "
            "targets of --config)")] = None,
        config: Annotated[Path | None, typer.Option("--config", help="run config whose targets set the default "
                                                                     "budgets")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="override of --config")] = None,
        state: Annotated[Path | None, typer.Option(
            "--state", help="this party's run state and logs (default PARTY_HOME/node)")] = None,
        insecure: InsecureOpt = False) -> None:
    """A party's operator: run this party's worker and SuperNode, on its own machine, until Ctrl-C."""
    party = _party(party)
    ca = _tls_choice(ca, insecure, superlink)  # before the imports below (torch): a refusal is instant
    from fedscore.budgets import default_budgets
    from fedscore.clients.base import PartySettings
    from fedscore.deploy import serve_node
    from fedscore.shared.config import load_config
    from fedscore.shared.party_home import PartyHome, default_party_home, ensure_party_home
    from fedscore.shared.privacy.budgets import parse_budgets
    from fedscore.shared.protocol.e2e import fingerprint, parse_public_key, public_key_hex
    from fedscore.shared.tls import node_auth_key, node_key_fingerprint

    with user_errors():
        secret = read_secret(secret_file)
        home = ensure_party_home(party_home or default_party_home(party))
        peer_text = Path(peer_key).read_text().strip() if Path(peer_key).is_file() else peer_key
        try:
            peer = parse_public_key(peer_text)
        except ValueError as exc:
            fail(f"--peer-key: {exc}")
        budgets = default_budgets(load_config(config, set_ or []))[party] if config or set_ else {}
        try:
            budgets.update(parse_budgets(budget or []))
        except ValueError as exc:
            fail(f"--budget: {exc}")
        if auth_key is None and not insecure:
            auth_key, auth_pub = node_auth_key(home)
            console.print(f"SuperNode key {auth_pub} (fingerprint {node_key_fingerprint(auth_pub)})")
        folder = (state or PartyHome(home).node_state).resolve()
        settings = PartySettings(party=party, data_path=(data / party).resolve(), state_dir=folder / "state",
                                 home=home, secret=secret, budgets=budgets, peer_public_key=peer.hex())
        own = fingerprint(bytes.fromhex(public_key_hex(home)))
        console.print(f"payload keys: this party {own}, pinned peer {fingerprint(peer)} (compare out of band)")

        def ready() -> None:
            console.print(f"{party} node up: worker and SuperNode connected to {superlink} "
                          f"({'plaintext, loopback' if ca is None else 'TLS'}); logs in {folder / 'logs'}; Ctrl-C "
                          "stops it")

        try:
            serve_node(settings, superlink, ca, auth_key, folder, ready)
        except KeyboardInterrupt:
            console.print(f"{party} node stopped")


def run_command(
        superlink: Annotated[str, typer.Option("--superlink", help="HOST:PORT of the SuperLink on this host")],
        out: Annotated[Path | None, typer.Option("--out", help="run folder to create (RUN_DIR)")] = None,
        config: Annotated[Path | None, typer.Option("--config", help="TOML run config")] = None,
        set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. training.rounds=5")] = None,
        ca: CaOpt = None,
        nodes: Annotated[Path | None, typer.Option(
            "--nodes", help="the SuperLink's nodes.json: the ServerApp talks to its registered SuperNodes only",
        )] = None,
        insecure: InsecureOpt = False,
        resume: Annotated[Path | None, typer.Option(
            "--resume", help="RUN_DIR of a run whose coordinator or nodes died: continue it from its checkpoint "
            "(same run id and config; restart each party's `fedscore node` first); no --out, --config or --set")]
        = None) -> None:
    """The coordinator's operator: start a run on the SuperLink (or resume one), follow it, write RUN_DIR."""
    from fedscore.deploy import read_nodes, resume_on_superlink, run_on_superlink
    from fedscore.shared.config import load_config

    ca = _tls_choice(ca, insecure, superlink)
    if resume is not None:
        given = [flag for flag, value in (("--out", out), ("--config", config), ("--set", set_)) if value]
        if given:
            fail(f"--resume continues the run in {resume} with its own config; drop {', '.join(given)}")
    elif out is None:
        fail("--out RUN_DIR is required (or --resume RUN_DIR)")
    with user_errors():
        allowed = read_nodes(nodes) if nodes is not None else None
        with progress_bar() as progress:
            if resume is not None:
                metrics = resume_on_superlink(resume, superlink, ca, allowed, progress)
            else:
                metrics = run_on_superlink(load_config(config, set_ or []), superlink, out, ca, allowed, progress)
    report_run(metrics, resume or out)


def keys_command(party: PartyOpt, party_home: HomeOpt = None) -> None:
    """Show (creating on first use) this party's public keys and their fingerprints: identity.pub for the other
    party (payload encryption) and supernode-auth.pub for the coordinator (SuperNode authentication)."""
    from fedscore.shared.party_home import PartyHome, default_party_home, ensure_party_home
    from fedscore.shared.protocol.e2e import fingerprint, public_key_hex
    from fedscore.shared.tls import node_auth_key, node_key_fingerprint

    party = _party(party)
    with user_errors():
        home = ensure_party_home(party_home or default_party_home(party))
        public = public_key_hex(home)
        _, auth_pub = node_auth_key(home)
        console.print(f"{party} payload key (give to the other party): {PartyHome(home).identity_pub}\n  {public}\n  "
                      f"fingerprint {fingerprint(bytes.fromhex(public))}")
        console.print(f"{party} SuperNode key (give to the coordinator): {auth_pub}\n  fingerprint "
                      f"{node_key_fingerprint(auth_pub)}")


def bundle_command(
        run_dir: Annotated[Path, typer.Argument(help="the run folder `fedscore run` wrote")],
        export: Annotated[list[str], typer.Option(
            "--export", help="PARTY=DIR: a party's export folder (its node's STATE/state/export, handed over by "
            "its operator); both payment and lender")]) -> None:
    """Gather the two parts of a deployed run into RUN_DIR/model with its manifest (what `fedscore serve` loads)."""

    from fedscore.bundle import assemble_bundle
    from fedscore.shared.run_folder import RunFolder

    exports: dict[str, Path] = {}
    for item in export:
        party, sep, path = item.partition("=")
        if not sep or party not in ("payment", "lender") or not path:
            fail(f"--export {item!r}: expected payment=DIR or lender=DIR")
        exports[party] = Path(path)
    if set(exports) != {"payment", "lender"}:
        fail("--export: give both payment=DIR and lender=DIR")
    with user_errors():
        try:
            folder = RunFolder(run_dir)
            config = folder.read_json(folder.config)
            privacy = folder.read_json(folder.privacy_report)
        except (OSError, ValueError) as exc:
            fail(f"{run_dir}: not a finished run folder ({exc})")
        assemble_bundle(run_dir, config, privacy["guarantees"], exports)
    console.print(f"wrote {RunFolder(run_dir).model} (both parts and the manifest)")
