"""Atomic file writes (temp file in the same folder, fsync, rename): a reader or a crash never sees half a file,
and a write-ahead record (the privacy ledger) is on disk before the release it records happens."""

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
