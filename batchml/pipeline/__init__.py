"""The pipeline, the run itself: a nightly run step by step (``nightly``), backfills, replays and
drift-only runs (``backfill``), the daemon (``scheduler``), one run per job at a time (``locks``)."""
