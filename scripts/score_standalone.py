#!/usr/bin/env python
"""Reproduce the model's probabilities from the bundle alone: manifest.json + the two ONNX parts + two CSV files.

Why this exists: it is the proof that a scoring bundle is self-contained. It uses only onnxruntime, numpy and the
standard library (json, csv, hashlib) — no fedscore, no torch, no pandas — so anyone (an auditor, the other party,
a different stack) can check that the numbers fedscore reports come from these files and nothing else.

Inputs are RAW feature values (the preprocessing is inside the graphs):
  --payment CSV   header `id,<payment feature columns>` (extra columns ignored; order need not match)
  --lender CSV    header `id,<lender feature columns>` (extra columns, e.g. a label, ignored)
Applicants with no payment row get the zero embedding (format 2 carries no baseline), as fedscore's scoring does.
Output: `id,probability` for every lender row, in file order, to --out or stdout.

    python scripts/score_standalone.py --model RUN_DIR/model --payment p.csv --lender l.csv --out probs.csv
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


# sha256_file and the hash checks in load_manifest repeat fedscore.shared.model.manifest on purpose: this script
# must import nothing from fedscore (that is what it proves), so `duplicates` lists the pair and it stays.
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_manifest(model_dir: Path) -> dict:
    """manifest.json, with every part checked against its sha256 (a swapped part must not score silently)."""
    manifest = json.loads((model_dir / "manifest.json").read_text(encoding="utf-8"))
    for name, part in manifest["parts"].items():
        if Path(part["file"]).name != part["file"]:
            sys.exit(f"error: manifest part {name} points outside the model folder: {part['file']!r}")
        actual = sha256_file(model_dir / part["file"])
        if actual != part["sha256"]:
            sys.exit(f"error: {model_dir / part['file']}: sha256 {actual} != manifest {part['sha256']}")
    return manifest


def read_features(path: Path, columns: list[str]) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [N, len(columns)]) from a CSV with an `id` column, columns picked by name."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            sys.exit(f"error: {path}: empty file")
        missing = [c for c in ["id", *columns] if c not in header]
        if missing:
            sys.exit(f"error: {path}: missing column(s) {', '.join(missing)}")
        id_at = header.index("id")
        at = [header.index(c) for c in columns]
        ids: list[str] = []
        rows: list[list[float]] = []
        for line, record in enumerate(reader, start=2):
            ids.append(record[id_at])
            try:
                rows.append([float(record[j]) for j in at])
            except (ValueError, IndexError):
                sys.exit(f"error: {path}: line {line}: a value in columns {columns} is missing or not a number")
    values = np.array(rows, dtype=np.float32).reshape(len(rows), len(columns))
    if not np.isfinite(values).all():
        sys.exit(f"error: {path}: non-finite value")
    return ids, values


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def probabilities(model_dir: Path, payment_csv: Path, lender_csv: Path) -> tuple[list[str], np.ndarray]:
    manifest = load_manifest(model_dir)
    payment, lender = manifest["parts"]["payment"], manifest["parts"]["lender"]
    payment_ids, payment_x = read_features(payment_csv, payment["feature_names"])
    lender_ids, lender_x = read_features(lender_csv, lender["feature_names"])
    dim = int(manifest["embedding_dim"])
    embedding = np.zeros((len(lender_ids), dim), dtype=np.float32)  # format 2: the baseline is the zero embedding
    if payment_ids:
        payment_embedding = session(model_dir / payment["file"]).run(
            ["embedding"], {"payment_features": payment_x})[0]
        row_of = {user: row for row, user in enumerate(payment_ids)}
        for i, applicant in enumerate(lender_ids):
            row = row_of.get(applicant)
            if row is not None:
                embedding[i] = payment_embedding[row]
    probability = session(model_dir / lender["file"]).run(
        ["probability"], {"lender_features": lender_x, "embedding": embedding})[0]
    return lender_ids, probability


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="folder with manifest.json and the two parts")
    parser.add_argument("--payment", type=Path, required=True, help="CSV: id + raw payment features")
    parser.add_argument("--lender", type=Path, required=True, help="CSV: id + raw lender features")
    parser.add_argument("--out", type=Path, help="CSV to write (default: stdout)")
    args = parser.parse_args(argv)
    ids, probability = probabilities(args.model, args.payment, args.lender)
    handle = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115
    try:
        writer = csv.writer(handle)
        writer.writerow(["id", "probability"])
        writer.writerows((applicant, repr(float(p))) for applicant, p in zip(ids, probability, strict=True))
    finally:
        if args.out:
            handle.close()


if __name__ == "__main__":
    main()
