"""Parquet sources in an object store: ``s3://`` URLs read through s3fs, against a real S3-compatible
server on 127.0.0.1 (moto's standalone server: in-process mocks would not reach the Dask workers)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import yaml

from batchml.data.sources import parquet_location, protocol, storage_options
from batchml.errors import ConfigError
from batchml.pipeline.nightly import run_job
from conftest import day
from test_cluster import parquet_project, results, run_nights, source  # noqa: F401  (the fixture)

distributed = pytest.importorskip("distributed", reason="the dask extra is installed by `make test`")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")

BUCKET = "landing"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1, and the environment batchml (and worker processes started
    after this) read it from."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"BATCHML_S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield env["BATCHML_S3_ENDPOINT_URL"]
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  scheduler_kwargs={"dashboard_address": ":0"}) as local:
        yield local


def upload(project_root: Path, prefix: str) -> str:
    """The project's landing files into the bucket; returns the source URL."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options())
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    for path in sorted((project_root / "landing").glob("*.parquet")):
        fs.put_file(str(path), f"{BUCKET}/{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}/*.parquet"


def s3_project(root: Path, table, prefix: str, **execution):
    project = parquet_project(root, table, 1, **execution)  # one file: moto answers each request in ~0.1 s
    url = upload(root, prefix)
    config = yaml.safe_load((root / "configs" / "vuln_risk.yaml").read_text())
    config["source"]["parquet"] = url
    project.write_config(config)
    for path in (root / "landing").glob("*.parquet"):
        path.unlink()  # only the bucket holds the rows now
    return project


def test_locations_keep_urls_and_anchor_local_patterns(tmp_path):
    assert parquet_location("s3://b/p/*.parquet", tmp_path) == "s3://b/p/*.parquet"
    assert parquet_location("landing/*.parquet", tmp_path) == str(tmp_path / "landing/*.parquet")
    assert protocol("S3://b/k") == "s3" and protocol("/data/x.parquet") is None


def test_an_s3_source_gives_the_local_files_results_on_both_engines(tmp_path, source, s3_endpoint, cluster):  # noqa: F811
    local = parquet_project(tmp_path / "files", source, 3)
    run_nights(local, nights=(60,))
    expected = results(local)
    on_s3 = s3_project(tmp_path / "s3", source, "local-engine")
    run_nights(on_s3, nights=(60,))
    assert results(on_s3) == expected
    on_dask = s3_project(tmp_path / "dask", source, "dask-engine", engine="dask", scheduler=cluster.scheduler_address)
    run_nights(on_dask, nights=(60,))
    found = results(on_dask)
    assert found["scores"] == expected["scores"] and found["quarantine"] == expected["quarantine"]


def test_an_unsupported_store_is_refused_in_one_line(tmp_path, source):  # noqa: F811
    project = parquet_project(tmp_path / "project", source, 1)
    config = yaml.safe_load((project.root / "configs" / "vuln_risk.yaml").read_text())
    config["source"]["parquet"] = "gs://bucket/x/*.parquet"
    project.write_config(config)
    with pytest.raises(ConfigError, match=r"gs:// is not supported"):
        run_job(project.project, "vuln_risk", as_of=day(60), notify=False)


def test_a_night_reads_only_the_watermark_folders_it_needs_and_gets_the_same_rows(tmp_path, source):  # noqa: F811
    import duckdb
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from batchml.data.extract import batch_filter
    from batchml.storage.source import source_sql

    flat = parquet_project(tmp_path / "flat", source, 3)
    run_nights(flat, nights=(60, 61))
    hive = parquet_project(tmp_path / "hive", source.slice(0, 0), 1)
    (hive.root / "landing" / "part-0.parquet").unlink()
    days = pc.strftime(source.column("ingested_at"), format="%Y-%m-%d")
    for folder in sorted(set(days.to_pylist())):
        target = hive.root / "landing" / f"day={folder}"
        target.mkdir()
        pq.write_table(source.filter(pc.equal(days, folder)), target / "part.parquet")
    config = yaml.safe_load((hive.root / "configs" / "vuln_risk.yaml").read_text())
    config["source"] |= {"parquet": "landing/**/*.parquet", "watermark_partition": "day"}
    hive.write_config(config)
    run_nights(hive, nights=(60, 61))
    ours, theirs = results(hive), results(flat)
    assert ours["scores"] == theirs["scores"] and ours["runs"] == theirs["runs"]
    assert [row[:3] for row in ours["quarantine"]] == [row[:3] for row in theirs["quarantine"]]  # records also name `day`

    job = hive.project.job("vuln_risk")
    con = duckdb.connect()
    plan = con.execute(f"EXPLAIN ANALYZE SELECT count(*) FROM ({source_sql(con, job, hive.root)}) "
                       f"WHERE {batch_filter(job, day(60), day(61))}").fetchall()[0][1]
    assert "Total Files Read: 2" in plan  # the folders of days 60 and 61 of the 110
    assert "ingested_at < '2026-03-03 00:00:00'::TIMESTAMP" in plan  # the watermark test reaches the scan (row groups)


@pytest.mark.parametrize("session", ["warehouse", "scratch"])
def test_a_row_group_bigger_than_the_memory_limit_streams(tmp_path, session):
    """pyarrow writes row groups of up to 1M rows; DuckDB 2.0's Parquet prefetching asked for a whole
    row group in one buffer and failed under the pass's 64 MiB (and the default 256MB at 35 doubles)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batchml.storage.warehouse import memory_connection, open_connection

    rows = 300_000  # 30 doubles: 72 MB in its one row group
    rng = np.random.default_rng(5)
    table = pa.table({f"f{i}": rng.normal(size=rows) for i in range(30)})
    path = tmp_path / "one_row_group.parquet"
    pq.write_table(table, path, row_group_size=rows)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1

    con = open_connection(tmp_path / "w.duckdb", memory_limit="64MB") if session == "warehouse" else memory_connection("64MB", threads=1)
    try:
        con.execute("SET threads = 1")
        reader = con.sql(f"SELECT * FROM read_parquet('{path}')").to_arrow_reader(65_536)
        got = pa.Table.from_batches(list(reader))
    finally:
        con.close()
    assert got.num_rows == rows
    assert np.array_equal(got.column("f29").to_numpy(), table.column("f29").to_numpy())
