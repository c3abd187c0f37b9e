"""Training a challenger on a Dask cluster (``training.engine: dask``) with ``lightgbm.dask``.

The rows are the nightly run's own: the point-in-time training pull and ``split_by_time``, on the
client. The client encodes them with the same :class:`FeatureSpec` as local training (categoricals
as indices into ``model.json``'s ``categories``), deals the fit rows out to the workers round-robin
(each worker holds a sample of the whole window, so its share looks like the others') and scatters
them; ``DaskLGBMClassifier`` trains data-parallel (``tree_learner: data``). The booster it returns
is an ordinary LightGBM model: saved, gated, registered, compiled and scored like any other.

Early stopping: lightgbm.dask would judge each worker's own share of the validation tail, and
workers stopping at different rounds hang each other. So every round is grown, the validation
tail's loss after each round is computed here, and the model is cut at the round LightGBM's
early stopping picks from those losses (the same rule as ``lgb.early_stopping``).

Bins: each LightGBM worker would find the bin edges of its features from its own rows only (a
different model from local training). With ``training.forced_bins`` every worker gets the same
edges (``forcedbins_filename``), taken from a seeded sample of the fit rows as LightGBM does.

Faults: a worker that dies leaves the others waiting in LightGBM's network calls (up to
``time_out`` minutes). A watchdog notices a training worker leaving, cancels the fit, restarts the
surviving training workers (the only way to free them) and retries the whole fit once; a second
failure fails the run in one line (nothing committed; the champion keeps scoring).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np

from batchml.cluster.connect import open_client, scheduler_address
from batchml.config import JobConfig
from batchml.data.features import FeatureSpec, fit_spec, to_matrix
from batchml.errors import ClusterError
from batchml.models.lgbm import with_estimators
from batchml.models.train import Split, TrainedModel, labels, lightgbm_params, trainable_labels, trained_model

log = logging.getLogger("batchml")
lgb = with_estimators()  # lightgbm.dask is built on its scikit-learn estimators (see models.lgbm)

POLL_SECONDS = 0.5  # how often the watchdog asks the scheduler which workers are alive
REJOIN_SECONDS = 30  # how long a retry waits for the lost worker to be back (a nanny restarts it)
BIN_SAMPLE_ROWS = 200_000  # LightGBM's own bin_construct_sample_cnt
ATTEMPTS = 2


class TrainingLost(Exception):
    """One attempt of the distributed fit failed (a worker left, or a training task failed)."""


@contextmanager
def dask_trainer(config: JobConfig, client=None, cluster: str | None = None) -> Iterator:
    """A ``fitter(split, config)`` for :func:`batchml.models.retrain.train_candidate` training on the
    cluster: ``client`` (the Dask engine's run), else the execution cluster's (opened here)."""
    if client is not None:
        yield partial(fit_on_cluster, client=client)
        return
    with open_client(config, scheduler_address(config, cluster)) as opened:
        yield partial(fit_on_cluster, client=opened)


def fit_on_cluster(split: Split, config: JobConfig, client) -> TrainedModel:
    """Train on ``split.fit`` on the cluster, cut at the early-stopping round of ``split.validation``."""
    y_fit = trainable_labels(split, config)
    started = time.perf_counter()
    spec = fit_spec(split.fit, config.features.numeric, config.features.categorical)
    x_fit = to_matrix(split.fit, spec)
    params = cluster_params(config)
    bins = forced_bins(x_fit, spec, int(params.get("max_bin", 255)), config.training.seed) if config.training.forced_bins else None
    booster, workers = fit_with_retry(client, config, scattered(x_fit, y_fit), spec, bins)
    booster = cut_at_early_stop(booster, config, split.validation, spec)
    return trained_model(booster, spec, recorded_params(config, workers, bins is not None), split, started)


def cluster_params(config: JobConfig) -> dict:
    params, _, _ = lightgbm_params(config)
    params.update(tree_learner="data", time_out=config.training.time_out_minutes)
    return params


def recorded_params(config: JobConfig, workers: int, forced: bool, **more) -> dict:
    """What ``params`` records of a distributed fit."""
    params, rounds, early = lightgbm_params(config)
    return {**cluster_params(config), "num_boost_round": rounds, "early_stopping_rounds": early, "engine": "dask",
            "num_machines": workers, "forced_bins": forced, **more}


def fit_with_retry(client, config: JobConfig, place, spec: FeatureSpec, bins: list[dict] | None = None) -> tuple[lgb.Booster, int]:
    """The distributed fit of the rows ``place`` puts on the workers, retried once when a worker is
    lost; a second loss fails the run in one line."""
    _, rounds, _ = lightgbm_params(config)
    params = cluster_params(config)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fit_once(client, place, spec, params, rounds, bins)
        except TrainingLost as exc:
            if attempt == ATTEMPTS:
                raise ClusterError(f"training {config.job} on the Dask cluster failed twice ({exc}); nothing was committed and "
                                   f"the champion keeps scoring; check the workers (memory, logs) and rerun, or set "
                                   f"training.engine: local") from None
            log.warning("%s: distributed training failed (%s); retrying the whole fit once", config.job, exc)
            rejoin(client, 1)
    raise AssertionError("unreachable")


def cut_at_early_stop(booster: lgb.Booster, config: JobConfig, validation, spec: FeatureSpec) -> lgb.Booster:
    """The booster cut at the round ``lgb.early_stopping`` would keep for the validation tail's losses."""
    _, _, early = lightgbm_params(config)
    best = booster.current_iteration()
    if early and validation.num_rows:
        best = early_stopping_round(validation_losses(booster, to_matrix(validation, spec), labels(validation)), early)
    if best < booster.current_iteration():  # model.txt alone must reproduce every score: keep only those trees
        booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    return booster


def scattered(x_fit: np.ndarray, y_fit: np.ndarray):
    """Placement of rows the client holds: dealt round-robin to the workers (every share a sample
    of the whole window) and scattered."""
    def place(client, workers: list[str]) -> tuple[list, list, list[str]]:
        import dask.array as da

        n = min(len(workers), len(x_fit))
        x_parts, y_parts = [], []
        for i, worker in enumerate(workers[:n]):
            x, y = np.ascontiguousarray(x_fit[i::n]), y_fit[i::n]
            x_parts.append(da.from_delayed(client.scatter(x, workers=[worker], hash=False), shape=x.shape, dtype=np.float64))
            y_parts.append(da.from_delayed(client.scatter(y, workers=[worker], hash=False), shape=y.shape, dtype=np.float64))
        return x_parts, y_parts, workers[:n]
    return place


def fit_once(client, place, spec: FeatureSpec, params: dict, rounds: int, bins: list[dict] | None) -> tuple[lgb.Booster, int]:
    """One attempt: the fit rows on the workers (``place(client, workers)`` -> x parts, y parts, the
    workers holding them) and ``DaskLGBMClassifier`` trained on them under the watchdog.
    Returns the booster and the number of workers that trained it."""
    held_before = set(client.futures)
    try:
        return _fit_once(client, place, spec, params, rounds, bins, held_before)
    except (TrainingLost, ClusterError):
        raise
    except Exception as exc:  # the data could not reach a worker (one died or restarts): this attempt is lost
        abandon(client, [], held_before)
        raise TrainingLost(one_line(exc)) from exc


def _fit_once(client, place, spec, params, rounds, bins, held_before) -> tuple[lgb.Booster, int]:
    import dask.array as da

    workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    if not workers:
        raise TrainingLost("the cluster has no workers")
    params = dict(params)
    if bins is not None:
        params["forcedbins_filename"] = share_file(client, workers, json.dumps(bins))
    x_parts, y_parts, training = place(client, workers)
    model = lgb.DaskLGBMClassifier(client=client, n_estimators=rounds, **params)
    cat = spec.categorical_indices or "auto"
    fitted = watched(client, training, held_before,
                     lambda: model.fit(da.concatenate(x_parts), da.concatenate(y_parts), feature_name=spec.features,
                                       categorical_feature=cat))
    return lgb.Booster(model_str=fitted.booster_.model_to_string()), len(training)


def watched(client, workers: list[str], held_before: set, fit):
    """Run ``fit()`` in a thread and watch the training workers: one that leaves ends the attempt at
    once (LightGBM would wait for it up to its ``time_out``), after freeing the others."""
    outcome: dict = {}

    def run() -> None:
        try:
            with warnings.catch_warnings():  # lightgbm.dask sets each worker's threads itself, and says so
                warnings.filterwarnings("ignore", message="Parameter n_jobs will be ignored")
                outcome["model"] = fit()
        except BaseException as exc:  # noqa: BLE001 - reported by the watchdog below
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="batchml-dask-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(POLL_SECONDS)
        alive = set(client.scheduler_info(n_workers=-1)["workers"])
        gone = [w for w in workers if w not in alive]
        if gone and thread.is_alive():
            abandon(client, [w for w in workers if w in alive], held_before)
            thread.join(10)
            raise TrainingLost(f"worker {gone[0]} left during training")
    if "error" in outcome:  # a training task failed (a lost worker's, or LightGBM's network time_out)
        alive = set(client.scheduler_info(n_workers=-1)["workers"])
        abandon(client, [w for w in workers if w in alive], held_before)
        raise TrainingLost(one_line(outcome["error"]))
    return outcome["model"]


def one_line(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def abandon(client, survivors: list[str], held_before: set) -> None:
    """Cancel the attempt's tasks and restart the training workers still alive: they sit in
    LightGBM's network calls, waiting for the lost worker, and no task cancel reaches them."""
    from distributed import Future

    keys = [key for key in list(client.futures) if key not in held_before]
    if keys:
        client.cancel([Future(key, client) for key in keys], force=True)
    if survivors:
        try:
            restart_stuck(client, survivors)
        except Exception as exc:  # noqa: BLE001 - no nanny: LightGBM's time_out frees them instead
            log.warning("could not restart the training workers (%s); they are freed by training.time_out_minutes", exc)


RESTART_SECONDS = 60  # how long abandon waits for the nannies to bring the stuck workers back
EXIT_SECONDS = 5  # ... and for the scheduler to see them go


def restart_stuck(client, workers: list[str]) -> None:
    """Restart ``workers``, stuck in LightGBM's network calls: those with a nanny end their process
    at once and the nanny starts a fresh one. ``restart_workers`` first asks each worker to close
    and waits 4 s for its task thread, which never comes back from LightGBM, before killing it
    (measured: 4.4 s for a busy worker, 0.5 s for an idle one); workers without a nanny go through it as before."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    nannied = [w for w in workers if info.get(w, {}).get("nanny")]
    if len(nannied) < len(workers):
        client.restart_workers([w for w in workers if w not in nannied], timeout=RESTART_SECONDS, raise_for_error=False)
    if not nannied:
        return
    expected = len(client.scheduler_info(n_workers=-1)["workers"])
    client.run(_exit_now, workers=nannied, wait=False)
    # gone first (the scheduler drops a worker whose connection closes, long before its nanny has
    # started another, which may take the same address), then back in number
    deadline = time.monotonic() + EXIT_SECONDS
    while set(nannied) & set(client.scheduler_info(n_workers=-1)["workers"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.wait_for_workers(expected, timeout=RESTART_SECONDS)


async def _exit_now() -> None:
    """Run on a worker's event loop (its task thread is stuck; ``client.run`` does not wait for a
    reply only from a coroutine): the process ends, the nanny starts another."""
    os._exit(1)


def rejoin(client, workers: int) -> None:
    """Before the retry: wait (a while) for the lost worker to come back; go on with the ones there."""
    try:
        client.wait_for_workers(workers, timeout=REJOIN_SECONDS)
    except (TimeoutError, OSError):
        pass


def share_file(client, workers: list[str], text: str) -> str:
    """Write ``text`` to the same path on every worker (LightGBM reads forced bins from a file)."""
    path = str(Path(tempfile.gettempdir()) / f"batchml-forcedbins-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json")
    client.run(_write_text, path, text, workers=workers)
    return path


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text)


def forced_bins(x_fit: np.ndarray, spec: FeatureSpec, max_bin: int, seed: int) -> list[dict]:
    """Bin upper bounds of every numeric feature, the same for every worker: the midpoints between
    neighbouring distinct values (as LightGBM's own binning puts them) at up to ``max_bin - 2``
    quantiles of a seeded sample of the fit rows (room left for LightGBM's zero bin)."""
    rows = x_fit if len(x_fit) <= BIN_SAMPLE_ROWS else x_fit[np.random.default_rng(seed).choice(len(x_fit), BIN_SAMPLE_ROWS, replace=False)]
    out = []
    for j in range(len(spec.numeric)):
        values = rows[:, j][np.isfinite(rows[:, j])]
        distinct = np.unique(values)
        if len(distinct) < 2:
            continue
        if len(distinct) > max_bin - 1:
            cuts = np.quantile(values, np.linspace(0, 1, max_bin - 1)[1:-1])
            index = np.unique(np.clip(np.searchsorted(distinct, cuts, side="right") - 1, 0, len(distinct) - 2))
            lower, upper = distinct[index], distinct[index + 1]
        else:
            lower, upper = distinct[:-1], distinct[1:]
        out.append({"feature": j, "bin_upper_bound": [float(b) for b in (lower + upper) / 2]})
    return out


def validation_losses(booster: lgb.Booster, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Binary log loss of the validation rows after each round (tree by tree: one predict in all)."""
    raw = np.zeros(len(x))
    losses = np.empty(booster.current_iteration())
    for i in range(len(losses)):
        raw += booster.predict(x, start_iteration=i, num_iteration=1, raw_score=True)
        losses[i] = np.mean(np.where(y > 0, np.logaddexp(0, -raw), np.logaddexp(0, raw)))
    return losses


def early_stopping_round(losses: np.ndarray, early: int | None) -> int:
    """The number of rounds ``lgb.early_stopping(early)`` would keep for these validation losses
    (all of them without early stopping)."""
    if not early:
        return len(losses)
    best, best_round = np.inf, 0
    for i, loss in enumerate(losses):
        if loss < best:
            best, best_round = loss, i
        elif i - best_round >= early:
            break
    return best_round + 1
