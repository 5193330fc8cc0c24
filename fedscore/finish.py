"""What a run folder gets once the coordinator has returned, for every launcher (`train`, `federate`, `run`):
metrics.json from the outcome, the operator's own references, alignment sizes, the privacy report and the bundle.

Why apart from the runners: the in-process runner, the local Flower federation and a deployment's coordinator
(fedscore/deploy.py) all end the same way; only what each holds differs (the data and the secret, or neither).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedscore.local_parties import Homes, key_fingerprints
from fedscore.shared.atomic import write_json_atomic
from fedscore.shared.config import FedConfig
from fedscore.shared.metrics import METRIC_KEYS
from fedscore.shared.run_folder import RunError, RunFolder

EVALUATION_ONLY = ("validation/test-user metrics the lender chose to share, computed with its clean validation/test "
                   "labels (no training label enters them); no privacy guarantee covers them, and they never ship in "
                   "model/. The baselines, training loss and default rate are not here: they are the lender's own "
                   "evaluation (parties/lender/evaluation.json) and, in local runs, the operator's centralized "
                   "reference (parties/centralized.json)")

E2E = "X25519 + HKDF-SHA256 + ChaCha20-Poly1305, keys pinned in each party's settings (shared/protocol/e2e.py)"


def finish_run(run_dir: Path, data_dir: Path | None, config: FedConfig, secret: str | None,
               homes: Homes | None = None, fingerprints: dict[str, str] | None = None,
               bundle: bool = True) -> dict[str, Any]:
    """Write metrics.json from the coordinator's outcome (what the lender shared), the report and the bundle; raise
    if the run was refused.

    The centralized reference needs both parties' data and their secret: a local operator playing both has them and
    writes it to RUN_DIR/parties/centralized.json (fedscore/baselines.py), never into the top-level files; the
    coordinator of a deployment (`fedscore run`) has neither (data_dir None). The lender-only baseline is the
    lender's own evaluation, in its own folder. The key fingerprints come from the homes, or are given. `bundle`:
    gather the two exported parts into RUN_DIR/model (a deployment's parts stay on the parties' machines: `fedscore
    bundle`)."""
    from fedscore.clients.transcript import copy_transcripts
    from fedscore.report import write_reports

    folder = RunFolder(run_dir)
    copy_transcripts(run_dir)  # what each party received, if it recorded (audit.record_transcripts)
    outcome = folder.read_outcome()
    if outcome.get("error"):
        write_reports(run_dir)  # the report says which party refused and what had been released by then
        err = outcome["error"]
        if err.get("party"):  # a party's own decision: resuming would meet the same refusal
            raise RunError(f"run stopped: party {err['party']!r} refused {err['request']!r}: {err['reason']}")
        raise RunError(f"run stopped: the coordinator failed: {err['reason']}{folder.resume_hint()}")
    final = outcome["rounds"][-1]
    t0 = time.perf_counter()
    if config.baselines.enabled and data_dir is not None and secret:
        from fedscore.baselines import write_centralized

        write_centralized(run_dir, _centralized(data_dir, config, secret))
    timing = {**outcome["timing"], "baselines_s": time.perf_counter() - t0}
    timing["total_s"] = timing.get("federation_s", 0.0) + timing["baselines_s"]
    metrics = {
        "evaluation_only": EVALUATION_ONLY,
        "transport": outcome["transport"],
        "test": {k: final[f"test_{k}"] for k in METRIC_KEYS},
        "val": {k: final[f"val_{k}"] for k in METRIC_KEYS if f"val_{k}" in final},
        "rounds": outcome["rounds"],
        "alignment": outcome["alignment"],
        "timing": timing,
        "traffic": {"messages": len(outcome["traffic"]),
                    "payload_bytes": sum(t["sent_bytes"] + t["reply_bytes"] for t in outcome["traffic"])},
        # every party-to-party payload was sealed (there is no switch); what operators compare out of band
        "e2e": {"payloads": E2E, "fingerprints": key_fingerprints(homes) if fingerprints is None else fingerprints},
    }
    write_json_atomic(folder.metrics, metrics)
    if config.baselines.enabled and config.baselines.references and data_dir is not None and secret:
        # the lift kept between tuned references: the local operator's own evaluation, in RUN_DIR/evaluation/ only
        from fedscore.references import write_evaluation

        t1 = time.perf_counter()
        write_evaluation(run_dir, data_dir, config, secret, metrics["test"]["auc"])
        metrics["timing"]["references_s"] = time.perf_counter() - t1
    write_json_atomic(folder.alignment, {  # sizes only, never IDs
        k: outcome["alignment"][k] for k in ("method", "payment_rows", "lender_rows", "intersection", "train",
                                             "val", "test") if k in outcome["alignment"]})
    from fedscore.bundle import assemble_bundle

    privacy = write_reports(run_dir)
    if bundle:
        assemble_bundle(run_dir, config.model_dump(), privacy["guarantees"])
    return metrics


def _centralized(data_dir: Path, config: FedConfig, secret: str) -> dict[str, Any]:
    from fedscore.baselines import centralized_baselines

    return centralized_baselines(data_dir, config, bytes.fromhex(secret))
