"""What every fedscore command shares: one console, and one way to show an error the user can fix.

Such an error (bad data or config, a bad model folder, a missing file, a port in use, bad TLS material, a party
home that does not allow serving this model, a refused run, a damaged privacy ledger) is one red line and exit
code 2, never a traceback.
The exception types are imported only when something fails, so `fedscore --help` loads none of their modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

console = Console()


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    console.print(f"[bold yellow]warning:[/] {escape(message)}", soft_wrap=True)


def _fixable() -> tuple[type[BaseException], ...]:
    from fedscore.clients.payment.release_guard import GuardRefused
    from fedscore.clients.payment.served import ServedError
    from fedscore.runs import RunError
    from fedscore.shared.config import ConfigError
    from fedscore.shared.data.tables import DataError
    from fedscore.shared.privacy.ledger_store import LedgerDamaged
    from fedscore.shared.tls import TlsError

    return DataError, ConfigError, RunError, OSError, TlsError, ServedError, GuardRefused, LedgerDamaged


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into `fail`; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Exception as exc:
        if isinstance(exc, _fixable()):
            fail(str(exc))
        raise
