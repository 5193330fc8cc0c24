"""Transcripts: what a party received from the other, exactly as received (after every noise), for the attacks.

Why: a privacy claim is only as good as the strongest attack on what the counterparty actually sees. With
`audit.record_transcripts` on, each party writes, per exchange, the user IDs (as in its own data files) and the
array it received for them, to its own state directory (`transcript/round-NNN.npz`); nothing is sent anywhere.
The run then collects them into RUN_DIR/transcripts/ (the local operator plays both parties):

- `payment_view.npz`: `round` (int64 [n]), `id` (str [n]), `gradient` (float32 [n, d]): the gradients the lender
  computed in exchange `round`, one row per training user, as they reached the payment holder (before any local
  rescaling);
- `lender_view.npz`: `round`, `id`, `embedding` (float32 [n, d]): the embeddings the lender received in exchange
  `round`, one row per aligned user.

Works for both transports: the party object writes them (in-process, or in its long-lived Flower worker).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fedscore.shared.run_folder import RunFolder

VIEWS = {"payment": ("payment_view.npz", "gradient"), "lender": ("lender_view.npz", "embedding")}
FOLDER = "transcript"


def record(state_dir: Path, party: str, round_: int, ids: list[str], values: np.ndarray, chunk: int = 0) -> Path:
    """One chunk of one exchange's received array, for `ids`; written whole (temp file + rename), never half."""
    _, key = VIEWS[party]
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2 or values.shape[0] != len(ids):
        raise ValueError(f"{party} transcript: {values.shape} rows for {len(ids)} IDs")
    folder = Path(state_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{round_:03d}-chunk-{chunk:06d}"
    path = folder / f"{name}.npz"
    tmp = folder / f".{name}.tmp.npz"
    np.savez_compressed(tmp, round=np.full(len(ids), round_, dtype=np.int64), id=np.asarray(ids, dtype=str),
             **{key: values})
    tmp.replace(path)
    return path


def collect(state_dir: Path, party: str) -> dict[str, np.ndarray] | None:
    """Every exchange this party recorded, concatenated in round and chunk order; None if it recorded nothing."""
    files = sorted((Path(state_dir) / FOLDER).glob("round-*.npz"))
    if not files:
        return None
    _, key = VIEWS[party]
    parts = [dict(np.load(f, allow_pickle=False)) for f in files]
    return {name: np.concatenate([p[name] for p in parts]) for name in ("round", "id", key)}


def copy_transcripts(run_dir: Path) -> list[Path]:
    """RUN_DIR/parties/<party>/transcript/ -> RUN_DIR/transcripts/<party>_view.npz (for the parties that recorded)."""
    folder = RunFolder(run_dir)
    out = folder.transcripts
    written = []
    for party, (name, _) in VIEWS.items():
        view = collect(folder.party_state(party), party)
        if view is None:
            continue
        out.mkdir(exist_ok=True)
        tmp = out / f".{name}.tmp.npz"
        np.savez_compressed(tmp, **view)
        shutil.move(tmp, out / name)
        written.append(out / name)
    return written


def load_view(path: Path) -> dict[str, np.ndarray]:
    """A view file as arrays, checked: the same number of rows in each, a 2-D float array."""
    with np.load(path, allow_pickle=False) as data:
        view = {k: data[k] for k in data.files}
    key = "gradient" if "gradient" in view else "embedding"
    if not {"round", "id", key} <= set(view) or view[key].ndim != 2 or not (
            len(view["round"]) == len(view["id"]) == len(view[key])):
        raise ValueError(f"{path}: not a transcript (expected arrays round, id and gradient or embedding, "
                         "one row each)")
    return view
