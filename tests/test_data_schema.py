"""The parties' public schema files: bad declarations and mismatched tables stop with the file and column named."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedscore.clients.lender.data import load_lender_table
from fedscore.clients.payment.data import load_payment_table
from fedscore.schema_draft import write_draft
from fedscore.shared.data.schema import load_schema, parse_schema
from tests.conftest import make_party_data

GOOD = """
version = 1
[[columns]]
name = "spend"
type = "numeric"
lower = 0
upper = 1000
transform = "log"
"""


@pytest.mark.parametrize("text, pattern", [
    (GOOD.replace("upper = 1000", "upper = 0"), r"s\.toml: column spend: .*lower < upper"),
    (GOOD.replace('"log"', '"sqrt"'), r"s\.toml: column spend: .*transform"),
    (GOOD.replace("upper = 1000", "upper = 1000\ncolour = 1"), r"s\.toml: column spend: .*colour"),
    (GOOD.replace("upper = 1000\n", ""), r"s\.toml: column spend: .*bounds are required"),
    (GOOD.replace('"numeric"', '"category"'), r"s\.toml: column spend: .*needs its levels"),
    (GOOD + 'reference = 5000\n', r"s\.toml: column spend: .*reference 5000 is outside"),
    ("version = 1\ncolumns = [", r"s\.toml: not valid TOML"),
])
def test_bad_declarations_name_file_and_column(text: str, pattern: str) -> None:
    from fedscore.shared.data.tables import DataError

    with pytest.raises(DataError, match=pattern):
        parse_schema(text, "s.toml")


def test_table_and_schema_must_agree(tmp_path: Path) -> None:
    from fedscore.shared.data.tables import DataError

    make_party_data(tmp_path / "d", population=300)
    (tmp_path / "d" / "lender" / "schema.toml").unlink()
    with pytest.raises(DataError, match=r"lender/schema\.toml missing: declare public bounds"):
        load_lender_table(tmp_path / "d" / "lender")
    path = tmp_path / "d" / "payment" / "features.parquet"
    frame = pd.read_parquet(path)
    frame.assign(extra=1.0).to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"features\.parquet: column extra: not declared in .*schema\.toml"):
        load_payment_table(tmp_path / "d" / "payment")
    frame.drop(columns=["devices"]).to_parquet(path, index=False)
    with pytest.raises(DataError, match=r"features\.parquet: missing column\(s\) devices declared in"):
        load_payment_table(tmp_path / "d" / "payment")


def test_out_of_bounds_values_are_counted_and_clipped(tmp_path: Path) -> None:
    make_party_data(tmp_path / "d", population=300)
    path = tmp_path / "d" / "payment" / "features.parquet"
    frame = pd.read_parquet(path)
    frame.loc[frame.index[:3], "regularity"] = 99.0
    frame.to_parquet(path, index=False)
    table = load_payment_table(tmp_path / "d" / "payment")
    assert table.report["out_of_bounds"]["regularity"] == {"below_lower": 0, "above_upper": 3}
    assert table.columns == load_schema(tmp_path / "d" / "payment").names


def test_draft_reads_back_and_never_overwrites(tmp_path: Path) -> None:
    from fedscore.shared.data.tables import DataError

    make_party_data(tmp_path / "d", population=300)
    out = tmp_path / "draft.toml"
    schema = write_draft(tmp_path / "d" / "lender" / "applicants.parquet", out)
    assert schema.label is not None and schema.names == ["age", "income_band", "requested_amount"]
    assert "review every bound" in out.read_text() and parse_schema(out.read_text(), out) == schema
    with pytest.raises(DataError, match="never overwrites"):
        write_draft(tmp_path / "d" / "lender" / "applicants.parquet", out)
