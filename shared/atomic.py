"""Atomic file writes (temp file in the same folder, fsync, rename): a reader or a crash never sees half a file,
and a write-ahead record (the privacy ledger) is on disk before the release it records happens. `write_private` is
the one writer of secrets (keys, tokens, the shared secret): owner-only from the first byte."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], mode: int | None = None) -> None:
    """`write` fills a temporary file beside `path`, which then replaces it; `mode` sets its permissions (the
    temporary file is owner-only, right for ledgers and state, not for files others must read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2).encode()))


def write_text_atomic(path: Path, text: str, mode: int | None = None) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()), mode)


def write_private(path: Path, data: bytes | str, mode: int = 0o600, exclusive: bool = False) -> bool:
    """Write `data` to `path` with permissions `mode` (owner-only by default) from its first byte: a key is never
    readable by others, not even between a write and a chmod. `exclusive`: create the file only if it does not
    exist (O_EXCL; two processes creating one key at once never overwrite each other) and return False, writing
    nothing, when it does; otherwise it is replaced atomically. Returns True when written."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    if not exclusive:
        atomic_write(path, lambda handle: handle.write(raw), mode)
        return True
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(raw)
        handle.flush()
        os.fsync(handle.fileno())
    return True
