"""Attacks on what each party sees, and the one-run audit of the label guarantee (`fedscore audit`).

Each attack uses only its attacker's own view (RUN_DIR/transcripts/, the party's own state) plus what its threat
model grants, stated beside its result; the auditor alone reads the ground truth (clean labels, canary secrets) to
score it. views.py loads a run, label_leakage.py / reconstruction.py / membership.py attack, one_run.py bounds
epsilon, section.py assembles the report section and its plot.
"""
