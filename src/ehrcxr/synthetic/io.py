"""Writing helpers of the synthetic generator: deterministic ``.csv.gz`` files in MIMIC's text formats.

MIMIC CSVs quote only where needed, write whole numbers without ``.0`` and timestamps as
``YYYY-MM-DD HH:MM:SS``; pyarrow's CSV writer does the same quickly for tables without
delimiters in their text, pandas handles the (small) tables that need quoting.
"""
from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

GZIP_LEVEL = 1  # speed over size; files stay readable by every gzip reader
_STRUCTURAL = r'[,"\n\r]'


def seconds_to_timestamps(seconds: np.ndarray) -> pa.Array:
    """Seconds since the Unix epoch (int64, NaN-free; use a mask for nulls) -> arrow timestamp[s]."""
    return pa.array(np.asarray(seconds, dtype="int64").astype("datetime64[s]"))


def masked_timestamps(seconds: np.ndarray, present: np.ndarray) -> pa.Array:
    """Like :func:`seconds_to_timestamps` with null where ``present`` is False."""
    values = np.where(present, seconds, 0).astype("int64").astype("datetime64[s]")
    return pa.array(values, mask=~np.asarray(present, dtype=bool))


def dates(seconds: np.ndarray, present: np.ndarray | None = None) -> pa.Array:
    """Seconds since the epoch -> arrow date32 (``YYYY-MM-DD``), null where not ``present``."""
    values = np.asarray(seconds, dtype="int64").astype("datetime64[s]").astype("datetime64[D]")
    mask = None if present is None else ~np.asarray(present, dtype=bool)
    return pa.array(values, mask=mask)


def number_text(values: np.ndarray, decimals: int) -> pa.Array:
    """Numbers as MIMIC writes them: rounded to ``decimals`` and without a trailing ``.0``."""
    rounded = np.round(np.asarray(values, dtype="float64"), decimals)
    if decimals == 0:
        return pc.cast(pa.array(rounded.astype("int64")), pa.string())
    return pc.cast(pa.array(rounded), pa.string())


def fixed_text(values: np.ndarray, decimals: int) -> pa.Array:
    """Numbers with exactly ``decimals`` decimals (lab ``value`` style, e.g. ``7.40``)."""
    scaled = np.round(np.asarray(values, dtype="float64") * 10 ** decimals).astype("int64")
    sign = np.where(scaled < 0, "-", "")
    whole, frac = np.divmod(np.abs(scaled), 10 ** decimals)
    frac_text = pc.utf8_lpad(pc.cast(pa.array(frac), pa.string()), width=decimals, padding="0")
    return pc.binary_join_element_wise(
        pc.binary_join_element_wise(pa.array(sign), pc.cast(pa.array(whole), pa.string()), ""), frac_text, ".")


def pick_text(codes: np.ndarray, vocabulary: list[str | None]) -> pa.Array:
    """Strings ``vocabulary[code]`` as an arrow string array (a ``None`` entry gives an empty cell)."""
    dictionary = pa.array(vocabulary, type=pa.string())
    return pc.cast(pa.DictionaryArray.from_arrays(pa.array(np.asarray(codes, dtype="int32")), dictionary),
                   pa.string())


def _as_arrow(values) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    if isinstance(values, pd.Series):
        return pa.Array.from_pandas(values)
    return pa.array(values, from_pandas=True)  # NaN -> empty cell


def _gzip_bytes(payload: bytes) -> bytes:
    """gzip with a fixed header (no name, mtime 0) so equal content gives equal files."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=GZIP_LEVEL, mtime=0) as stream:
        stream.write(payload)
    return buffer.getvalue()


def write_csv_gz(path: Path, columns: dict) -> int:
    """Write ``columns`` (name -> array, in file order) to ``path`` as gzip CSV; returns the row count.

    Text containing delimiters or quotes is quoted (via pandas) like the official files; everything
    else goes through pyarrow's fast writer without quotes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({name: _as_arrow(values) for name, values in columns.items()})
    header = (",".join(table.column_names) + "\n").encode()
    needs_quotes = any(
        pa.types.is_string(column.type) and pc.any(pc.match_substring_regex(column, _STRUCTURAL)).as_py()
        for column in table.columns)
    if needs_quotes:
        text = table.cast(pa.schema([(name, pa.string()) for name in table.column_names])).to_pandas()
        body = text.to_csv(index=False, header=False, na_rep="", lineterminator="\n").encode()
    else:
        sink = io.BytesIO()
        pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
        body = sink.getvalue()
    path.write_bytes(_gzip_bytes(header + body))
    return table.num_rows


def hex_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """MIMIC-CXR style dicom ids: five dash-separated groups of 8 lowercase hex digits (unique)."""
    raw = np.frombuffer(rng.bytes(n * 20), dtype=np.uint8).reshape(n, 20)
    hex_digits = np.frombuffer(b"0123456789abcdef", dtype="S1")
    nibbles = np.stack([raw >> 4, raw & 15], axis=-1).reshape(n, 40)
    chars = hex_digits[nibbles].reshape(n, 5, 8)
    dashed = np.concatenate([chars, np.full((n, 5, 1), b"-", dtype="S1")], axis=2).reshape(n, 45)[:, :44]
    ids = np.ascontiguousarray(dashed).view("S44").ravel().astype(str)
    if len(np.unique(ids)) != n:  # 160 random bits: practically impossible
        raise RuntimeError("dicom id collision; use another seed")
    return ids


def unique_ids(rng: np.random.Generator, n: int, low: int, high: int) -> np.ndarray:
    """``n`` distinct random int64 ids in [low, high), sorted ascending."""
    if high - low < n:
        raise ValueError(f"cannot draw {n} distinct ids from [{low}, {high})")
    return np.sort(rng.choice(high - low, size=n, replace=False).astype("int64") + low)
