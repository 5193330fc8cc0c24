"""Scoring policy both parties' scorers share: the scorecard (points, tiers, limits, reason-code wording)
(`scorecard`), the coarse payment signals (`payment_signals`), and loading a checked model bundle (`bundle`)."""
