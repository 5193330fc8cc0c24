"""The ID column checks both parties run before PSI (and the data loader runs on every party table).

Kept apart from psi.py: they are about the data, not the protocol, and shared/data uses them without PSI.
Messages name rows, never ID values (a party forwards a refusal's reason to the coordinator, which must learn no ID).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from numbers import Integral

import numpy as np

from fedscore.shared.data.tables import DataError


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool | np.bool_)


def _quote(value: object, show_values: bool) -> str:
    return f" ({value!r})" if show_values else ""


def check_ids(ids: Sequence[object], source: str, *, show_values: bool = False) -> list[str]:
    """Validate one party's ID column and return it as the strings PSI hashes.

    IDs must be all `str` or all integers: a column mixing the two usually means a broken export, and casting would
    make "007" and 7 collide or miss silently, so it is refused rather than cast. All-integer columns become their
    decimal strings (the other party must hold the same IDs as integers or as those strings). Missing (None/NaN),
    empty or blank IDs and duplicates are refused, since each would silently drop or misalign users.

    Messages name rows (0-based positions), not ID values, because a party forwards a refusal's reason to the
    coordinator, which must learn no ID; pass `show_values=True` for local checks where quoting the value helps.
    """
    n = len(ids)
    if n == 0:
        raise DataError(f"{source}: no IDs (the ID list is empty)")
    kinds = {type(v) for v in ids}
    if not kinds <= {str}:  # the fast path: nothing but str
        missing = [i for i, v in enumerate(ids) if _is_missing(v)]
        if missing:
            raise DataError(f"{source}: {len(missing)} missing ID(s) (None/NaN), first at row {missing[0]}")
        is_str = [isinstance(v, str) for v in ids]
        is_int = [_is_int(v) for v in ids]
        other = [i for i in range(n) if not (is_str[i] or is_int[i])]
        if other:
            value = ids[other[0]]
            raise DataError(f"{source}: {len(other)} ID(s) of unsupported type, first at row {other[0]} is a "
                            f"{type(value).__name__}{_quote(value, show_values)}; IDs must be all str or all int")
        n_str = sum(is_str)
        if 0 < n_str < n:
            first_int = is_int.index(True)
            first_str = is_str.index(True)
            raise DataError(f"{source}: mixed ID types: {n_str} str and {n - n_str} int "
                            f"(row {first_str} is a str, row {first_int} an int); IDs must be all str or all int "
                            "-- fix the column, they are not converted")
        items = [str(v) for v in ids] if n_str == n else [str(int(v)) for v in ids]
    else:
        items = list(ids)
    blank = [i for i, v in enumerate(items) if not v.strip()]
    if blank:
        raise DataError(f"{source}: {len(blank)} empty or blank ID(s), first at row {blank[0]}")
    if len(set(items)) != n:
        counts = Counter(items)
        duplicated = {v: c for v, c in counts.items() if c > 1}
        first = next(v for v in items if v in duplicated)
        rows = [i for i, v in enumerate(items) if v == first]
        shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
        raise DataError(f"{source}: {len(duplicated)} duplicate ID(s) ({sum(duplicated.values()) - len(duplicated)} "
                        f"extra row(s)); e.g. the ID at rows {shown}{_quote(first, show_values)} appears "
                        f"{duplicated[first]} times")
    return items
