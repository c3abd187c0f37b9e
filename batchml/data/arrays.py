"""NumPy <-> Arrow without pyarrow's pandas bridge.

pyarrow imports pandas the first time it converts between NumPy and Arrow (``pa.array``,
``pa.scalar``, ``Array.to_numpy``, ``pyarrow.dataset``) when pandas is installed, as it is for
Dask: 0.3 s on the quiet 2-core machine and 0.5 s under load, in the middle of a nightly run that
never uses pandas (7 % of its steps on the benchmark night). The scoring path converts through
buffers instead (numbers), or polars (strings and booleans), neither of which imports it;
``test_scoring`` keeps a nightly run free of pandas.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import numpy as np
import polars as pl
import pyarrow as pa


def from_numpy(values: np.ndarray, type: pa.DataType | None = None) -> pa.Array:
    """A 1-d numeric or bool array as Arrow (numbers without a copy); ``type`` may reinterpret the
    numbers as another type of their width (int64 as ``timestamp('us')``)."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.bool_:
        return pl.Series(values).to_arrow()  # Arrow packs booleans into bits
    arrow_type = type or pa.from_numpy_dtype(values.dtype)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(values)])


def strings(values: Sequence[str]) -> pa.Array:
    """Python strings as an Arrow ``string`` array (polars makes ``large_string``)."""
    return pl.Series(values, dtype=pl.String).to_arrow().cast(pa.string())


def repeat(value: str | datetime, n: int, type: pa.DataType) -> pa.Array:
    """``value`` ``n`` times: a string as ``string``, a naive (UTC) datetime as ``timestamp('us')``."""
    if pa.types.is_string(type):
        return pa.repeat(strings([value])[0], n)
    if type != pa.timestamp("us") or not isinstance(value, datetime) or value.tzinfo is not None:
        raise TypeError(f"repeat() takes a string or a naive datetime as timestamp('us'), not {value!r} as {type}")
    return from_numpy(np.full(n, np.datetime64(value, "us").astype(np.int64)), type)


def floats(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A float64 Arrow column as NumPy, NaN where null; without a copy when it has one chunk and no nulls."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if column.type != pa.float64():
        raise TypeError(f"floats() needs float64, not {column.type}")
    validity, data = column.buffers()
    if data is None:  # an empty array may have no buffer at all
        return np.empty(0)
    values = np.frombuffer(data, np.float64, count=len(column), offset=column.offset * 8)
    if not column.null_count:
        return values
    bits = np.unpackbits(np.frombuffer(validity, np.uint8), count=column.offset + len(column), bitorder="little")
    return np.where(bits[column.offset:].view(bool), values, np.nan)
