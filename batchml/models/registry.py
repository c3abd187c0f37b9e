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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.parquet as pq

from batchml.errors import ModelError
from batchml.data.features import FeatureSpec, to_matrix

MODEL_FILE, MANIFEST_FILE = "model.txt", "model.json"
GOLDEN_FILE = "golden.parquet"  # golden-set inputs and their scores (retrain.write_golden)
CHAMPION, CHALLENGER, ARCHIVED, REJECTED = "champion", "challenger", "archived", "rejected"

if TYPE_CHECKING:
    from batchml.models.lgbm import lgb
# otherwise imported where a model is written or loaded: commands that only read the registry's
# rows (`runs list`, `models list`, `report`, `prune`) start without LightGBM (~0.1 s a process)


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

    def take_unregistered(self) -> list[dict]:
        """The libraries built since the model was loaded, handed over once to be recorded in the warehouse."""
        pending, self.unregistered = self.unregistered, []
        return pending


def golden_matrix(model: LoadedModel) -> np.ndarray:
    """The model's golden rows as its float64 feature matrix (empty if the artifact has none)."""
    path = model.path / GOLDEN_FILE
    if not path.exists():
        return np.empty((0, len(model.spec.features)))
    with pq.ParquetFile(str(path)) as golden:  # not pq.read_table: pyarrow.dataset imports pandas (batchml.data.arrays)
        return to_matrix(golden.read(), model.spec)


def write_artifact(folder: Path, booster: lgb.Booster, manifest: dict) -> tuple[str, str]:
    """Write model.txt and model.json (after any side files already in ``folder``); returns both hashes."""
    from batchml.models.lgbm import lgb

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


LIBRARIES = "compiled_libraries"  # the key under which a registry row carries its registered libraries


def load(row: dict) -> LoadedModel:
    """Load a registered model after verifying its hashes."""
    from batchml.models.lgbm import lgb

    folder = verify(row)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    try:
        booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
    except lgb.basic.LightGBMError as exc:
        raise ModelError(f"model {row['job']} v{row['version']}: LightGBM cannot load {folder / MODEL_FILE}: {exc}") from exc
    return LoadedModel(row["job"], row["version"], booster, FeatureSpec.from_dict(manifest), manifest, folder, row["sha256"],
                       libraries=dict(row.get(LIBRARIES) or {}))


def manifest_field(row: dict, key: str):
    """One field of a registered model's manifest (unverified, as :func:`manifest_spec`); None when unreadable."""
    try:
        return json.loads((Path(row["artifact_path"]) / MANIFEST_FILE).read_text()).get(key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def manifest_spec(row: dict) -> FeatureSpec | None:
    """The features a registered model eats, read from its manifest (unverified: for decisions that
    need no scores, such as whether a retrain would repeat it); None when unreadable."""
    try:
        return FeatureSpec.from_dict(json.loads((Path(row["artifact_path"]) / MANIFEST_FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
