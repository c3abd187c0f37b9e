"""The minimal hand-written scoring script a user might write instead of batchml (the contender of
``bench_whole``): read the new rows with DuckDB, encode them as the model's ``model.json`` says,
``Booster.predict``, write id + score to a DuckDB table. No checks, no drift, no history.

    python benchmarks/minimal_score.py SOURCE_SQL ID_COLUMN WATERMARK FROM TO MODEL_DIR OUT.duckdb [SOURCE.duckdb]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import duckdb
import lightgbm as lgb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def main() -> None:
    source, id_column, watermark, start, end, model_dir, out = sys.argv[1:8]
    source_db = sys.argv[8] if len(sys.argv) > 8 else None
    started = time.perf_counter()
    manifest = json.loads((Path(model_dir) / "model.json").read_text())
    booster = lgb.Booster(model_file=str(Path(model_dir) / "model.txt"))
    con = duckdb.connect(source_db or ":memory:", read_only=source_db is not None)
    columns = ", ".join(f'"{name}"' for name in [id_column, *manifest["features"]])
    table = con.execute(f"SELECT {columns} FROM {source} WHERE {watermark} >= ? AND {watermark} < ?", [start, end]).to_arrow_table()
    con.close()
    matrix = np.empty((table.num_rows, len(manifest["features"])), dtype=np.float64)
    for j, name in enumerate(manifest["features"]):
        column = table.column(name)
        if name in manifest["categories"]:  # level index in model.json's list; unseen or null: missing
            column = pc.index_in(column, value_set=pa.array(manifest["categories"][name], column.type))
        matrix[:, j] = pc.fill_null(pc.cast(column, pa.float64()), np.nan).to_numpy(zero_copy_only=False)
    scores = booster.predict(matrix)
    result = pa.table({id_column: table.column(id_column), "score": scores})
    out_con = duckdb.connect(out)
    out_con.execute("CREATE OR REPLACE TABLE scores AS SELECT * FROM result")
    out_con.close()
    print(json.dumps({"rows": table.num_rows, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
