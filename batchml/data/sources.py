"""Parquet sources on local disks or in an object store.

``source.parquet`` may be a local path or glob (relative to the project directory) or an ``s3://``
URL. DuckDB's own S3 support (the httpfs extension) cannot be assumed installable, so an object
store is read through fsspec: an ``s3fs`` filesystem registered on the DuckDB connection that reads
the source (the client's, and each Dask worker's own), after which DuckDB's Parquet reader globs,
prunes row groups by their statistics and reads byte ranges through it like local files.

Credentials and the endpoint come from the environment, never from the YAML: the standard
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` / ``AWS_PROFILE`` /
``AWS_DEFAULT_REGION`` that botocore reads, plus ``BATCHML_S3_ENDPOINT_URL`` for an S3-compatible
store (MinIO, Ceph, a test server) and ``BATCHML_S3_ANON=true`` for public buckets.
"""

from __future__ import annotations

import os
from pathlib import Path


OBJECT_STORES = ("s3", "s3a")


def protocol(location: str) -> str | None:
    """``s3`` for ``s3://bucket/key``; None for a local path."""
    head, sep, _ = location.partition("://")
    return head.lower() if sep else None


def parquet_location(pattern: str, project: Path) -> str:
    """Where the files are: an object-store URL as given, a local pattern made absolute."""
    if protocol(pattern) is not None:
        return pattern
    path = Path(pattern)
    return str(path if path.is_absolute() else project / path)


def storage_options() -> dict:
    """s3fs options from the environment (secrets stay with botocore's own variables)."""
    options: dict = {}
    endpoint = os.environ.get("BATCHML_S3_ENDPOINT_URL")
    if endpoint:
        options["client_kwargs"] = {"endpoint_url": endpoint}
    if os.environ.get("BATCHML_S3_ANON", "").lower() in ("1", "true", "yes"):
        options["anon"] = True
    return options
