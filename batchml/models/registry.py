"""Model registry: versioned artifact folders, their hashes, statuses and the history of decisions.

One folder per version, ``<warehouse dir>/models/<job>/v<N>/``:

- ``model.txt``  LightGBM's own text format (never a pickle)
- ``model.json`` the manifest: ``features``, ``categories``, params, training window, holdout
  metrics, LightGBM version, and the sha256 of every other file in the folder
- ``profile.json`` the drift reference profile; ``golden.parquet`` golden-set inputs and scores

``batchml.models.sha256`` is the hash of ``model.txt`` and ``manifest_sha256`` that of
``model.json``; a model whose files do not match is refused.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import lightgbm as lgb
import numpy as np
import pyarrow.parquet as pq

from batchml.errors import ModelError
from batchml.data.features import FeatureSpec, to_matrix
from batchml.storage.warehouse import fetch_dicts, fetch_one, table_exists

MODEL_FILE, MANIFEST_FILE = "model.txt", "model.json"
GOLDEN_FILE = "golden.parquet"  # golden-set inputs and their scores (retrain.write_golden)
CHAMPION, CHALLENGER, ARCHIVED, REJECTED = "champion", "challenger", "archived", "rejected"


def utcnow() -> datetime:
    """Naive UTC now: the warehouse stores every timestamp in UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def actor() -> str:
    """Who did it: the OS user (recorded with every manual registry change)."""
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return str(os.getuid())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_dir(models_root: Path, job: str, version: int) -> Path:
    return models_root / job / f"v{version}"


@dataclass
class LoadedModel:
    job: str
    version: int
    booster: lgb.Booster
    spec: FeatureSpec
    manifest: dict
    path: Path
    sha256: str
    cache: dict = field(default_factory=dict)  # per-process helpers derived from the model (explainer, compiled predictor)
    # compiled libraries registered in batchml.compiled_libraries: file name -> sha256. Only these are
    # ever loaded; ``compiled`` adds the ones it builds here and to ``unregistered`` until
    # :func:`register_libraries` writes them to the warehouse.
    libraries: dict[str, str] = field(default_factory=dict)
    unregistered: list[dict] = field(default_factory=list)


def golden_matrix(model: LoadedModel) -> np.ndarray:
    """The model's golden rows as its float64 feature matrix (empty if the artifact has none)."""
    path = model.path / GOLDEN_FILE
    if not path.exists():
        return np.empty((0, len(model.spec.features)))
    return to_matrix(pq.read_table(str(path)), model.spec)


def write_artifact(folder: Path, booster: lgb.Booster, manifest: dict) -> tuple[str, str]:
    """Write model.txt and model.json (after any side files already in ``folder``); returns both hashes."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / MODEL_FILE
    booster.save_model(str(model_path))
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}
    manifest = {**manifest, "files": files, "lightgbm_version": lgb.__version__}
    manifest_path = folder / MANIFEST_FILE
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return files[MODEL_FILE], sha256_file(manifest_path)


def clear_orphan(folder: Path) -> None:
    """Remove a folder left by a run that crashed before registering it (never a registered one).

    A symbolic link there is refused, never followed: removing what it points at could delete
    anything the link's author chose, and writing through it would put the model elsewhere."""
    if folder.is_symlink():
        raise ModelError(f"{folder} is a symbolic link (to {os.readlink(folder)}); batchml creates its model folders "
                         f"itself: remove the link, then rerun")
    if folder.exists():
        shutil.rmtree(folder)


def verify(row: dict) -> Path:
    """Check a registered model's files against its recorded hashes; returns its folder."""
    folder = Path(row["artifact_path"])
    label = f"model {row['job']} v{row['version']}"
    model_path, manifest_path = folder / MODEL_FILE, folder / MANIFEST_FILE
    for path in (model_path, manifest_path):
        if not path.exists():
            raise ModelError(f"{label}: {path} is missing; restore the artifact folder or promote another version")
    checks = [(model_path, row["sha256"]), (manifest_path, row["manifest_sha256"])]
    manifest = json.loads(manifest_path.read_text())
    checks += [(folder / name, digest) for name, digest in manifest.get("files", {}).items() if name != MODEL_FILE]
    for path, expected in checks:
        found = sha256_file(path) if path.exists() else "missing"
        if found != expected:
            raise ModelError(
                f"{label}: {path.name} sha256 {found[:12]} does not match the registered {str(expected)[:12]}; "
                f"the artifact was changed after training: restore it, or promote another version"
            )
    return folder


def load(row: dict) -> LoadedModel:
    """Load a registered model after verifying its hashes."""
    folder = verify(row)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    try:
        booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
    except lgb.basic.LightGBMError as exc:
        raise ModelError(f"model {row['job']} v{row['version']}: LightGBM cannot load {folder / MODEL_FILE}: {exc}") from exc
    return LoadedModel(row["job"], row["version"], booster, FeatureSpec.from_dict(manifest), manifest, folder, row["sha256"],
                       libraries=dict(row.get(LIBRARIES) or {}))


LIBRARIES = "compiled_libraries"  # the key under which a registry row carries its registered libraries


def libraries(con: duckdb.DuckDBPyConnection, job: str, version: int) -> dict[str, str]:
    """The compiled libraries registered for a model: file name -> sha256 (none before the table exists)."""
    if not table_exists(con, "batchml.compiled_libraries"):
        return {}
    rows = con.execute("SELECT file, sha256 FROM batchml.compiled_libraries WHERE job = ? AND version = ? ORDER BY registered_at",
                       [job, version]).fetchall()
    return dict(rows)


def register_libraries(con: duckdb.DuckDBPyConnection, model: LoadedModel) -> int:
    """Record the libraries built for ``model`` since it was loaded (their sha256, as built and
    verified in this process); returns how many. The file name is the key: a rebuild replaces its row."""
    pending, model.unregistered = model.unregistered, []
    for library in pending:
        con.execute("DELETE FROM batchml.compiled_libraries WHERE job = ? AND version = ? AND file = ?",
                    [model.job, model.version, library["file"]])
        con.execute("INSERT INTO batchml.compiled_libraries VALUES (?, ?, ?, ?, ?, ?)",
                    [model.job, model.version, library["kind"], library["file"], library["sha256"], utcnow()])
    return len(pending)


# --------------------------------------------------------------------------------------------
# Registry rows
# --------------------------------------------------------------------------------------------


def get(con: duckdb.DuckDBPyConnection, job: str, version: int) -> dict | None:
    return _located(con, fetch_one(con, "SELECT * FROM batchml.models WHERE job = ? AND version = ?", [job, version]))


def champion(con: duckdb.DuckDBPyConnection, job: str) -> dict | None:
    return _located(con, fetch_one(con, "SELECT * FROM batchml.models WHERE job = ? AND status = 'champion'", [job]))


def latest(con: duckdb.DuckDBPyConnection, job: str, status: str) -> dict | None:
    return _located(con, fetch_one(con, "SELECT * FROM batchml.models WHERE job = ? AND status = ? ORDER BY version DESC LIMIT 1",
                                   [job, status]))


def newest_challenger(con: duckdb.DuckDBPyConnection, job: str, after: int) -> dict | None:
    """The newest model after version ``after`` that was trained but not promoted (for shadow scores)."""
    sql = ("SELECT * FROM batchml.models WHERE job = ? AND version > ? AND status IN ('challenger', 'rejected') "
           "ORDER BY version DESC LIMIT 1")
    return _located(con, fetch_one(con, sql, [job, after]))


def last_trained(con: duckdb.DuckDBPyConnection, job: str) -> dict | None:
    """The model trained at the latest cut-off (``created_at`` is the as_of of its training run)."""
    return _located(con, fetch_one(con, "SELECT job, version, created_at, status, artifact_path, run_id FROM batchml.models "
                                        "WHERE job = ? ORDER BY created_at DESC, version DESC LIMIT 1", [job]))


def manifest_spec(row: dict) -> FeatureSpec | None:
    """The features a registered model eats, read from its manifest (unverified: for decisions that
    need no scores, such as whether a retrain would repeat it); None when unreadable."""
    try:
        return FeatureSpec.from_dict(json.loads((Path(row["artifact_path"]) / MANIFEST_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_models(con: duckdb.DuckDBPyConnection, job: str) -> list[dict]:
    rows = fetch_dicts(con, "SELECT * FROM batchml.models WHERE job = ? ORDER BY version", [job])
    home = _home(con)
    return [_beside(home, row) for row in rows]


GATE_EVENTS = ("promoted", "rejected", "no_decision")  # what the gate (or the first run) decided about a version


def gate_decisions(con: duckdb.DuckDBPyConnection, job: str) -> dict[int, dict]:
    """Per version, the gate's decision on the shared holdout: ``event``, ``reason``, the gate's
    figures (``metrics`` JSON) and the champion of the time (``previous_champion``, None for the first)."""
    rows = fetch_dicts(con, f"SELECT version, event, reason, metrics, previous_champion FROM batchml.model_events "
                            f"WHERE job = ? AND event IN {GATE_EVENTS} AND run_id IS NOT NULL "
                            f"QUALIFY row_number() OVER (PARTITION BY version ORDER BY recorded_at DESC) = 1", [job])
    return {row["version"]: row for row in rows}


def _located(con: duckdb.DuckDBPyConnection, row: dict | None) -> dict | None:
    if row is None:
        return None
    return {**_beside(_home(con), row), LIBRARIES: libraries(con, row["job"], row["version"])}


def _home(con: duckdb.DuckDBPyConnection) -> Path | None:
    """The folder of the warehouse file ``con`` is on (None for an in-memory database)."""
    found = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return Path(found[0]).resolve().parent if found and found[0] else None


def _beside(home: Path | None, row: dict) -> dict:
    """``row`` with ``artifact_path`` pointing beside this warehouse when the artifact is there.

    artifact_path is stored absolute (tools and analysts can open it as is), but a project that was
    moved, or a warehouse copied with its ``models/`` folder, must use its own artifacts: the folder
    ``<warehouse dir>/models/<job>/v<N>`` wins when it exists (its hashes are verified all the same).
    """
    beside = None if home is None else home / "models" / row["job"] / f"v{row['version']}"
    if beside is not None and beside.is_dir() and str(beside) != row["artifact_path"]:
        return {**row, "artifact_path": str(beside)}
    return row


def next_version(con: duckdb.DuckDBPyConnection, job: str) -> int:
    return int(con.execute("SELECT coalesce(max(version), 0) + 1 FROM batchml.models WHERE job = ?", [job]).fetchone()[0])


def register(con: duckdb.DuckDBPyConnection, row: dict) -> None:
    """Insert a model row (inside the caller's transaction)."""
    columns = list(row)
    con.execute(
        f"INSERT INTO batchml.models ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
        [json.dumps(v, default=str) if isinstance(v, dict) else v for v in row.values()],
    )


def record_event(
    con: duckdb.DuckDBPyConnection,
    job: str,
    version: int | None,
    event: str,
    *,
    run_id: str | None = None,
    reason: str = "",
    metrics: dict | None = None,
    who: str | None = None,
    previous_champion: int | None = None,
    at: datetime | None = None,
) -> None:
    con.execute(
        "INSERT INTO batchml.model_events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [job, version, event, run_id, reason, json.dumps(metrics or {}, default=str), who or actor(), at or utcnow(), previous_champion],
    )


def set_status(con: duckdb.DuckDBPyConnection, job: str, version: int, status: str) -> None:
    con.execute("UPDATE batchml.models SET status = ? WHERE job = ? AND version = ?", [status, job, version])


def make_champion(
    con: duckdb.DuckDBPyConnection, job: str, version: int, event: str, *, run_id: str | None, reason: str,
    metrics: dict | None = None, who: str | None = None, at: datetime | None = None,
) -> int | None:
    """Archive the current champion (if any), crown ``version`` and record why; returns the old one."""
    current = champion(con, job)
    previous = current["version"] if current else None
    if previous is not None:
        set_status(con, job, previous, ARCHIVED)
    set_status(con, job, version, CHAMPION)
    con.execute("UPDATE batchml.models SET promoted_at = ? WHERE job = ? AND version = ?", [at or utcnow(), job, version])
    record_event(con, job, version, event, run_id=run_id, reason=reason, metrics=metrics, who=who, previous_champion=previous, at=at)
    return previous


def previous_champion(con: duckdb.DuckDBPyConnection, job: str, current: int) -> int | None:
    """The champion ``current`` replaced, from the event that crowned it."""
    row = fetch_one(
        con,
        "SELECT previous_champion FROM batchml.model_events WHERE job = ? AND version = ? AND previous_champion IS NOT NULL "
        "AND event IN ('promoted', 'manual_promote') ORDER BY recorded_at DESC LIMIT 1",
        [job, current],
    )
    return row["previous_champion"] if row else None
