"""report.html is rendered with autoescape: free text from the run's JSON shows as text, never as markup."""

from __future__ import annotations

import json
from pathlib import Path

from fedscore.report import render

SCRIPT = "<script>alert('x')</script>"


def _run_dir(tmp_path: Path, protects: str, against: str) -> Path:
    """The smallest run directory `render` reads: an outcome without rounds and a one-guarantee privacy report."""
    guarantee = {"protects": protects, "against": against, "epsilon": 1.5, "delta": 1e-6, "accountant": "x",
                 "neighbouring": "replace_one", "mechanisms": [{"kind": "randomized_response", "epsilon": 1.5}],
                 "status": "holds", "view": "v", "run_epsilon": 1.5, "budget": {"lender": 2.0},
                 "per_release": [{"epsilon_after": 1.5}]}
    (tmp_path / "outcome.json").write_text(json.dumps({"transport": "inprocess"}))
    (tmp_path / "privacy-report.json").write_text(json.dumps({"delta": 1e-6, "void": None, "guarantees": [guarantee],
                                                              "releases": {}, "unprotected": []}))
    return tmp_path


def test_guarantee_text_is_escaped(tmp_path: Path) -> None:
    page = render(_run_dir(tmp_path, protects=f"lender.labels{SCRIPT}", against=f"payment{SCRIPT}"))
    assert "<script>" not in page
    assert page.count("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;") == 2  # protects and against, as text
    assert "<b>1.500</b>" in page  # the template's own markup is not escaped
    assert "data:image/png;base64," in page  # the epsilon plot is embedded
