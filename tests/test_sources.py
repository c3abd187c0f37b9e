"""Parquet sources in an object store: ``s3://`` URLs read through s3fs, against a real S3-compatible
server on 127.0.0.1 (moto's standalone server: in-process mocks would not reach the Dask workers)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchml.data.sources import parquet_location, protocol, storage_options
from batchml.errors import ConfigError
from batchml.pipeline import run_job
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
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
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
    project = parquet_project(root, table, 3, **execution)
    url = upload(root, prefix)
    config = __import__("yaml").safe_load((root / "configs" / "vuln_risk.yaml").read_text())
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
    config = __import__("yaml").safe_load((project.root / "configs" / "vuln_risk.yaml").read_text())
    config["source"]["parquet"] = "gs://bucket/x/*.parquet"
    project.write_config(config)
    with pytest.raises(ConfigError, match=r"gs:// is not supported"):
        run_job(project.project, "vuln_risk", as_of=day(60), notify=False)
