"""Opening a Dask client: the scheduler's address, or a LocalCluster on this machine."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from batchml.config import JobConfig
from batchml.errors import ClusterError, ConfigError

SCHEDULER_ENV = "BATCHML_DASK_SCHEDULER"
CONNECT_SECONDS = 5  # an unreachable scheduler fails the run this fast, naming the address


def scheduler_address(config: JobConfig, cluster: str | None = None) -> str | None:
    """Where the cluster is: ``--cluster``, else ``BATCHML_DASK_SCHEDULER``, else ``execution.scheduler``
    (None: start a LocalCluster)."""
    return cluster or os.environ.get(SCHEDULER_ENV) or config.execution.scheduler


@contextmanager
def open_client(config: JobConfig, address: str | None) -> Iterator:
    """A connected ``distributed.Client``, closed (with its LocalCluster, if it started one) on exit."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ConfigError("execution.engine dask needs Dask: pip install 'batchml[dask]'") from exc
    logging.getLogger("distributed").setLevel(logging.ERROR)  # its connection retries are ours to report
    if address is None:
        workers = config.execution.workers or os.cpu_count() or 1
        # no dashboard; the scheduler's HTTP server on a free port, not 8787 (another cluster may hold it)
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                          scheduler_kwargs={"dashboard_address": ":0"}) as cluster, \
                Client(cluster) as client:
            yield client
        return
    refused = _refused(address)
    if refused is not None:  # nothing listens there: known at once, not after Dask's retries
        raise ClusterError(_unreachable(config, address, refused))
    try:
        client = Client(address, timeout=f"{CONNECT_SECONDS}s")
    except (OSError, TimeoutError, ValueError) as exc:
        raise ClusterError(_unreachable(config, address, (str(exc).strip().splitlines() or [type(exc).__name__])[0])) from exc
    try:
        yield client
    finally:
        client.close()


def worker_count(client) -> int:
    return max(1, len(client.scheduler_info(n_workers=-1)["workers"]))


def _unreachable(config: JobConfig, address: str, why: str) -> str:
    return (f"cannot reach the Dask scheduler at {address} ({why}); start it (`dask scheduler`) or fix "
            f"--cluster / {SCHEDULER_ENV} / execution.scheduler in configs/{config.job}.yaml")


def _refused(address: str) -> str | None:
    """Why nothing listens at a ``tcp://host:port`` address when the host says so at once (connection
    refused); None when something answers, or when only Dask's own retries can tell (an unreachable
    host, a name that does not resolve, another protocol): those take ``CONNECT_SECONDS``."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number: Dask says what is wrong with the address
        return None
    if parts.scheme != "tcp" or host is None or port is None:
        return None
    try:
        with socket.create_connection((host, port), timeout=CONNECT_SECONDS):
            return None
    except ConnectionRefusedError:
        return "connection refused"
    except OSError:
        return None
