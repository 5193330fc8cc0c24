"""Screen one-at-a-time variants (issue #13): each variant is its own list of config overrides, run for the given
seeds x keyed splits through `fedscore.experiment.run_experiment` (same runs, results.csv and --resume behaviour
as `fedscore experiment`, whose [grid] crosses axes instead), baselines off to save time.

    nice -n 10 .venv/bin/python scripts/screen_variants.py --data runs/uci-data --out runs/screen \
        --seeds 0 --splits 0,1 'ref:' 'fwd:privacy.rr_loss=forward' \
        'ep3:privacy.rr_loss=forward;privacy.dpsgd_local_epochs=3'

A variant is `label:key=value;key=value` (';' separates overrides, since values such as [64,32] hold commas).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedscore.experiment import RunSpec, run_experiment, split_secrets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--splits", default="0,1", help="keyed split numbers (secret sha256('fedscore-split-k'))")
    parser.add_argument("variants", nargs="+")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    splits = [int(s) for s in args.splits.split(",")]
    secrets = split_secrets(max(splits) + 1)
    runs = []
    for item in args.variants:
        label, _, body = item.partition(":")
        overrides = ["baselines.enabled=false", *(kv for kv in body.split(";") if kv)]
        for seed in seeds:
            for k in splits:
                name = f"{label}-s{seed}-p{k}"
                runs.append(RunSpec(name, label, {"variant": label}, [*overrides, f"seed={seed}"], seed, k,
                                    secrets[k], args.data.resolve(), "inprocess", (args.out / "runs" / name).resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    run_experiment(runs, args.out, jobs=1, resume=True, progress=lambda m, c, t: print(f"[{c}/{t}] {m}", flush=True))


if __name__ == "__main__":
    main()
