"""A party's run state on disk, saved after every step by writing only what changed.

Why: the state is the party's checkpoint, saved before any reply leaves (clients/base.py). It used to be one
`torch.save` of the whole dict after every step: the features of every user (`x`), their IDs, labels and split
were rewritten and fsynced each time although they never change after alignment; at a million users that is
hundreds of megabytes per step. Now:

- `state.pt` holds the small entries (config, channel counters, model and optimizer, plans) plus an index naming,
  for each large entry, its own file in `state.d/`; it is rewritten each step (it is small, and it changes);
- a large entry (a tensor, or a list such as the user IDs) lives in `state.d/<key>-<digest>.pt`, named by its
  content, and is written only when its content changed: a tensor that is the very object saved last time (the
  store holds it, so no other object can take its id), unmodified in place (torch's version counter), is not even
  serialised again; any other is hashed and written only under a digest not on disk yet;
- the order of a save makes every crash safe: new entry files first, then `state.pt` (atomic: the index switches
  in one rename), then entry files no index names any more are removed.

Read a state with `read_state` (clients/state.py `PartyState.load` does): `torch.load(state.pt)` alone gives only
the small entries and the index.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedscore.shared.atomic import atomic_write

ENTRIES_DIR = "state.d"
INDEX = "_entries"  # in state.pt: key -> file name in ENTRIES_DIR
ORDER = "_order"  # in state.pt: every key, in the state's order


class StateFileError(RuntimeError):
    """A state folder that cannot be read back: an entry file its index names is missing."""


def is_large(value: Any) -> bool:
    """Entries kept in a file of their own: tensors and lists (the user IDs), whatever their size, so where an
    entry lives never depends on the data."""
    return isinstance(value, (torch.Tensor, list))


def _unchanged(value: Any, saved: tuple[Any, int] | None) -> bool:
    """Whether `value` is, without reading it, what was saved: the very tensor object saved (held by the store, so
    its id cannot be reused by another) at the same version (every in-place change bumps it). Anything else is
    serialised and compared by content."""
    return (saved is not None and isinstance(value, torch.Tensor) and value is saved[0]
            and value._version == saved[1])


def _remember(value: Any) -> tuple[Any, int] | None:
    return (value, value._version) if isinstance(value, torch.Tensor) else None


def _serialise(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@dataclass
class SaveStats:
    """What the last save wrote: file names and bytes (for tests and benchmarks)."""

    written: list[str] = field(default_factory=list)
    bytes: int = 0


class StateStore:
    """Loads and saves one party's state at `path` (state.pt) and its entry files beside it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.folder = self.path.parent / ENTRIES_DIR
        # key -> ((the tensor saved, its version) or None, file name); the tensor is held, never just its id
        self._saved: dict[str, tuple[tuple[Any, int] | None, str]] = {}
        self.last = SaveStats()

    def load(self) -> dict[str, Any]:
        state, index = _read_state_and_index(self.path)
        self._saved = {key: (_remember(state[key]), name) for key, name in index.items()}
        return state

    def save(self, state: dict[str, Any]) -> SaveStats:
        stats = SaveStats()
        index: dict[str, str] = {}
        small: dict[str, Any] = {}
        for key, value in state.items():
            if not is_large(value):
                small[key] = value
                continue
            previous = self._saved.get(key)
            if previous is not None and _unchanged(value, previous[0]) and (self.folder / previous[1]).exists():
                index[key] = previous[1]
                continue
            data = _serialise(value)
            name = f"{key}-{hashlib.sha256(data).hexdigest()[:24]}.pt"
            if not (self.folder / name).exists():
                atomic_write(self.folder / name, lambda handle, data=data: handle.write(data))
                stats.written.append(name)
                stats.bytes += len(data)
            index[key] = name
            self._saved[key] = (_remember(value), name)
        head = _serialise({**small, INDEX: index, ORDER: list(state)})
        atomic_write(self.path, lambda handle: handle.write(head))
        stats.written.append(self.path.name)
        stats.bytes += len(head)
        for key in [k for k in self._saved if k not in index]:
            del self._saved[key]
        if self.folder.exists():
            keep = set(index.values())
            for old in self.folder.glob("*.pt"):
                if old.name not in keep:
                    old.unlink(missing_ok=True)
        self.last = stats
        return stats


def read_state(path: Path) -> dict[str, Any]:
    """The whole state a party saved at `path` (state.pt): its small entries and every large entry from its own
    file, keys in the order the party had them. A state.pt written before entries had files of their own (one
    dict) reads as it is."""
    return _read_state_and_index(path)[0]


def _read_state_and_index(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """`read_state`, and the index of entry files it read (empty for a one-dict state.pt): state.pt is read once."""
    path = Path(path)
    head = torch.load(path, weights_only=True)
    index = head.pop(INDEX, None)
    order = head.pop(ORDER, None)
    if index is None:
        return head, {}
    folder = path.parent / ENTRIES_DIR
    for key, name in index.items():
        entry = folder / name
        if not entry.exists():
            raise StateFileError(f"{entry}: missing, but {path} names it for its {key!r} entry (state folder "
                                 "damaged or copied in part)")
        head[key] = torch.load(entry, weights_only=True)
    return {key: head[key] for key in (order or list(head))}, index
