"""The train and evaluate steps of a run: which retrain triggers are due, the challenger they
train (in this process, on the Dask cluster, or from a window the Dask workers read), and the gate
that promotes it or not. The first model a job gets is crowned without a gate.

``TrainSteps`` is a part of ``nightly.JobRun``, kept apart to keep each file about one step: it
works on the run's ``run``, ``state``, ``config``, ``project`` and ``scratch`` and its ``_connect``
and ``_warn``. Registry writes are queued on ``state.pending`` for the commit's one transaction.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

from batchml.errors import DataError
from batchml.models import registry, retrain
from batchml.pipeline.shared import pull_training_rows, warn_odd_labels
from batchml.storage import model_rows, runlog
from batchml.storage.source import describe_source
from batchml.data.extract import read_run_file

log = logging.getLogger("batchml")


class TrainSteps:
    """``train`` (triggers, the challenger) and ``evaluate`` (the gate) of ``NightlyRun``."""

    def _retrain(self) -> retrain.Candidate | None:
        """Train a challenger if a trigger fires; the first model is crowned at once, others are returned for the gate."""
        self.run.triggers = self._due_triggers(self.state.answered)
        silent = [t for t in self._due_triggers(frozenset()) if t not in self.run.triggers]
        if silent:
            self._add_note(f"{', '.join(silent)} not retrained for again: challenger v{self.state.last_trained['version']} was "
                           f"trained for it at {self.state.last_trained['created_at']:%Y-%m-%d %H:%M} under champion "
                           f"v{self.state.champion_row['version']} and not promoted; the next challenger waits for new labels "
                           f"(training.retrain.min_new_labels) or age (every_days)")
        if not self.run.triggers or self._before_champion() or self._trained_already():
            return None
        log.info("%s: retraining (%s)", self.config.job, ", ".join(self.run.triggers))
        try:
            candidate = self._train_candidate()
        except DataError as exc:
            self.run.note = f"no challenger trained: {exc}"
            if self.state.champion is not None:  # without one, _wait_for_model warns with the whole story
                log.warning("%s: %s", self.config.job, self.run.note)
            return None
        self.run.challenger_version = candidate.version
        if self.state.champion is None:
            self._crown_first(candidate)
            return None
        return candidate

    def _due_triggers(self, answered: frozenset[str], dataset_drift: bool | None = None) -> list[str]:
        return retrain.due_triggers(
            self.config, champion=self.state.champion_row, as_of=self.run.as_of, force=self.force_retrain,
            dataset_drift=self.run.dataset_drift if dataset_drift is None else dataset_drift,
            new_labels=self.state.new_labels, realised=self.state.realised,
            champion_spec=self.state.champion.spec if self.state.champion is not None else None,
            last_trained=self.state.last_trained, answered=answered,
        )

    def _answered_triggers(self, con) -> frozenset[str]:
        """Drift and decay that the job's last training already answered under the current champion
        with a challenger that was not promoted (see ``retrain.due_triggers``)."""
        seen, champion = self.state.last_trained, self.state.champion_row
        if seen is None or champion is None or seen["version"] == champion["version"] or seen["created_at"] > self.run.as_of:
            return frozenset()
        trained_by = runlog.get_run(con, seen.get("run_id"))
        if trained_by is None or trained_by["champion_version"] != champion["version"]:
            return frozenset()
        return frozenset({"drift", "decay"} & set(trained_by["triggers"]))

    def _before_champion(self) -> bool:
        """A cut-off before the champion's own: a challenger trained then would be judged on a
        holdout the champion learnt from, and could replace a newer model. Even when forced."""
        champion = self.state.champion_row
        if champion is None or self.run.as_of >= champion["created_at"]:
            return False
        self._add_note(f"retrain triggers ({', '.join(self.run.triggers)}) fired, but the cut-off is before champion "
                       f"v{champion['version']}'s own ({champion['created_at']:%Y-%m-%d %H:%M}): no challenger is trained "
                       f"behind the champion")
        return True

    def _add_note(self, note: str) -> None:
        self.run.note = f"{self.run.note}; {note}" if self.run.note else note
        log.info("%s: %s", self.config.job, note)

    def _trained_already(self) -> bool:
        """A rerun of a cut-off (or an earlier one) would train on the rows a model trained at that
        cut-off already saw: the same challenger again, rejected again. Only data-driven triggers
        are skipped this way; ``--force-retrain`` and a job without a champion still train."""
        seen = self.state.last_trained
        if seen is None or seen["created_at"] < self.run.as_of or {"forced", "no_champion"} & set(self.run.triggers):
            return False
        if self._on_current_features(seen) is False:
            return False  # trained on another feature list: the config's would make a different challenger
        self._add_note(f"retrain triggers ({', '.join(self.run.triggers)}) fired, but v{seen['version']} was trained at cut-off "
                       f"{seen['created_at']:%Y-%m-%d %H:%M} from the same rows: no new challenger (--force-retrain trains one anyway)")
        return True

    def _train_candidate(self) -> retrain.Candidate:
        from batchml.cluster.window import on_workers

        if on_workers(self.config):
            return self._train_candidate_on_workers()
        path = self.scratch / "train.arrow"
        with self._connect() as con:
            pulled = pull_training_rows(con, self.config, self.state.pull_config, self.project.root, self.run.as_of, path,
                                        columns=self.state.source_columns, warn=self._warn)
            version = model_rows.next_version(con, self.config.job)
        table = read_run_file(path)
        with self._trainer() as fitter:
            candidate = retrain.train_candidate(self.config, table, self.project.models, version, self.run.as_of, pulled.by_rule,
                                                fitter=fitter)
        log.info("%s: v%d: %d labeled rows in the window: %d trained on (fit and early stopping), %d held out, %d left out",
                 self.config.job, version, pulled.rows, candidate.trained.train_rows, candidate.split.holdout.num_rows,
                 sum(pulled.by_rule.values()))
        return candidate

    def _train_candidate_on_workers(self) -> retrain.Candidate:
        """``training.engine: dask`` over Parquet: the workers read the window (:mod:`batchml.cluster.window`)."""
        from batchml.cluster.connect import open_client, scheduler_address
        from batchml.cluster.window import train_candidate_on_workers
        from batchml.storage import lake

        config, root = self.config, self.project.root
        with self._connect() as con:
            columns = self.state.source_columns or describe_source(con, self.state.pull_config, root)
            warn_odd_labels(con, config, root, self.run.as_of, self._warn)
            version = model_rows.next_version(con, config.job)
        own = getattr(self, "client", None)
        address = getattr(self, "address", None) if own is not None else scheduler_address(config, None)
        home = self.project.home / "lake"
        with nullcontext(own) if own is not None else open_client(config, address) as client:
            try:
                candidate, pulled = train_candidate_on_workers(
                    client, address, config, self.state.pull_config, root, home, self.run.run_id, self.run.as_of, columns,
                    self.project.settings.memory_limit, self.project.models, version, warn=self._warn)
            finally:
                if own is None:  # the Dask engine's run removes its staging (scoring still reads it) at its end
                    lake.remove_staging(home, config.job, self.run.run_id)
        log.info("%s: v%d: %d labeled rows in the window, read by the workers: %d trained on (fit and early stopping), "
                 "%d held out, %d left out", config.job, version, pulled.rows, candidate.trained.train_rows,
                 candidate.split.holdout.num_rows, sum(pulled.by_rule.values()))
        return candidate

    def _trainer(self):
        """How the challenger is fitted: in this process, or on the Dask cluster (``training.engine: dask``;
        the run's own client when it runs on the Dask engine)."""
        if self.config.training.engine == "local":
            return nullcontext(retrain.fit)
        from batchml.cluster.training import dask_trainer

        return dask_trainer(self.config, client=getattr(self, "client", None))

    def _crown_first(self, candidate: retrain.Candidate) -> None:
        job, run_id, as_of = self.config.job, self.run.run_id, self.run.as_of
        row = candidate.registry_row(job, run_id, as_of, registry.CHALLENGER)

        def write(con):
            model_rows.register(con, row)
            model_rows.make_champion(con, job, candidate.version, "promoted", run_id=run_id,
                                   reason="first champion: no model existed", metrics=candidate.metrics, at=as_of)

        self.state.pending.append(write)
        self.state.champion = registry.load(row)
        self.run.promoted = True
        log.info("%s: trained first champion v%d on %d rows", job, candidate.version, candidate.trained.train_rows)

    def _gate(self, candidate: retrain.Candidate) -> None:
        job, run_id, as_of = self.config.job, self.run.run_id, self.run.as_of
        self.state.decision = retrain.gate(candidate, self.state.champion, self.config)
        promoted = self.state.decision.outcome == "promoted"
        status = registry.CHALLENGER if promoted else registry.REJECTED
        if self.state.decision.outcome == "no_decision":
            status = registry.CHALLENGER
        row = candidate.registry_row(job, run_id, as_of, status)
        decision = self.state.decision.to_dict()

        def write(con):
            model_rows.register(con, row)
            if promoted:
                model_rows.make_champion(con, job, candidate.version, "promoted", run_id=run_id,
                                       reason=decision["reason"], metrics=decision, at=as_of)
            else:
                model_rows.record_event(con, job, candidate.version, self.state.decision.outcome, run_id=run_id,
                                      reason=decision["reason"], metrics=decision, at=as_of,
                                      previous_champion=self.state.champion_row["version"])

        self.state.pending.append(write)
        self.run.promoted = promoted
        log.info("%s: challenger v%d %s: %s", job, candidate.version, self.state.decision.outcome, self.state.decision.reason)
        if promoted:
            self.state.champion = registry.load(row)
        else:
            self.state.shadow_model = registry.load(row)
