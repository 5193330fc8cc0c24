"""The wire between a ClientApp and its party worker (clients/worker.py): multiprocessing.connection with the run's
token as authkey. A round trip carries header and payload unchanged; a client without the token is refused before
anything reaches the party; the socket is owner-only."""

from __future__ import annotations

import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedscore.clients.worker import forward, serve


@pytest.fixture
def worker() -> Iterator[tuple[Path, list[tuple[str, bytes]]]]:
    folder = Path(tempfile.mkdtemp(prefix="fs-w-"))  # short: a Unix socket path has ~100 bytes
    path, seen = folder / "w.sock", []

    def handle(header: str, payload: bytes) -> tuple[str, bytes]:
        seen.append((header, payload))
        return header.upper(), payload[::-1]

    threading.Thread(target=serve, args=(path, "a" * 32, handle), kwargs={"log": lambda line: None},
                     daemon=True).start()
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    yield path, seen  # the folder stays: the serving thread holds the socket until the test process ends


def test_a_round_trip_carries_header_and_payload(worker: tuple[Path, list[tuple[str, bytes]]]) -> None:
    path, seen = worker
    payload = bytes(range(256)) * 5000  # more than one socket buffer
    assert forward(str(path), "a" * 32, '{"kind": "embed"}', payload) == ('{"KIND": "EMBED"}', payload[::-1])
    assert forward(str(path), "a" * 32, "{}", b"") == ("{}", b"")
    assert seen == [('{"kind": "embed"}', payload), ("{}", b"")]
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_a_client_without_the_token_is_refused(worker: tuple[Path, list[tuple[str, bytes]]]) -> None:
    path, seen = worker
    with pytest.raises(RuntimeError, match="refused"):
        forward(str(path), "b" * 32, "{}", b"secret")
    assert seen == []
    assert forward(str(path), "a" * 32, "{}", b"x") == ("{}", b"x")  # the worker serves on


def test_a_missing_worker_is_named(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not running"):
        forward(str(tmp_path / "none.sock"), "a" * 32, "{}", b"", start_wait_s=0.2)
