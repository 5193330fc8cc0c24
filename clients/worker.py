"""A party's long-lived worker: the party object, its data and its state kept in memory across Flower messages.

Why: Flower starts a fresh `flwr-clientapp` process for every message. Rebuilding the party there means importing
torch and opacus and reloading the party's state from disk each time, seconds per message. The worker is started
once beside the party's SuperNode (`fedscore federate`), imports everything once, and serves the ClientApp, which
becomes a thin forwarder (clients/flower_client.py) importing only flwr and the standard library.

Every payload still travels through Flower: the worker is the party's compute, not a side channel. It listens on a
Unix socket in the party's run state directory (mode 0600) with `multiprocessing.connection`, whose authkey
handshake (HMAC challenge-response on this run's token) admits only a ClientApp that holds the token. One request
per connection, served one at a time (a SuperNode handles one message at a time anyway). The party checkpoints its
state after every message, as before; it loads it only once.

Messages on a connection, each one `send_bytes` record: the request's JSON {"header"} (the Envelope header's JSON),
then its raw payload bytes; the reply's JSON {"header"} or {"error"}, then its payload.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

MAX_META_BYTES = 64 << 20
FAMILY = "AF_UNIX"


def send_message(conn: Connection, meta: dict[str, Any], payload: bytes) -> None:
    conn.send_bytes(json.dumps(meta).encode())
    conn.send_bytes(payload)


def read_message(conn: Connection) -> tuple[dict[str, Any], bytes]:
    meta = json.loads(conn.recv_bytes(MAX_META_BYTES))
    return meta, conn.recv_bytes()


def forward(socket_path: str, token: str, header_json: str, payload: bytes,
            timeout_s: float = 3600.0, start_wait_s: float = 120.0) -> tuple[str, bytes]:
    """The ClientApp's side: one request to the worker, (reply header JSON, reply payload). Standard library only.

    A worker that has not opened its socket yet (it is still importing torch: the run starts while the workers
    load) is waited for up to `start_wait_s`; whoever started it watches that it stays alive."""
    deadline = time.monotonic() + start_wait_s
    while True:
        try:
            conn = Client(socket_path, family=FAMILY, authkey=token.encode())
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the party worker at {socket_path} is not running ({exc}): the party's compute "
                                   "died or never started; see its log in RUN_DIR/flower/logs") from None
            time.sleep(0.05)
        except Exception as exc:  # AuthenticationError (wrong token) or another OSError
            raise RuntimeError(f"the party worker at {socket_path} refused or is not reachable ({exc!r}); see its "
                               "log in RUN_DIR/flower/logs") from None
    with conn:
        send_message(conn, {"header": header_json}, payload)
        if not conn.poll(timeout_s):
            raise RuntimeError(f"the party worker at {socket_path} did not answer within {timeout_s:.0f} s")
        meta, reply = read_message(conn)
    if "error" in meta:
        raise RuntimeError(f"party worker refused the request: {meta['error']}")
    return str(meta["header"]), reply


def serve(socket_path: Path, token: str, handle: Callable[[str, bytes], tuple[str, bytes]],
          on_ready: Callable[[], None] = lambda: None, log: Callable[[str], None] = print) -> None:
    """Answer requests on `socket_path` (created 0600) from clients that hold `token`, one at a time, with
    `handle(header_json, payload) -> (reply header JSON, reply payload)`, until the process is stopped."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)  # the socket is created 0600: only this user's processes may connect
    try:
        listener = Listener(str(socket_path), family=FAMILY, backlog=4, authkey=token.encode())
    finally:
        os.umask(old_umask)
    on_ready()
    try:
        while True:
            try:
                conn = listener.accept()  # the authkey handshake runs here
            except Exception as exc:  # AuthenticationError, or a client gone mid-handshake
                log(f"refused a connection: {exc!r}")
                continue
            with conn:
                try:
                    meta, payload = read_message(conn)
                except (EOFError, OSError, ValueError) as exc:
                    log(f"dropped a malformed request: {exc!r}")
                    continue
                header, reply = handle(str(meta["header"]), payload)
                send_message(conn, {"header": header}, reply)
    finally:
        with suppress(FileNotFoundError):  # the launcher may have removed the socket already
            listener.close()
        socket_path.unlink(missing_ok=True)


class PartyWorker:
    """Serves one party object over a Unix socket until SIGTERM."""

    def __init__(self, settings: Any, socket_path: Path, token: str) -> None:
        from fedscore.clients.parties import make_party

        self.party = make_party(settings)
        self.socket_path = Path(socket_path)
        self.token = token
        self.served = 0

    def handle_bytes(self, header_json: str, payload: bytes) -> tuple[str, bytes]:
        from fedscore.shared.protocol.messages import Envelope, Header

        reply = self.party.handle(Envelope(header=Header.model_validate_json(header_json), payload=payload))
        self.served += 1
        return reply.header.model_dump_json(), reply.payload

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
        serve(self.socket_path, self.token, self._serve_one, lambda: print(
            f"worker for {self.party.name} ready on {self.socket_path}", flush=True),
            lambda line: print(line, flush=True))

    def _serve_one(self, header_json: str, payload: bytes) -> tuple[str, bytes]:
        started = time.perf_counter()
        header, reply = self.handle_bytes(header_json, payload)
        kind = json.loads(header).get("kind", "?")
        print(f"served {kind} in {time.perf_counter() - started:.2f} s; messages {self.served}, "
              f"state loads {self.party.state_loads}", flush=True)
        return header, reply


def main(argv: list[str] | None = None) -> None:
    """`python -m fedscore.clients.worker --socket PATH`; the party settings and token arrive as JSON on stdin
    (never on the command line, where other users could read the shared secret in the process list)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, type=Path)
    args = parser.parse_args(argv)
    from fedscore.clients.base import PartySettings

    config = json.loads(sys.stdin.read())
    PartyWorker(PartySettings.model_validate(config["settings"]), args.socket, str(config["token"])).serve_forever()


if __name__ == "__main__":
    main()
