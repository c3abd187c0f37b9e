"""Where a run's results are stored: the DuckDB warehouse file, and the Parquet lake of the Dask
engine (``lake``), whose files become visible only through manifests the warehouse commits."""
