"""Step 4 of alignment: the order both parties give the aligned users, from HMAC tokens of the intersection.

After PSI (fedscore.shared.alignment.psi) only the lender knows the intersection. It sends the payment holder the
intersection's tokens (fedscore.shared.protocol.splits.keyed_tokens: HMAC under the secret the parties share, 16
bytes), sorted ascending; the payment holder finds its own rows for them. Sorting by a keyed hash gives both parties
the same order without revealing anything the coordinator could link to an ID, and without the order depending on
either party's row order. Kept apart from psi.py because the blacklist check runs the PSI steps without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedscore.shared.alignment.ids import check_ids
from fedscore.shared.alignment.psi import PayloadError, expect_magic, require_intersection
from fedscore.shared.data.tables import DataError
from fedscore.shared.protocol.splits import keyed_tokens

_TOKENS_MAGIC = b"FPT1"  # lender -> payment: sorted alignment tokens
_TOKEN_BYTES = 16


def lender_alignment(ids: Sequence[object], rows: np.ndarray, secret: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Step 4 (lender): the sorted tokens to send (via `tokens_payload`) and its own rows in that same order."""
    items = check_ids(ids, "lender IDs")
    rows = np.asarray(rows, dtype=np.int64)
    tokens = keyed_tokens([items[i] for i in rows.tolist()], secret)
    order = np.argsort(tokens, kind="stable")
    tokens = tokens[order]
    if len(tokens) > 1 and not (tokens[1:] > tokens[:-1]).all():
        raise DataError("lender IDs: two IDs share an alignment token")
    return tokens, rows[order]


def rows_for_tokens(my_ids: Sequence[object], tokens: np.ndarray, secret: bytes) -> np.ndarray:
    """Row indices of `my_ids` whose tokens are `tokens` (sorted, unique), in the tokens' order.

    Raises DataError if a token matches none of my IDs: the parties hold different secrets, an ID list changed
    since PSI, or PSI returned a false positive -- in every case the alignment would be wrong, so it stops here.
    """
    tokens = np.asarray(tokens)
    if tokens.dtype != np.dtype(f"S{_TOKEN_BYTES}"):
        raise PayloadError(f"alignment tokens must be {_TOKEN_BYTES}-byte strings, got dtype {tokens.dtype}")
    require_intersection(tokens, "alignment tokens")
    if len(tokens) > 1 and not (tokens[1:] > tokens[:-1]).all():
        raise PayloadError("alignment tokens are not sorted ascending and unique")
    items = check_ids(my_ids, "my IDs")
    mine = keyed_tokens(items, secret)
    order = np.argsort(mine, kind="stable")
    sorted_mine = mine[order]
    at = np.minimum(np.searchsorted(sorted_mine, tokens), len(sorted_mine) - 1)
    found = sorted_mine[at] == tokens
    if not found.all():
        missing = int((~found).sum())
        raise DataError(f"{missing} of {len(tokens)} alignment token(s) match none of my IDs (different shared "
                        "secret, changed ID list, or a PSI false positive)")
    return order[at].astype(np.int64)


def tokens_payload(tokens: np.ndarray) -> bytes:
    """Sorted tokens as a payload: a 4-byte tag and 16 bytes per aligned user (the coordinator learns the count)."""
    tokens = np.asarray(tokens)
    if tokens.dtype != np.dtype(f"S{_TOKEN_BYTES}"):
        raise PayloadError(f"alignment tokens must be {_TOKEN_BYTES}-byte strings, got dtype {tokens.dtype}")
    return _TOKENS_MAGIC + np.ascontiguousarray(tokens).tobytes()


def tokens_from_payload(payload: bytes) -> np.ndarray:
    body = expect_magic(payload, _TOKENS_MAGIC, "alignment tokens")
    if len(body) % _TOKEN_BYTES:
        raise PayloadError(f"alignment tokens payload of {len(body)} bytes is not a multiple of {_TOKEN_BYTES}")
    return np.frombuffer(body, dtype=f"S{_TOKEN_BYTES}").copy()
