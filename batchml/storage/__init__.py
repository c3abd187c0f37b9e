"""Storage: every statement against the warehouse, and the Parquet lake of the Dask engine.
Connections, migrations, transactions and identifier quoting (``warehouse``), the run log and
watermarks (``runlog``), the rows a run commits (``writeback``), the analysts' Parquet copies and
catalog (``publish``), and the lake (``lake``), whose files become visible only through manifests
the warehouse commits."""
