"""The online guard's charges: composed before they are needed, refused past the budget without composing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fedscore.clients.payment import release_guard
from fedscore.clients.payment.release_guard import GUARANTEE, LedgerGuard
from fedscore.clients.payment.served import ServedMeta, ServedVersion
from fedscore.clients.payment.service import ReleaseRefused
from fedscore.shared.privacy import ledger as ledger_module
from fedscore.shared.privacy.ledger import ledger_entries


def _served(tmp_path: Path) -> ServedVersion:
    meta = ServedMeta(feature_sigma=3.0, embedding_clip=1.0, feature_neighbouring="replace_one", delta=1e-5,
                      replayable_noise=False)
    return ServedVersion(sha256="ab" * 32, ids=frozenset({"u1", "u2"}), meta=meta, ids_file=tmp_path / "x.ids")


def _no_composing(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """From now on, composing in this process fails the test (the charges must find theirs composed)."""
    calls: list[Any] = []

    def refuse(mechanisms: Any, delta: float) -> tuple[float, str]:
        calls.append(mechanisms)
        raise AssertionError("a charge composed on the answer's path")

    monkeypatch.setattr(ledger_module, "account", refuse)
    return calls


class _SharedPool:
    """The module's composing worker as a guard holds it: a guard's close() shuts its own pool down, this one stays
    for the next guard (the module fixture shuts it down)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        return self.pool.submit(*args, **kwargs)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


@pytest.fixture(scope="module")
def composer() -> Iterator[Any]:
    """ONE composing worker process (the product's `_composer`, spawned at its first task) for the guards of this
    module. Each guard would spawn its own, which imports the accounting stack (~3 CPU-s) and, the guard closed
    without waiting, was still importing while the kill test (now first) timed its own processes. Shut down as a
    guard's close() does it, without waiting: waiting here kept this xdist worker idle for 4-8 s in `make
    test-fast` while the pool finished its last composition."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("FEDSCORE_ACCOUNTING_CACHE", "off")  # inherited by the worker: every composition computed
    pool = release_guard._composer()
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)
    monkeypatch.undo()


@contextmanager
def _fresh_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, budget: float,
                 composer: Any) -> Iterator[tuple[Path, LedgerGuard]]:
    """A guard charging exactly at each raise (ahead=0) in a fresh home, every composition computed (no disk cache),
    composing ahead in the module's worker process; closed when the block ends."""
    monkeypatch.setenv("FEDSCORE_ACCOUNTING_CACHE", "off")
    monkeypatch.setattr(release_guard, "_composer", lambda: _SharedPool(composer))
    home = tmp_path / "home"
    guard = LedgerGuard(home, _served(tmp_path), {GUARANTEE: budget}, ahead=0)
    try:
        yield home, guard
    finally:
        guard.close()


_PARENT = """
import os, sys
from fedscore.clients.payment.release_guard import _composer
pool = _composer()
print(pool.submit(os.getpid).result(), flush=True)  # the worker's pid, once it runs
sys.stdin.read()  # until killed
"""


def test_the_composing_worker_exits_when_the_service_is_killed() -> None:
    """A service killed with SIGKILL cannot stop its pool: the worker must notice and go by itself. First in the
    module: before the module's own composing worker exists, nothing else of this module runs beside it."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from fedscore.shared.waiting import wait_until

    service = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        worker = psutil.Process(int(service.stdout.readline()))  # type: ignore[union-attr]
        assert worker.is_running() and worker.ppid() == service.pid
        os.kill(service.pid, signal.SIGKILL)
        service.wait()

        def gone() -> bool:
            try:
                return not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(gone, 30.0, 0.2, "the composing worker outlived its killed service", AssertionError)
    finally:
        if service.poll() is None:
            service.kill()


def test_the_first_raise_is_charged_exactly_and_finds_its_charge_composed(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           composer: Any) -> None:
    with _fresh_guard(tmp_path, monkeypatch, budget=50.0, composer=composer) as (home, guard):
        assert ledger_entries(home / "privacy-ledger.sqlite", "payment") == []  # ahead=0: nothing charged yet
        calls = _no_composing(monkeypatch)
        guard.before_release("u1")  # worst case 0 -> 1: charged now, from the composition made before serving
        guard.before_release("u2")  # another user's first answer: nothing to charge
        entries = ledger_entries(home / "privacy-ledger.sqlite", "payment")
        assert [e["mechanisms"][0]["count"] for e in entries] == [1]
        assert calls == [] and guard.charged == guard.worst == 1


def test_answers_past_the_budget_are_refused_without_composing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                composer: Any) -> None:
    with _fresh_guard(tmp_path, monkeypatch, budget=3.0, composer=composer) as (home, guard):
        guard.before_release("u1")
        with pytest.raises(ReleaseRefused, match=GUARANTEE):
            for _ in range(40):  # mu grows as sqrt(count): past eps 3 well before 40 answers
                guard.before_release("u1")
        calls = _no_composing(monkeypatch)
        with pytest.raises(ReleaseRefused, match="at least"):  # once the Gaussians alone are over: no composing
            for _ in range(40):
                guard.before_release("u1")
        assert calls == []
        assert ledger_entries(home / "privacy-ledger.sqlite", "payment")[-1]["epsilon_after"] <= 3.0
