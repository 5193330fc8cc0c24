"""A party's long-lived worker: the party object, its data and its state kept in memory across Flower messages.

Why: Flower starts a fresh `flwr-clientapp` process for every message. Rebuilding the party there means importing
torch and opacus and reloading the party's state from disk each time, seconds per message. The worker is started
once beside the party's SuperNode (`fedscore federate`), imports everything once, and serves the ClientApp, which
becomes a thin forwarder (clients/flower_client.py) importing only flwr and the standard library.

Every payload still travels through Flower: the worker is the party's compute, not a side channel. It listens on a
Unix socket in the party's run state directory (mode 0600) and answers only a ClientApp that presents this run's
token (compared in constant time). One request per connection, served one at a time (a SuperNode handles one
message at a time anyway). The party checkpoints its state after every message, as before; it loads it only once.

Wire format (both directions): a 4-byte big-endian length and a UTF-8 JSON object, then an 8-byte big-endian length
and the raw payload bytes. Request JSON: {"token", "header"} (header = the Envelope header's JSON); reply JSON:
{"header"} or {"error"}.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

_META = struct.Struct(">I")
_PAYLOAD = struct.Struct(">Q")
MAX_META_BYTES = 64 << 20


def _read_exact(conn: socket.socket, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = conn.recv(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def send_frame(conn: socket.socket, meta: dict[str, Any], payload: bytes) -> None:
    data = json.dumps(meta).encode()
    conn.sendall(_META.pack(len(data)) + data + _PAYLOAD.pack(len(payload)))
    if payload:
        conn.sendall(payload)


def read_frame(conn: socket.socket) -> tuple[dict[str, Any], bytes]:
    (size,) = _META.unpack(_read_exact(conn, _META.size))
    if size > MAX_META_BYTES:
        raise ConnectionError(f"frame header of {size} bytes refused")
    meta = json.loads(_read_exact(conn, size))
    (length,) = _PAYLOAD.unpack(_read_exact(conn, _PAYLOAD.size))
    return meta, _read_exact(conn, length)


def forward(socket_path: str, token: str, header_json: str, payload: bytes,
            timeout_s: float = 3600.0, start_wait_s: float = 120.0) -> tuple[str, bytes]:
    """The ClientApp's side: one request to the worker, (reply header JSON, reply payload). Standard library only.

    A worker that has not opened its socket yet (it is still importing torch: the run starts while the workers
    load) is waited for up to `start_wait_s`; whoever started it watches that it stays alive."""
    deadline = time.monotonic() + start_wait_s
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(timeout_s)
        try:
            conn.connect(socket_path)
            break
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the party worker at {socket_path} is not running ({exc}): the party's compute "
                                   "died or never started; see its log in RUN_DIR/flower/logs") from None
            time.sleep(0.05)
        except OSError as exc:
            conn.close()
            raise RuntimeError(f"the party worker at {socket_path} is not reachable ({exc}); see its log in "
                               "RUN_DIR/flower/logs") from None
    with conn:
        send_frame(conn, {"token": token, "header": header_json}, payload)
        meta, reply = read_frame(conn)
    if "error" in meta:
        raise RuntimeError(f"party worker refused the request: {meta['error']}")
    return str(meta["header"]), reply


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
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: only this user's processes may connect
        try:
            server.bind(str(self.socket_path))
        finally:
            os.umask(old_umask)
        server.listen(4)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
        print(f"worker for {self.party.name} ready on {self.socket_path}", flush=True)
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    self._serve_one(conn)
        finally:
            server.close()
            self.socket_path.unlink(missing_ok=True)

    def _serve_one(self, conn: socket.socket) -> None:
        try:
            meta, payload = read_frame(conn)
        except (ConnectionError, ValueError) as exc:
            print(f"dropped a malformed request: {exc}", flush=True)
            return
        if not hmac.compare_digest(str(meta.get("token", "")), self.token):
            print("refused a request with a wrong token", flush=True)
            send_frame(conn, {"error": "wrong worker token"}, b"")
            return
        started = time.perf_counter()
        header, reply = self.handle_bytes(str(meta["header"]), payload)
        send_frame(conn, {"header": header}, reply)
        kind = json.loads(header).get("kind", "?")
        print(f"served {kind} in {time.perf_counter() - started:.2f} s; messages {self.served}, "
              f"state loads {self.party.state_loads}", flush=True)


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
