"""One state save per step at a run's size: the whole state dict, as before issue 20, against only what changed
(clients/state_store.py). Reads a finished run's party states and replays five steps that change what a step
changes (the payment holder's released outputs, each party's sealed reply).

    nice -n 10 .venv/bin/python scripts/bench_state_save.py RUN_DIR
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedscore.clients.state_store import StateStore, read_state
from fedscore.shared.atomic import atomic_write


def main(run_dir: Path) -> None:
    for party in ("payment", "lender"):
        state = read_state(run_dir / "parties" / party / "state.pt")
        work = Path(tempfile.mkdtemp())
        store = StateStore(work / "state.pt")
        store.save(state)  # the first save writes everything
        whole_s, changed_s, written = [], [], []
        for step in range(5):
            if party == "payment":
                state["released"] = state["released"] + (step + 1)
            state["last_payload"] = torch.roll(state["last_payload"], step + 1)
            started = time.perf_counter()
            atomic_write(work / "whole.pt", lambda handle, state=state: torch.save(state, handle))
            whole_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            written.append(store.save(state).bytes)
            changed_s.append(time.perf_counter() - started)
        whole = (work / "whole.pt").stat().st_size
        print(f"{party}: whole state {whole / 1e6:.2f} MB in {min(whole_s) * 1e3:.0f} ms (best of 5); only what "
              f"changed {max(written) / 1e6:.2f} MB in {min(changed_s) * 1e3:.0f} ms")
        shutil.rmtree(work)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
