"""Kill a party worker mid-run, resume, and compare with an uninterrupted run (BENCHMARKS.md, "Resume").

`python scripts/bench_resume.py --data DIR --out FOLDER [--set k=v ...]`: two `fedscore federate` runs with the same
settings and shared secret, each with fresh party homes: one uninterrupted; one whose lender worker is SIGKILLed once
the payment holder has served round 1's embed (round 2 of R under way), then `fedscore federate --resume`. Prints a
markdown table: wall time of each command, test AUC, per-guarantee epsilon from each run's privacy report, and each
party's number of ledger charges. Real (OS-keyed) noise unless the settings say otherwise, so the two models differ
by their DP noise as two uninterrupted runs would.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

FEDSCORE = str(Path(sys.executable).parent / "fedscore")


def _served(log: Path) -> int:
    return sum(line.startswith("served ") for line in log.read_text().splitlines()) if log.exists() else 0


def _run(args: list[str], home: Path) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "FEDSCORE_HOME": str(home)})
    return time.perf_counter() - started, done


def _summary(run_dir: Path, home: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    report = json.loads((run_dir / "privacy-report.json").read_text())
    from fedscore.shared.party_home import PartyHome
    from fedscore.shared.privacy.ledger import ledger_entries

    charges = {p: len(ledger_entries(home / "parties" / p / PartyHome.LEDGER, p))
               for p in ("payment", "lender")}
    return {"auc": metrics["test"]["auc"], "rounds": len(metrics["rounds"]), "charges": charges,
            "epsilon": {f"{g['protects']}@{g['against']}": round(g["epsilon"], 4) for g in report["guarantees"]},
            "runs": sorted({r for g in report["guarantees"] for r in g["runs"]})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=False)
    secret = args.out / "secret.hex"
    secret.write_text(secrets.token_hex(16))
    common = ["--data", str(args.data), "--secret-file", str(secret), *[x for s in args.set for x in ("--set", s)]]

    whole_s, whole = _run([FEDSCORE, "federate", "--out", str(args.out / "uninterrupted"), *common],
                          args.out / "home-uninterrupted")
    assert whole.returncode == 0, whole.stdout + whole.stderr

    crashed_dir, crashed_home = args.out / "crashed", args.out / "home-crashed"
    started = time.perf_counter()
    cli = subprocess.Popen([FEDSCORE, "federate", "--out", str(crashed_dir), *common], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env={**os.environ, "FEDSCORE_HOME": str(crashed_home)})
    logs = crashed_dir / "flower" / "logs"
    while cli.poll() is None and _served(logs / "worker-payment.log") < 4:  # setup, alignment, embeds 0 and 1
        time.sleep(0.2)
    pids = json.loads((crashed_dir / "flower" / "pids.json").read_text())
    os.kill(pids["worker-lender"], signal.SIGKILL)
    killed_at = time.perf_counter() - started
    output, _ = cli.communicate()
    failed_s = time.perf_counter() - started
    assert cli.returncode != 0, output
    checkpoint = json.loads((crashed_dir / "checkpoint.json").read_text())
    resume_s, resumed = _run([FEDSCORE, "federate", "--resume", str(crashed_dir)], crashed_home)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    a = _summary(args.out / "uninterrupted", args.out / "home-uninterrupted")
    b = _summary(crashed_dir, crashed_home)
    print(f"lender worker SIGKILLed {killed_at:.1f} s into the run; the command failed after {failed_s:.1f} s "
          f"with: {' '.join(output.split()[-40:])}")
    print(f"checkpoint at the kill: next step {checkpoint['next_step']} of {checkpoint['total_steps']}")
    print("| run | wall s | rounds | test AUC | charges payment / lender | epsilon | run ids |")
    print("|---|---|---|---|---|---|---|")
    print(f"| uninterrupted | {whole_s:.1f} | {a['rounds']} | {a['auc']:.4f} | {a['charges']['payment']} / "
          f"{a['charges']['lender']} | {a['epsilon']} | {len(a['runs'])} |")
    print(f"| killed + resumed | {failed_s:.1f} + {resume_s:.1f} | {b['rounds']} | {b['auc']:.4f} | "
          f"{b['charges']['payment']} / {b['charges']['lender']} | {b['epsilon']} | {len(b['runs'])} |")
    print(f"AUC difference {abs(a['auc'] - b['auc']):.4f}")


if __name__ == "__main__":
    main()
