"""What the typed folders (`RunFolder` in shared/run_folder.py, `PartyHome` in shared/party_home.py) are made of:
one line per file. Why: each folder names its files once, as class constants, and every caller reaches a file as
an attribute (`folder.config`), never by joining a string of its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, overload


class _Folder(Protocol):
    root: Path


class InFolder:
    """A file or subfolder of a typed folder: `config = InFolder(CONFIG)` makes `folder.config` the path
    `folder.root / CONFIG`; on the class it is the name itself (`RunFolder.config == "config.json"`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, folder: None, owner: Any) -> str: ...

    @overload
    def __get__(self, folder: _Folder, owner: Any) -> Path: ...

    def __get__(self, folder: _Folder | None, owner: Any) -> Path | str:
        return self.name if folder is None else folder.root / self.name
