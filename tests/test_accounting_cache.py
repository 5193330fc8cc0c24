"""The accountant's disk cache: the same question gets the same answer without recomputing, a different question
or damaged entry is recomputed, and "off" turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedscore.shared.privacy import accounting_cache
from fedscore.shared.privacy.accounting import _account_uncached, account
from fedscore.shared.privacy.mechanisms import GaussianRelease


def _counting(value: float) -> tuple[list[int], object]:
    calls: list[int] = []

    def compute() -> float:
        calls.append(1)
        return value

    return calls, compute


def test_an_answer_is_computed_once_and_read_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSCORE_ACCOUNTING_CACHE", str(tmp_path))
    calls, compute = _counting(1.5)
    assert accounting_cache.cached("t", {"q": 1}, compute) == 1.5
    assert accounting_cache.cached("t", {"q": 1}, compute) == 1.5
    assert len(calls) == 1
    assert accounting_cache.cached("t", {"q": 2}, compute) == 1.5 and len(calls) == 2  # another question


def test_a_damaged_entry_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSCORE_ACCOUNTING_CACHE", str(tmp_path))
    calls, compute = _counting(2.0)
    accounting_cache.cached("t", {"q": 1}, compute)
    (entry,) = (tmp_path / "t").glob("*.json")
    entry.write_text("{not json")
    assert accounting_cache.cached("t", {"q": 1}, compute) == 2.0 and len(calls) == 2


def test_off_never_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSCORE_ACCOUNTING_CACHE", "off")
    calls, compute = _counting(3.0)
    accounting_cache.cached("t", {"q": 1}, compute)
    accounting_cache.cached("t", {"q": 1}, compute)
    assert len(calls) == 2


def test_account_reads_back_what_the_accountant_computed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSCORE_ACCOUNTING_CACHE", str(tmp_path))
    records = (GaussianRelease(noise_multiplier=2.0 + 1e-7, sensitivity=1.0, clip=1.0, count=3,
                               protects="payment.features", seen_by="lender"),)
    first = account(records, 1e-6)
    assert list((tmp_path / "account").glob("*.json"))
    assert first == pytest.approx(_account_uncached(records, 1e-6))
    assert account(records, 1e-6) == first
