"""Planning the Dask engine's shares: each task reads only the files and row groups that can hold
its part of the night (row-group statistics on the watermark, hive days), shares balanced by rows."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from batchml.cluster.plan import Bounds, Unit, balance, disjoint_keys, plan, units_sql
from batchml.config import parse_job_config
from batchml.storage.source import row_group_ranges
from batchml.storage.warehouse import memory_connection
from conftest import job_config

T0 = datetime(2026, 11, 1)


def config(**source):
    raw = job_config()
    raw["source"] = {"parquet": "landing/*.parquet", "entity_id": "finding_id", "event_time": "found_at",
                     "watermark": "ingested_at", **source}
    return parse_job_config(raw, Path("configs/vuln_risk.yaml"))


def rows(first_day: int, days: int, per_day: int, as_text: bool = False) -> pa.Table:
    """``per_day`` rows landed on each of ``days`` days, in landing order."""
    landed = [T0 + timedelta(days=first_day + i // per_day, minutes=i % per_day) for i in range(days * per_day)]
    column = pa.array([t.isoformat(sep=" ") for t in landed]) if as_text else pa.array(landed, pa.timestamp("us"))
    ids = [f"f{first_day}-{i}" for i in range(len(landed))]
    return pa.table({"finding_id": ids, "found_at": pa.array(landed, pa.timestamp("us")), "ingested_at": column})


def test_only_row_groups_whose_watermark_statistics_meet_the_night_are_read(tmp_path):
    pq.write_table(rows(0, 10, 100), tmp_path / "a.parquet", row_group_size=100)  # one row group per day
    pq.write_table(rows(0, 10, 100, as_text=True), tmp_path / "b.parquet", row_group_size=100)  # text: no usable statistics
    con = memory_connection()
    night = Bounds(T0 + timedelta(days=3), T0 + timedelta(days=6), hive_days=True)
    units = plan(con, config(), str(tmp_path / "*.parquet"), night)
    assert units == [Unit(str(tmp_path / "a.parquet"), 300, 600, False), Unit(str(tmp_path / "b.parquet"), 0, 1000, True)]
    read = con.execute(f"SELECT count(*), min(ingested_at), max(ingested_at) FROM ({units_sql(tuple(units[:1]), {})})").fetchone()
    assert read == (300, T0 + timedelta(days=3), T0 + timedelta(days=5, minutes=99))
    nothing = Bounds(T0 + timedelta(days=20), T0 + timedelta(days=21), hive_days=True)
    assert [u.file for u in plan(con, config(), str(tmp_path / "*.parquet"), nothing)] == [str(tmp_path / "b.parquet")]


def test_hive_days_outside_the_night_are_never_opened_unless_the_filter_ignores_them(tmp_path):
    for day in range(5):
        folder = tmp_path / f"day={(T0 + timedelta(days=day)).date()}"
        folder.mkdir()
        (folder / "part-0.parquet").write_bytes(b"not parquet: opening it would fail")
    keep = tmp_path / f"day={(T0 + timedelta(days=2)).date()}" / "part-0.parquet"
    pq.write_table(rows(2, 1, 10), keep)
    con = memory_connection()
    night = Bounds(T0 + timedelta(days=2), T0 + timedelta(days=2, hours=12), hive_days=True)
    units = plan(con, config(watermark_partition="day"), str(tmp_path / "*" / "*.parquet"), night)
    assert units == [Unit(str(keep), 0, 10, True)]


def test_shares_are_contiguous_cover_every_unit_once_and_are_balanced_by_rows():
    units = [Unit("a", 0, 100, False), Unit("a", 200, 500, False), Unit("b", 0, 50, True), Unit("c", 0, 250, True),
             Unit("d", 0, 100, True), Unit("d2", 0, 100, True)]
    shares = balance(units, 3)
    assert [u for share in shares for u in share] == units  # in order, each once
    sizes = [sum(u.rows for u in share) for share in shares]
    assert len(shares) == 3 and sum(sizes) == 900
    assert max(sizes) - min(sizes) <= max(u.rows for u in units)  # within one unit of the fair share
    assert balance(units[:2], 5) == [(units[0],), (units[1],)]  # never an empty share
    assert balance([], 2) == []


def test_shares_cut_files_at_row_groups_so_they_stay_balanced():
    """Ten files of 8 row groups into 4 shares: cut whole they would be 3, 2, 3 and 2 files."""
    groups = (100,) * 7 + (60,)
    units = [Unit(f"f{i}", 0, 760, True, groups) for i in range(10)]
    shares = balance(units, 4)
    sizes = [sum(u.rows for u in share) for share in shares]
    assert len(shares) == 4 and sum(sizes) == 7600 and max(sizes) - min(sizes) <= 100
    covered = sorted((u.file, u.first, u.end) for share in shares for u in share)
    for file in (f"f{i}" for i in range(10)):  # every file's rows once, in contiguous ranges
        ranges = [(first, end) for f, first, end in covered if f == file]
        assert ranges[0][0] == 0 and ranges[-1][1] == 760 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(u.whole == (u.first == 0 and u.end == 760) for share in shares for u in share)
    assert sum(u.whole for share in shares for u in share) >= 6  # files inside a share are read whole


def test_a_share_lacking_a_column_reads_it_as_null(tmp_path):
    pq.write_table(rows(0, 1, 5).append_column("severity", pa.array(["high"] * 5)), tmp_path / "a.parquet")
    pq.write_table(rows(1, 1, 5), tmp_path / "b.parquet")
    con = memory_connection()
    columns = {row[0]: row[1] for row in con.execute(f"DESCRIBE SELECT * FROM read_parquet('{tmp_path}/*.parquet', union_by_name = true)").fetchall()}
    share = (Unit(str(tmp_path / "b.parquet"), 0, 5, True),)
    assert con.execute(f"SELECT count(*), count(severity) FROM ({units_sql(share, columns)})").fetchone() == (5, 0)


def test_shares_are_disjoint_only_when_every_row_group_has_statistics_and_no_ranges_meet():
    a, b = Unit("a.parquet", 0, 200, True), Unit("b.parquet", 0, 100, False)
    groups = {"a.parquet": [(100, 1, 50), (100, 51, 90)], "b.parquet": [(100, 91, 120), (100, 10, 20)]}
    assert disjoint_keys([(a,), (b,)], groups)  # 1..90 and 91..120 (b's second row group is not b's unit)
    assert not disjoint_keys([(a,), (Unit("b.parquet", 0, 200, True),)], groups)  # 10..20 meets 1..90
    assert not disjoint_keys([(a,), (b,)], {**groups, "b.parquet": [(100, 90, 120)]})  # 90 is in both
    assert not disjoint_keys([(a,), (b,)], {**groups, "b.parquet": [(100, None, None)]})  # no statistics
    assert not disjoint_keys([(a,), (b,)], {**groups, "b.parquet": [(100, "x", "y")]})  # ids of two types
    strings = {"a.parquet": [(100, "a-001", "a-100"), (100, "a-101", "a-200")], "b.parquet": [(100, "b-001", "b-100")]}
    assert disjoint_keys([(a,), (b,)], strings)


def test_row_group_ranges_reads_each_row_groups_id_range_from_the_footers(tmp_path):
    pq.write_table(pa.table({"id": [5, 3, 9, 7], "name": ["d", "b", "a", "c"]}), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.table({"other": [1, 2]}), tmp_path / "b.parquet")  # no id column: nothing known
    files = [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    con = memory_connection("256MB")
    try:
        assert row_group_ranges(con, files, "id") == {files[0]: [(2, 3, 5), (2, 7, 9)], files[1]: [(2, None, None)]}
        assert row_group_ranges(con, files[:1], "name") == {files[0]: [(2, "b", "d"), (2, "a", "c")]}
    finally:
        con.close()
