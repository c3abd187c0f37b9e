"""The score step of a run, and the scoring the pull does in its pass.

The pull scores the batch with the night's champion as it reads it (``JobRun._pull_batch``);
``_score`` scores the kept rows again only when a champion was crowned or promoted in the run, so
the stored scores are always the champion's after the gate. With ``promotion.shadow`` the newest
challenger scores the same rows into ``<scores>_shadow``. A champion that needs columns the source
lost refuses to score, naming them and the way out.

``ScoreStep`` is a part of ``nightly.JobRun`` (as ``train_step.TrainSteps``): it works on the
run's ``run``, ``state``, ``config`` and ``scratch``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa

from batchml.data.extract import run_file_batches, run_file_schema, write_parquet_file
from batchml.errors import ModelError
from batchml.models import registry, retrain
from batchml.models.scoring import Predictor, ScoreSummary, for_batch, make_predictor, score_batches
from batchml.monitoring import drift, performance
from batchml.pipeline.progress import track
from batchml.pipeline.shared import load_profile, prediction_drift
from batchml.storage import model_rows

log = logging.getLogger("batchml")
ESTIMATE_SAMPLE = 200_000  # scores kept for the confidence-based performance estimate


class ScoreStep:
    """``score`` of ``NightlyRun``, and the champion's scoring that the pull's pass uses."""

    def _score(self) -> None:
        """The pull scored the rows with the champion of the night's start; one crowned or promoted
        since scores them again from the kept rows: the stored scores are always the champion's
        after the gate."""
        if self.state.champion is None:
            self._wait_for_model()
            return
        self._require_fed()
        if self.state.scored_by is not self.state.champion:
            if self.state.kept_rows is None:  # _keeps_rows keeps them whenever a challenger can be trained
                raise RuntimeError(f"v{self.state.champion.version} was promoted but the run kept no rows to score")
            self.state.scored = ScoreSummary()
            self._score_champion(run_file_batches(self.state.kept_rows), self.valid_rows)
        if self.config.promotion.shadow:
            self._score_shadow()

    def _require_fed(self) -> None:
        """Refuse to score with a champion that needs columns the source lost, naming them and the way
        out; a challenger this run trained on the current features is that way out, so it is kept."""
        if not self.state.champion_missing:
            return
        self.state.keep_challenger = self.run.challenger_version is not None
        raise ModelError(f"{self._model_role()} v{self.state.champion.version} of {self.config.job} cannot score: it needs "
                         f"{', '.join(self.state.champion_missing)}, which the source no longer has; {self._unfed_fix()}")

    def _model_role(self) -> str:
        return "champion"  # what scores the rows; a backfill may name another version

    def _unfed_fix(self) -> str:
        job, challenger = self.config.job, self._challenger_on_current_features()
        if challenger is not None:
            return (f"challenger v{challenger}, trained on the current features, is registered but the gate cannot compare it "
                    f"with the champion: promote it by hand with `batchml models promote {job} {challenger}` (the rows wait, "
                    f"watermark unchanged)")
        return f"{retrain.retrain_then_promote(job)} (the rows wait, watermark unchanged)"

    def _challenger_on_current_features(self) -> int | None:
        """This run's challenger, else the latest model trained on the config's features (a rerun does not train it again)."""
        if self.run.challenger_version is not None:
            return self.run.challenger_version
        seen = self.state.last_trained
        if seen is None or seen["status"] == registry.CHAMPION:
            return None
        return seen["version"] if self._on_current_features(seen) else None

    def _on_current_features(self, row: dict) -> bool | None:
        """Whether registered model ``row`` was trained on the config's feature list (None: its manifest is unreadable)."""
        spec = registry.manifest_spec(row)
        return None if spec is None else not any(retrain.feature_change(self.config, spec))

    def _score_champion(self, batches: Iterator[pa.RecordBatch], rows: int, predictor: Predictor | None = None) -> None:
        """Stream ``batches`` (at most ``rows`` rows) through the champion into the scores run file,
        with the prediction drift and the estimated performance of its scores."""
        self.run.champion_version = self.state.champion.version
        # prediction drift needs only the score distribution: a profile without features
        profile = drift.ReferenceProfile({}, {}, load_profile(self.state.champion).score)
        scores_acc = drift.CurrentAccumulator(profile, sample_size=0)  # prediction drift is psi: bin counts, no sample
        kept: list[np.ndarray] = []

        # the estimated metric needs a sample of scores, not all of them (memory stays flat)
        keep_share = min(1.0, ESTIMATE_SAMPLE / max(rows, 1))
        rng = np.random.default_rng(self.config.training.seed)

        def observe(batch: pa.RecordBatch, scores: np.ndarray) -> None:
            scores_acc.update({}, {}, scores=scores)
            kept.append(scores if keep_share >= 1.0 else scores[rng.random(len(scores)) < keep_share])

        predictor_name = self._score_with(self.state.champion, batches, rows, self.scores_path, self.state.scored, observe, predictor)
        self.state.scored_by = self.state.champion
        self.run.rows_scored = self.state.scored.rows
        self.state.prediction_drift = prediction_drift(profile, scores_acc, self.config)
        scores = np.concatenate(kept) if kept else np.empty(0)
        self.state.estimated = performance.estimated(self.config, self.state.champion, scores, self.run.as_of)
        log.info("%s: scored %d rows with v%d (%s)", self.config.job, self.run.rows_scored, self.state.champion.version, predictor_name,
                 extra={"rows_scored": self.run.rows_scored, "model_version": self.state.champion.version})

    def _score_with(self, model: registry.LoadedModel, batches: Iterator[pa.RecordBatch], rows: int, path: Path,
                    summary: ScoreSummary, observe=None, predictor: Predictor | None = None) -> str:
        """Stream ``batches`` through ``model`` (with ``predictor``, else its own) into the run file ``path``."""
        predictor = for_batch(predictor or make_predictor(model, self.config.scoring.engine, warn=self._warn),
                              model, self.config, rows, warn=self._warn)
        batches = track(batches, total=rows, description=f"scoring with v{model.version}", weight=lambda b: b.num_rows)
        batches = score_batches(batches, model, predictor, self.config, run_id=self.run.run_id,
                                scored_at=registry.utcnow(), summary=summary, on_scores=observe)
        write_parquet_file(batches, path)
        return predictor.name

    def _wait_for_model(self) -> None:
        """No champion: nothing is consumed, the rows (good and bad) wait for the next run."""
        self.run.rows_pending = self.run.rows_extracted
        self.run.rows_extracted = self.run.rows_quarantined = 0
        self.run.note = self.run.note or "no champion yet: not enough labeled rows to train one"
        self.run.note += f"; {self.run.rows_pending} rows wait for a model (watermark unchanged)"
        log.warning("%s: %s", self.config.job, self.run.note)

    def _shadow_challenger(self) -> registry.LoadedModel | None:
        """The challenger that writes shadow scores: this run's rejected one, else the newest registered."""
        if self.state.shadow_model is None:
            with self._connect() as con:
                row = model_rows.newest_challenger(con, self.config.job, self.state.champion.version)
            if row is not None:
                self.state.shadow_model = registry.load(row)
        return self.state.shadow_model

    def _score_shadow(self) -> None:
        """``promotion.shadow``: the newest challenger scores the same rows into ``<scores>_shadow``."""
        challenger = self._shadow_challenger()
        if challenger is None:
            return
        missing = [name for name in challenger.spec.features if name not in run_file_schema(self.state.kept_rows).names]
        if missing:  # a challenger from before a change of the feature list
            self._warn(f"no shadow scores: challenger v{challenger.version} needs {', '.join(missing)}, which this run did not pull")
            return
        self.state.shadow_path = self.scratch / "shadow.parquet"
        self._score_with(challenger, run_file_batches(self.state.kept_rows), self.valid_rows, self.state.shadow_path, ScoreSummary())
