"""Storage: every statement against the warehouse. Connections, migrations, transactions and
identifier quoting (``warehouse``), the run log and watermarks (``runlog``), the rows a run commits
(``writeback``), and the analysts' Parquet copies and catalog (``publish``)."""
