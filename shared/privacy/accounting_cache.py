"""A disk cache of accountant results, shared by every process on the machine.

Why: Opacus' PRV accountant and the PLD compositions cost seconds per call (pure Python), and every process that
plans or reports a guarantee asks the same questions again: each party worker, each CLI command, each test. An
epsilon or a calibrated noise multiplier is a pure function of public parameters (the records, delta, the target)
and of the accounting code (the libraries' versions and a digest of our accounting modules), so it is computed once
and read back after.

Nothing in it is computed from users' data: keys and values are the mechanisms' public parameters and the numbers
the accountants return for them. A damaged entry is recomputed and overwritten. `FEDSCORE_ACCOUNTING_CACHE` names
the folder ("off" disables it); default `$XDG_CACHE_HOME/fedscore/accounting` (`~/.cache/...`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from functools import cache
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from fedscore.shared.atomic import write_text_atomic

T = TypeVar("T")


# the code an answer depends on: a change to any of these files is a new cache (stale answers are never read)
_SOURCES = ("accounting.py", "dp_events.py", "calibrate.py", "mechanisms.py", "accounting_cache.py")


@cache
def _libraries() -> str:
    """The accounting libraries' versions and a digest of our own accounting code."""
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in _SOURCES)).hexdigest()[:16]
    return ",".join([*(f"{name}={version(name)}" for name in ("dp-accounting", "opacus")), f"code={code}"])


def cache_dir() -> Path | None:
    value = os.environ.get("FEDSCORE_ACCOUNTING_CACHE")
    if value == "off":
        return None
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedscore" / "accounting"


def cached(kind: str, question: Any, compute: Callable[[], T], encode: Callable[[T], Any] = lambda v: v,
           decode: Callable[[Any], T] = lambda v: v) -> T:
    """`compute()`, or its stored answer to the same `question` (JSON-serialisable public parameters)."""
    folder = cache_dir()
    if folder is None:
        return compute()
    key = hashlib.sha256(json.dumps([kind, _libraries(), question], sort_keys=True, default=str).encode()).hexdigest()
    path = folder / kind / f"{key}.json"
    try:
        return decode(json.loads(path.read_text())["answer"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent or damaged: compute (and overwrite)
    answer = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"question": question, "answer": encode(answer)}, default=str))
    except OSError:
        pass  # a read-only or full disk costs speed, never a result
    return answer
