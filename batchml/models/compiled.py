"""Compiled trees: a LightGBM model turned into native code by lleaves (LLVM), cached beside its artifact.

lleaves is optional (``pip install 'batchml[compiled]'``). It scores the same model 4-8x faster
than ``Booster.predict`` (see benchmarks/RESULTS.md) but compiling takes from a fraction of a
second (20 trees) to a minute or more (300 trees x 63 leaves: 40-80 s), so a model is compiled
once — at promotion, by :func:`precompile` — and the library is reused by every later run:

    <model folder>/compiled/<key>.so     the object code lleaves emits
    <model folder>/compiled/<key>.json   its record: sha256 of the .so, verification result, toolchain

``key`` (:func:`cache_key`) hashes the model's sha256, the lleaves and llvmlite versions and the
CPU (LLVM's host CPU name and feature set): a new model, toolchain or machine gets a new library.

**Two kinds of library** (:class:`Kind`). ``scores`` (:data:`SCORES`) predicts. ``leaves``
(:data:`LEAVES`, files ``<key>-leaves.so/.json``, its own key) gives the leaf each tree sends a row
to, as ``Booster.predict(pred_leaf=True)`` does, for reason codes (``reasons``): model.txt rewritten
as a multiclass model whose classes sum several trees' leaf indices as bit fields, compiled to raw
scores (:func:`leaf_model_text`, :class:`LeafPacking`). Measured on a 300-tree x 63-leaf model,
74,000 rows on one thread: 0.06-0.09 s + 0.05 s to unpack, where ``pred_leaf`` takes 0.9 s and one
class per tree took 1.0 s; compiling it took 40 s (scores: 31-40 s).

**Registered, then verified.** A library is native code: loading it runs whatever it holds. So a
library is built only by batchml, verified in memory before it is written (its output matched
LightGBM's — scores to ``TOLERANCE``, leaf indices exactly — on ``VERIFY_ROWS`` rows,
:func:`verification_matrix`: the golden set, the golden set with NaNs, and rows mixing every split
threshold, its float neighbours, every categorical level, 0 and NaN), and its sha256 is registered
in the warehouse (``batchml.compiled_libraries``, via ``LoadedModel.unregistered`` and
``storage.model_rows.register_libraries``): the folder beside it may be writable by more people than the
warehouse. A library whose sha256 is not registered for the model is never loaded — not even in a
child process — but moved aside (``<key>.so.rejected``); the run falls back to LightGBM with a
warning, and ``batchml models compile JOB`` builds and registers a new one. Every load of a
registered library also spot-checks the golden rows, in milliseconds. A model that does not
compile, or compiles to a different output, is recorded as failed (``<key>.json``, a note for the
next run, not a proof of anything) and not retried by nightly runs (a new toolchain means a new
key; :func:`precompile` retries).

**Built by lleaves, loaded without it.** A registered library is linked by llvmlite straight from
the bytes whose sha256 was checked (:class:`batchml.models.library.Library`, called as lleaves calls it): importing
lleaves imports pandas (0.3-0.5 s of a nightly run that needs neither, see
:mod:`batchml.data.arrays`), and lleaves' loader reads model.txt (the leaves kind: rewrites it
first) and the file again. lleaves is imported only to compile.

**Read like LightGBM.** LightGBM reads every |x| <= 1e-35 as 0.0; lleaves compares the value as
given, so :class:`CompiledPredictor` zeroes such tiny values first (:func:`as_lightgbm_reads`).
Verification found the difference on a split at -1e-35 (4e-05 in one score of 2,000).

Engines (``scoring.engine``): ``auto`` compiles at promotion models of at least
``AUTO_MIN_LEAVES`` leaves, and a smaller one in the run that first scores a batch big enough for
the compile to pay for itself (:func:`compile_pays`); it then uses the registered, verified library
of any model. ``compiled`` compiles when no library exists and warns when it must fall back;
``lightgbm`` never comes here. Both kinds follow the same rules, each decided on its own;
:func:`precompile` builds the leaves library once the scores library is built.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from batchml.config import thread_count
from batchml.models.leaf_packing import LeafPacking, leaf_model_text
from batchml.models.library import Library
from batchml.models.verification import total_leaves, verification_matrix
from batchml.models.reasons import leaf_indices
from batchml.models.registry import MODEL_FILE, LoadedModel, golden_matrix, sha256_file, utcnow

__all__ = ["AUTO_MIN_LEAVES", "LEAVES", "SCORES", "CompiledPredictor", "Kind", "LeafPredictor", "as_lightgbm_reads", "available",
           "cache_key", "compile_pays", "compile_seconds", "compiled_for_batch", "compiled_leaves", "compiled_predictor", "leaf_model_text", "precompile", "verification_matrix"]

log = logging.getLogger("batchml")

# Below ~8,000 leaves (e.g. 250 trees x 31 leaves) LightGBM scores a million rows in under ~8 s on
# one core and compiling saves a few seconds a night, while the compile at each promotion costs
# 20 s or more and grows faster than linearly (3,100 leaves: 3.5 s; 6,300: 12-15 s; 18,900: 77 s).
# The demo's models (2,900-4,500 leaves) stay on LightGBM.
AUTO_MIN_LEAVES = 8_000
# For models below that, ``auto`` compiles in the run when the batch is big enough. Measured here
# (one core): LightGBM predicts in 20-42 ns per tree and row (random vs real data), lleaves in 3.5-4.5 ns;
# compiling took 0.09 s for 70 leaves, 0.39 s for 450, 1.0 s for 1,302, 2.5-3.5 s for 3,100, 12-15 s
# for 6,300, 44-77 s for 18,900: about 0.1 s + 0.8 ms a leaf, growing by (1 + leaves / 5,000).
# Conservative: the saving at the low end, the compile at the high end.
SAVED_SECONDS_PER_TREE_ROW = 15e-9
NIGHTS_TO_PAY_BACK = 3  # the library serves every later run of the champion: a night like this one, three times
TOLERANCE = 1e-9
CACHE_DIR = "compiled"
CACHE_FORMAT = 2  # bump when the layout, the compile options below or the input handling change
# fblocksize: trees per cache block. With batchml's batches (100k rows, one thread each, two at once) 16 scored
# 1M rows of the 300 x 63 benchmark model in 1.05 s, lleaves' default 34 in 1.24 s, 8 in 1.08 s, 64 in 1.41 s.
# The leaves library (38 packed classes, see LeafPacking) read 74,000 rows' leaves in 0.06 s with 32, 0.09 s with
# 16 or 64. fcodemodel "small" predicted 12-15% faster (RIP-relative loads of the thresholds) but needs the code
# and its constants mapped within 2 GB of each other, which the MCJIT loader does not promise: kept "large".
# Changing an option changes every cache key: `batchml models compile JOB` rebuilds.
COMPILE_OPTIONS = {"use_fp64": True, "raw_score": False, "fblocksize": 16, "fcodemodel": "large", "finline": True}
LEAF_OPTIONS = {**COMPILE_OPTIONS, "raw_score": True, "fblocksize": 32}
# LightGBM's kZeroThreshold (1e-35f): turning a dense row into (feature, value) pairs, LightGBM
# drops every |x| at or below it, so the trees read it as 0.0. lleaves reads the value as it is,
# which sends e.g. x = -1e-35 the other way at a split on -1e-35 (found by verification: 4e-05).
ZERO_THRESHOLD = float(np.float32(1e-35))

class CompileError(Exception):
    """Compiled trees cannot be used for a model; the message says why (the caller falls back)."""


def available() -> bool:
    """True when lleaves (and so llvmlite) is installed; found, not imported (lleaves imports pandas)."""
    return importlib.util.find_spec("lleaves") is not None and importlib.util.find_spec("llvmlite") is not None


# --------------------------------------------------------------------------------------------
# Kinds of library
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What a compiled library computes, how it is made, and what LightGBM answer it must match."""

    name: str  # "scores" keeps the bare ``<key>`` file names; other kinds add ``-<name>``
    what: str  # in messages: "compiled <what> differ from LightGBM"
    fallback: str  # in warnings, what happens instead
    options: dict  # lleaves compile options
    tolerance: float  # largest difference from LightGBM accepted on the verification rows
    expected: Callable[[object, np.ndarray], np.ndarray]  # LightGBM's answer: (booster, matrix) -> array
    rewrite: Callable[[str], str] | None = None  # model.txt text -> the text lleaves compiles (None: as is)
    layout: str = ""  # of the output, when it is not the model's own: part of the cache key
    outputs: Callable[[LoadedModel], int] = lambda model: model.booster.num_model_per_iteration()  # values per row

    @property
    def suffix(self) -> str:
        return "" if self.name == "scores" else f"-{self.name}"


def _booster_scores(booster, matrix: np.ndarray) -> np.ndarray:
    return booster.predict(matrix, num_threads=1)


def leaf_packing(model: LoadedModel) -> LeafPacking:
    """How ``model``'s leaves library packs leaf indices (read from model.txt once per loaded model)."""
    if "leaf_packing" not in model.cache:
        model.cache["leaf_packing"] = LeafPacking.of_text((model.path / MODEL_FILE).read_text())
    return model.cache["leaf_packing"]


def _booster_leaves(booster, matrix: np.ndarray) -> np.ndarray:
    """LightGBM's leaf indices packed as the leaves library returns them (compared exactly)."""
    return LeafPacking.of_text(booster.model_to_string()).pack(leaf_indices(booster, matrix))


SCORES = Kind("scores", "scores", "compiled trees not used, scoring with LightGBM", COMPILE_OPTIONS, TOLERANCE, _booster_scores)
LEAVES = Kind("leaves", "leaf indices", "compiled leaf indices not used, reason codes use LightGBM's pred_leaf", LEAF_OPTIONS, 0.0,
              _booster_leaves, rewrite=leaf_model_text, layout="packed", outputs=lambda model: leaf_packing(model).classes)


# --------------------------------------------------------------------------------------------
# Cache key
# --------------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def _cpu() -> tuple[str, str]:
    """LLVM's host CPU name and feature string (what lleaves compiles for), else /proc/cpuinfo flags."""
    try:
        import llvmlite.binding as llvm

        return llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten()
    except (ImportError, RuntimeError):
        flags = ""
        try:
            flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
        except OSError:
            pass
        return "unknown", flags


@functools.cache
def _host() -> dict[str, str]:
    cpu, features = _cpu()
    return {
        "lleaves": _version("lleaves"),
        "llvmlite": _version("llvmlite"),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_features": hashlib.sha256(features.encode()).hexdigest()[:16],
        "format": str(CACHE_FORMAT),
    }


def toolchain(kind: Kind = SCORES) -> dict[str, str]:
    """What a ``kind`` library depends on besides the model: compiler versions, CPU, options, kind.

    The scores library has no "kind" entry: its key is the one it had before other kinds existed.
    """
    tools = {**_host(), "options": json.dumps(kind.options, sort_keys=True)}
    if kind.name != "scores":
        tools["kind"] = kind.name
    if kind.layout:
        tools["layout"] = kind.layout
    return tools


def cache_key(model: LoadedModel, tools: dict[str, str] | None = None) -> str:
    """The cache file name stem: changes with the model's sha256 and with ``tools`` (:func:`toolchain`).

    >>> cache_key(model), cache_key(model, toolchain(LEAVES))   # doctest: +SKIP
    ('a3f9c2...', '07be1d...')  (24 hex digits each)
    """
    parts = {"model_sha256": model.sha256, **(tools if tools is not None else toolchain())}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CachePaths:
    library: Path
    record: Path

    @classmethod
    def of(cls, model: LoadedModel, kind: Kind = SCORES) -> CachePaths:
        stem = cache_key(model, toolchain(kind)) + kind.suffix
        folder = model.path / CACHE_DIR
        return cls(folder / f"{stem}.so", folder / f"{stem}.json")


def _compare(expected: np.ndarray, got: np.ndarray) -> float:
    """Largest absolute difference (inf when shapes or missing values disagree); (rows,) is (rows, 1)."""
    expected, got = expected.reshape(len(expected), -1), got.reshape(len(got), -1)
    if expected.shape != got.shape or not np.array_equal(np.isnan(expected), np.isnan(got)):
        return float("inf")
    return float(np.nanmax(np.abs(expected - got))) if len(expected) else 0.0


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_record(model: LoadedModel, kind: Kind, paths: CachePaths, status: str, **fields) -> None:
    record = {
        "status": status, "kind": kind.name, "job": model.job, "version": model.version, "model_sha256": model.sha256,
        "key": paths.library.stem, "toolchain": toolchain(kind), "recorded_at": utcnow().isoformat(), **fields,
    }
    try:
        _write_atomic(paths.record, json.dumps(record, indent=2, default=str).encode())
    except OSError as exc:
        log.warning("model %s v%d: cannot write %s (%s)", model.job, model.version, paths.record, exc.strerror)


# --------------------------------------------------------------------------------------------
# Compile, load, verify
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _model_file(model: LoadedModel, kind: Kind) -> Iterator[Path]:
    """The model file lleaves reads for ``kind``: model.txt itself, or its rewrite in a temporary folder."""
    source = model.path / MODEL_FILE
    if kind.rewrite is None:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="batchml-lleaves-") as scratch:
        rewritten = Path(scratch) / MODEL_FILE
        rewritten.write_text(kind.rewrite(source.read_text()))
        yield rewritten


def _lleaves_compile(model: LoadedModel, kind: Kind, cache: str | None):
    """lleaves' model for ``kind``, compiled (or, when ``cache`` exists, loaded from it)."""
    import lleaves

    with _model_file(model, kind) as source:
        compiled = lleaves.Model(model_file=str(source))
        compiled.compile(cache=cache, **kind.options)  # reads the model file: keep it until done
    return compiled


def as_lightgbm_reads(matrix: np.ndarray) -> np.ndarray:
    """``matrix`` as LightGBM's trees read it: float64, C order, every |x| <= ``ZERO_THRESHOLD`` as 0.0.

    Copies only when such a tiny non-zero value is present (exact zeros are common, tiny ones rare).
    """
    matrix = np.ascontiguousarray(matrix, dtype=np.float64)
    # boolean temporaries only (1 byte a cell, not an 8-byte |x| copy): half the time of np.abs
    tiny = (matrix <= ZERO_THRESHOLD) & (matrix >= -ZERO_THRESHOLD)
    tiny &= matrix != 0.0
    if tiny.any():
        matrix = np.where(tiny, 0.0, matrix)
    return matrix


@dataclass
class CompiledPredictor:
    """Scores with an lleaves library: every core for big matrices, one for small ones.

    The library is plain code over the given arrays, so batches may be scored concurrently, each
    on one thread (``score_batches`` does: one lleaves thread scores 2M rows in 5.2 s, two threads
    splitting each batch take 3.0 s each, i.e. 6 core-seconds)."""

    compiled: object
    name: str = "compiled"

    @property
    def concurrent_batches(self) -> int:
        return thread_count()

    def predict(self, matrix: np.ndarray, threads: int | None = None) -> np.ndarray:
        return self.compiled.predict(as_lightgbm_reads(matrix), n_jobs=threads or thread_count(len(matrix)))


@dataclass
class LeafPredictor:
    """Leaf indices with a leaves library: what ``Booster.predict(pred_leaf=True)`` returns, (rows, trees) int32."""

    compiled: object
    packing: LeafPacking
    name: str = "compiled"

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        packed = self.compiled.predict(as_lightgbm_reads(matrix), n_jobs=thread_count(len(matrix)))
        return self.packing.unpack(packed)


def _verify(model: LoadedModel, kind: Kind, compiled, matrix: np.ndarray | None = None) -> tuple[float, int]:
    """Largest difference from LightGBM on ``matrix`` (default: the verification rows) and its rows."""
    matrix = verification_matrix(model) if matrix is None else matrix
    got = compiled.predict(as_lightgbm_reads(matrix), n_jobs=1)
    return _compare(kind.expected(model.booster, matrix), got), len(matrix)


def _spot_rows(model: LoadedModel) -> np.ndarray:
    """Rows for re-checking a library already vouched for, in milliseconds: the golden set."""
    golden = golden_matrix(model)
    return golden if len(golden) else verification_matrix(model, rows=200)


def _load(model: LoadedModel, kind: Kind, library: Path, code: bytes) -> Library:
    """``library``'s ``code`` (its bytes, as checked), ready to predict."""
    try:
        return Library(code, model.booster.num_feature(), kind.outputs(model), kind.options)
    except Exception as exc:  # whatever llvmlite or LLVM raises
        raise CompileError(f"cannot load {library.name}: {type(exc).__name__}: {exc}") from exc


def _reject(library: Path) -> str:
    """Move a library that failed verification aside (kept for diagnosis); says where it went."""
    aside = library.with_name(library.name + ".rejected")
    try:
        os.replace(library, aside)
    except OSError as exc:
        return f"could not move it aside ({exc.strerror})"
    return f"moved aside to {aside.name}"


def _use_cached(model: LoadedModel, kind: Kind, paths: CachePaths):
    """The cached library, loaded, if its sha256 is the one registered for the model in the
    warehouse; anything else is refused before it is loaded (native code runs as it loads)."""
    code = paths.library.read_bytes()  # hashed and loaded from this one read
    digest = hashlib.sha256(code).hexdigest()
    registered = model.libraries.get(paths.library.name)
    if registered != digest:
        why = "none is registered for it" if registered is None else f"the registered one is {registered[:12]}"
        raise CompileError(f"cached library {paths.library.name} (sha256 {digest[:12]}) is not the library registered for this "
                           f"model in batchml.compiled_libraries ({why}); not loaded, {_reject(paths.library)}; "
                           f"`batchml models compile {model.job}` builds and registers a new one")
    compiled = _load(model, kind, paths.library, code)
    # registered is not proof against every mistake: it must still reproduce this model on its golden rows
    worst, rows = _verify(model, kind, compiled, _spot_rows(model))
    if worst > kind.tolerance:
        raise CompileError(f"cached library {paths.library.name} {kind.what} differ from LightGBM by up to {worst:.3g} "
                           f"on {rows} golden rows although it is registered; {_reject(paths.library)}")
    return compiled


def _build(model: LoadedModel, kind: Kind, paths: CachePaths):
    """Compile, verify in memory, then publish the library (temp file + rename) and its record."""
    temp = paths.library.with_name(f".{paths.library.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    try:
        paths.library.parent.mkdir(parents=True, exist_ok=True)
        cache = str(temp)
    except OSError as exc:
        log.warning("model %s v%d: cannot cache compiled trees in %s (%s)", model.job, model.version, paths.library.parent, exc.strerror)
        cache = None
    try:
        started = time.perf_counter()
        try:
            compiled = _lleaves_compile(model, kind, cache)
        except Exception as exc:  # lleaves raises whatever its parser or LLVM raises
            _write_record(model, kind, paths, "failed", reason=f"compile failed: {type(exc).__name__}: {exc}")
            raise CompileError(f"compile failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        worst, rows = _verify(model, kind, compiled)
        if worst > kind.tolerance:
            _write_record(model, kind, paths, "failed", reason=f"{kind.what} differ from LightGBM by up to {worst:.3g}",
                          max_difference=worst, rows=rows)
            raise CompileError(f"compiled {kind.what} differ from LightGBM by up to {worst:.3g} on {rows} verification rows")
        if cache is not None and temp.exists():
            digest = sha256_file(temp)
            os.replace(temp, paths.library)
            _register(model, kind, paths.library.name, digest)
            _write_record(model, kind, paths, "verified", library_sha256=digest, max_difference=worst, rows=rows,
                          compile_seconds=round(seconds, 2), leaves=total_leaves(model))
        log.info("model %s v%d: compiled %d leaves (%s library) in %.1f s (max difference %.2g)",
                 model.job, model.version, total_leaves(model), kind.name, seconds, worst)
        return compiled
    finally:
        temp.unlink(missing_ok=True)


def _register(model: LoadedModel, kind: Kind, name: str, digest: str) -> None:
    """Vouch for a library this process built and verified: at once for this model object, and in the
    warehouse once the caller writes ``model.unregistered`` (``storage.model_rows.register_libraries``)."""
    model.libraries[name] = digest
    model.unregistered = [entry for entry in model.unregistered if entry["file"] != name]
    model.unregistered.append({"kind": kind.name, "file": name, "sha256": digest})


def _known_failure(model: LoadedModel, paths: CachePaths) -> str | None:
    """The recorded reason this model's own compile failed (nightly runs do not retry it; precompile does)."""
    record = _read_record(paths.record)
    if record.get("status") == "failed" and record.get("model_sha256") == model.sha256 and not paths.library.exists():
        return record.get("reason", "an earlier compile failed")
    return None


def _compiled(model: LoadedModel, kind: Kind, *, build: bool, warn: Callable[[str], None], retry: bool = False):
    """The lleaves model for ``model``: the cached library, else (``build``) a fresh compile, else None.

    A cached library that fails verification is refused; with ``build`` a fresh one replaces it.
    A recorded compile failure is not retried unless ``retry``.
    """
    paths = CachePaths.of(model, kind)
    if paths.library.exists():
        try:
            return _use_cached(model, kind, paths)
        except CompileError as exc:
            if not build:
                raise
            warn(f"model {model.job} v{model.version}: {exc}; compiling it again")
    failure = None if retry else _known_failure(model, paths)
    if failure:
        raise CompileError(f"{failure} (recorded in {paths.record}; `batchml models compile {model.job}` retries)")
    return _build(model, kind, paths) if build else None


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _fallback_message(model: LoadedModel, kind: Kind, reason: str) -> str:
    return f"model {model.job} v{model.version}: {kind.fallback}: {reason}"


def compiled_predictor(model: LoadedModel, required: bool, warn: Callable[[str], None] | None = None) -> CompiledPredictor | None:
    """A verified compiled predictor for ``model``, or None (the caller then uses LightGBM).

    ``required`` (``engine: compiled``) compiles when no library is cached and warns on every
    fallback; otherwise (``engine: auto``) only a cached library of a large enough model is used and
    only a library that fails verification is worth a warning. Decided once per loaded model.
    """
    compiled = _decided(model, SCORES, required, warn)
    return None if compiled is None else CompiledPredictor(compiled)


def compiled_leaves(model: LoadedModel, required: bool, warn: Callable[[str], None] | None = None) -> LeafPredictor | None:
    """A verified leaves library for ``model``'s reason codes, or None (the caller then uses ``pred_leaf``).

    Same rules as :func:`compiled_predictor`, applied to the leaves library.

    >>> leaves = compiled_leaves(model, required=False)             # doctest: +SKIP
    >>> leaves.predict(matrix)  # == model.booster.predict(matrix, pred_leaf=True)
    """
    compiled = _decided(model, LEAVES, required, warn)
    if compiled is None:
        return None
    return LeafPredictor(compiled, leaf_packing(model))


def _decided(model: LoadedModel, kind: Kind, required: bool, warn: Callable[[str], None] | None):
    """The lleaves model to use for ``kind``, or None; decided once per loaded model."""
    memo = ("compiled", kind.name, required)
    if memo not in model.cache:
        model.cache[memo] = _decide(model, kind, required, warn or log.warning)
    return model.cache[memo]


def _decide(model: LoadedModel, kind: Kind, required: bool, warn: Callable[[str], None]):
    if not required and not model.libraries and total_leaves(model) < AUTO_MIN_LEAVES:
        return None  # decided before importing lleaves: a small model without a library of its own
    if not available():
        if required:
            warn(_fallback_message(model, kind, "lleaves is not installed (pip install 'batchml[compiled]')"))
        return None
    had_library = CachePaths.of(model, kind).library.exists()
    try:
        return _compiled(model, kind, build=required, warn=warn)
    except CompileError as exc:
        if required or had_library:
            warn(_fallback_message(model, kind, str(exc)))
        else:
            log.info(_fallback_message(model, kind, str(exc)))
        return None


def compile_seconds(leaves: int) -> float:
    """About how long compiling one library of a model with ``leaves`` leaves takes (see the figures above)."""
    return 0.1 + 8e-4 * leaves * (1 + leaves / 5_000)


def compile_pays(model: LoadedModel, rows: int, kinds: int = 1) -> bool:
    """Whether compiling ``kinds`` libraries of ``model`` costs less than it saves on
    ``NIGHTS_TO_PAY_BACK`` batches of ``rows`` rows (``engine: auto``, in the run that scores them)."""
    saved = rows * model.booster.num_trees() * SAVED_SECONDS_PER_TREE_ROW * NIGHTS_TO_PAY_BACK
    return saved >= kinds * compile_seconds(total_leaves(model))


def compiled_for_batch(model: LoadedModel, rows: int, leaves: bool, warn: Callable[[str], None] | None = None) -> CompiledPredictor | None:
    """``engine: auto`` about to score ``rows`` rows with LightGBM: compile the model now (and its
    leaves library, with ``leaves``) when :func:`compile_pays`; else, or when compiling fails (a
    note in the log, as at promotion), None. What is built is registered with the run's commit
    and loaded by every later run of the model.

    2M rows of a 42-tree model (1,302 leaves): the compile adds ~2 s to the night that builds it
    and saves ~3 s of CPU in each night of that size after it."""
    # the arithmetic first: most batches (every one of the demo's) never import lleaves
    if not compile_pays(model, rows, kinds=2 if leaves else 1) or not available():
        return None
    built = {}
    for kind in (SCORES, LEAVES) if leaves else (SCORES,):
        try:
            built[kind.name] = _compiled(model, kind, build=True, warn=warn or log.warning)
        except CompileError as exc:
            log.info(_fallback_message(model, kind, str(exc)))
            break
        model.cache[("compiled", kind.name, False)] = built[kind.name]  # what compiled_leaves decides from now on
    return CompiledPredictor(built["scores"]) if "scores" in built else None


def precompile(model: LoadedModel, *, force: bool = False, warn: Callable[[str], None] | None = None) -> Path | None:
    """Compile, verify and cache ``model``'s libraries now (at promotion), so nightly runs only load them.

    Builds the scores library and, once it exists, the leaves library (reason codes). Returns the
    scores library, or None when lleaves is missing, the model is smaller than ``AUTO_MIN_LEAVES``
    (unless ``force``, as for ``engine: compiled``) or compiling failed — the reason goes to ``warn``
    (default: the log); scoring then uses LightGBM.
    """
    if not available() or (not force and total_leaves(model) < AUTO_MIN_LEAVES):
        return None
    warn = warn or log.warning
    library = _precompile(model, SCORES, warn)
    if library is not None:
        _precompile(model, LEAVES, warn)
    return library


def _precompile(model: LoadedModel, kind: Kind, warn: Callable[[str], None]) -> Path | None:
    try:
        _compiled(model, kind, build=True, warn=warn, retry=True)
    except CompileError as exc:
        warn(_fallback_message(model, kind, str(exc)))
        return None
    library = CachePaths.of(model, kind).library
    return library if library.exists() else None
