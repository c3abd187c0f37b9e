"""Running a job: the nightly run, backfills and replays, the scheduler, and ``batchml try``."""
