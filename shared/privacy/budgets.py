"""Privacy budgets written as text: one parser for every place a budget is typed by hand or carried as a string.

A budget is `guarantee=epsilon` (e.g. `lender.labels@payment=2`). It reaches a party three ways: its Flower node
config (`key=eps;key=eps`), `fedscore serve payment --budget key=eps`, and the local runner's
`--budget party:key=eps`. All three go through `parse_budget`, so they accept and refuse the same things.
"""

from __future__ import annotations

from collections.abc import Iterable

EXAMPLE = "lender.labels@payment=2"


def with_slack(target: float) -> float:
    """A budget for an exact eps target: the PLD accountant's pessimistic discretisation (interval 1e-4, an
    absolute error) can land a hair above it, e.g. 0.2001 for randomized response at eps 0.2."""
    return target * 1.0001 + 3e-4


def parse_budget(item: str) -> tuple[str, float]:
    """'lender.labels@payment=2' -> ("lender.labels@payment", 2.0); ValueError says what is wrong, without the item
    (callers name it the way their user wrote it)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ValueError(f"expected guarantee=epsilon, e.g. {EXAMPLE}")
    try:
        return key.strip(), float(value)
    except ValueError:
        raise ValueError(f"{value.strip()!r} is not a number (expected guarantee=epsilon, e.g. {EXAMPLE})") from None


def parse_budgets(text: str | Iterable[str]) -> dict[str, float]:
    """'lender.labels@payment=2;joint.records@outsider=3' (or its items) -> dict: the form a Flower node config
    can carry. ',' separates items too."""
    items = text.replace(",", ";").split(";") if isinstance(text, str) else text
    budgets: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in items)):
        try:
            key, epsilon = parse_budget(item)
        except ValueError as exc:
            raise ValueError(f"budget {item!r}: {exc}") from None
        budgets[key] = epsilon
    return budgets
