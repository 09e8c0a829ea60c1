"""Stream MIMIC-IV event tables (chartevents, labevents) into hourly bins in bounded memory.

pyarrow's CSV reader decompresses and parses a file block by block on its own threads. Each block is cut
down in Arrow to the mapped itemids of cohort subjects and to the first ``hours`` hours of their stays
(static variables also before intime, see :func:`select_block`) before anything becomes a pandas row, so the
work in Python grows with the kept events only and memory with the cohort (the bins), never with the file.
Bins keep the last event by charttime (a later file row wins ties; chartevents rows come before labevents
rows), whatever the block size or thread interleaving.
"""
from __future__ import annotations

import logging
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from ehrcxr.data import raw

log = logging.getLogger("ehrcxr.events")

EVENT_TABLES = ("chartevents", "labevents")  # also the tie-break order between tables
READ_COLUMNS = {
    "chartevents": ["subject_id", "hadm_id", "stay_id", "charttime", "itemid", "value", "valuenum"],
    "labevents": ["subject_id", "hadm_id", "charttime", "itemid", "value", "valuenum"],
}
ARROW_TYPES = {"subject_id": pa.int64(), "hadm_id": pa.int64(), "stay_id": pa.int64(), "itemid": pa.int64(),
               "charttime": pa.string(), "value": pa.string(), "valuenum": pa.float64()}
DEFAULT_BLOCK_SIZE = 8 << 20    # bytes of CSV text per parsed block (measured: 4-8 MiB is fastest on 2 cores)
MS_PER_HOUR = 3_600_000
ROW_BITS = 40                   # order key: ms within the hour bin | table | file row
MAX_ROWS = 1 << ROW_BITS


@dataclass
class KeptEvents:
    """Events of one block kept for cohort stays (in their first hours, or static rows before intime)."""

    stay_pos: np.ndarray
    since: np.ndarray           # ms from the stay's intime; negative only for static variables' rows
    row_key: np.ndarray         # table index << ROW_BITS | file row: the later row wins among equal charttimes
    frame: pd.DataFrame         # itemid, value (only where valuenum is empty or the item is text-coded), valuenum


def _last_per_bin(flat: np.ndarray, keys: tuple[np.ndarray, ...], code: np.ndarray) -> tuple:
    """(bins, keys, codes) of the event with the largest key per bin; ``keys`` least significant first."""
    if len(flat) == 0:
        return flat, keys, code
    by_bin = np.lexsort((*keys, flat))
    flat, keys, code = flat[by_bin], tuple(key[by_bin] for key in keys), code[by_bin]
    last = np.append(flat[1:] != flat[:-1], True)
    return flat[last], tuple(key[last] for key in keys), code[last]


class HourlyBins:
    """Last code per (stay, hour, variable) from intime on, and per (stay, variable) the last code before
    intime, updated block by block; thread-safe."""

    def __init__(self, n_stays: int, hours: int, n_variables: int):
        self.shape = (n_stays, hours, n_variables)
        self.code = np.full(self.shape, np.nan)
        self.order = np.full(self.shape, -1, dtype=np.int64)
        self.before_code = np.full((n_stays, n_variables), np.nan)
        self.before_since = np.full((n_stays, n_variables), np.iinfo(np.int64).min)
        self.before_row_key = np.full((n_stays, n_variables), -1, dtype=np.int64)
        self._lock = threading.Lock()

    def update(self, stay_pos: np.ndarray, since: np.ndarray, row_key: np.ndarray, variable: np.ndarray,
               code: np.ndarray) -> None:
        """Keep, per bin, the latest value (charttime, then row key) among the stored one and the new ones."""
        window = since >= 0
        hourly = np.ravel_multi_index((stay_pos[window], since[window] // MS_PER_HOUR, variable[window]),
                                      self.shape)
        order = ((since[window] % MS_PER_HOUR) << (ROW_BITS + 1)) | row_key[window]
        hourly, (order,), hourly_code = _last_per_bin(hourly, (order,), code[window])
        before = np.ravel_multi_index((stay_pos[~window], variable[~window]), self.before_code.shape)
        before, (before_row_key, before_since), before_code = _last_per_bin(
            before, (row_key[~window], since[~window]), code[~window])
        with self._lock:
            newer = order > self.order.ravel()[hourly]
            self.order.ravel()[hourly[newer]] = order[newer]
            self.code.ravel()[hourly[newer]] = hourly_code[newer]
            stored_since, stored_row_key = self.before_since.ravel()[before], self.before_row_key.ravel()[before]
            newer = (before_since > stored_since) | ((before_since == stored_since) & (before_row_key > stored_row_key))
            self.before_since.ravel()[before[newer]] = before_since[newer]
            self.before_row_key.ravel()[before[newer]] = before_row_key[newer]
            self.before_code.ravel()[before[newer]] = before_code[newer]

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(stay, hour, variable) codes (NaN: no event), where hour 0 without a code of its own takes the last
        code before intime, and the (stay, variable) mask of those carried codes."""
        codes = np.where(self.order >= 0, self.code, np.nan)
        carried = np.isnan(codes[:, 0]) & ~np.isnan(self.before_code)
        codes[:, 0][carried] = self.before_code[carried]
        return codes, carried


class StayLookup:
    """The cohort's stays (sorted by stay_id, with ``stay_pos``) as Arrow/numpy lookups for event assignment."""

    def __init__(self, cohort: pd.DataFrame, hours: int):
        self.frame = cohort[["stay_id", "hadm_id", "subject_id", "stay_pos"]].reset_index(drop=True)
        self.stay_ids = pa.array(cohort["stay_id"].to_numpy())
        self.subjects = pa.array(np.unique(cohort["subject_id"].to_numpy()))
        self.intime = cohort["intime"].to_numpy().astype("datetime64[ms]").astype(np.int64)
        self.outtime = cohort["outtime"].to_numpy().astype("datetime64[ms]").astype(np.int64)
        self.hours = hours

    def candidates(self, stay_id: np.ndarray, has_stay: np.ndarray, hadm_id: np.ndarray, has_hadm: np.ndarray,
                   subject_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(event index, stay_pos) pairs: by stay_id; without one by hadm_id; without both by subject_id."""
        events, stays = [], []
        if has_stay.any():
            index = np.flatnonzero(has_stay)
            pos = np.asarray(pc.index_in(pa.array(stay_id[index]), value_set=self.stay_ids).fill_null(-1))
            events.append(index[pos >= 0])
            stays.append(self.frame["stay_pos"].to_numpy()[pos[pos >= 0]])
        for key, rows in (("hadm_id", ~has_stay & has_hadm), ("subject_id", ~has_stay & ~has_hadm)):
            if rows.any():
                index = np.flatnonzero(rows)
                values = hadm_id[index] if key == "hadm_id" else subject_id[index]
                pairs = pd.DataFrame({key: values, "event": index}).merge(self.frame[[key, "stay_pos"]], on=key)
                events.append(pairs["event"].to_numpy())
                stays.append(pairs["stay_pos"].to_numpy())
        if not events:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
        return np.concatenate(events).astype(np.int64), np.concatenate(stays).astype(np.int64)


def _int_column(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Values (nulls as 0) and a validity mask of an int64 column."""
    column = batch.column(name)
    return np.asarray(column.fill_null(0)), np.asarray(column.is_valid())


def _charttime_ms(batch: pa.RecordBatch, rows: np.ndarray, path: Path) -> np.ndarray:
    """Charttime of the kept rows as ms since the epoch; an unparsable value names its file row."""
    text = batch.column("charttime")
    try:
        parsed = text.cast(pa.timestamp("ms"))
    except pa.ArrowInvalid:
        parsed = pc.strptime(text, format="%Y-%m-%d %H:%M:%S", unit="ms", error_is_null=True)
        bad = np.asarray(parsed.is_null()) & np.asarray(text.is_valid())
        at = int(np.flatnonzero(bad)[0])
        raise raw.RawDataError(f"{path}: column 'charttime', data row {rows[at] + 1}: "
                               f"cannot parse timestamp {text[at].as_py()!r}") from None
    if parsed.null_count:
        at = int(np.flatnonzero(np.asarray(parsed.is_null()))[0])
        raise raw.RawDataError(f"{path}: column 'charttime', data row {rows[at] + 1}: empty timestamp")
    return np.asarray(parsed.cast(pa.int64()))


def select_block(batch: pa.RecordBatch, first_row: int, table_index: int, path: Path, stays: StayLookup,
                 wanted_items: pa.Array, text_items: pa.Array, static_items: pa.Array,
                 counts: dict[str, int]) -> KeptEvents | None:
    """Cut one parsed block down to kept events: mapped items of cohort stays within their first hours, and
    rows of ``static_items`` charted before intime that name the stay or its admission (stay_id, or hadm_id
    without a stay_id; rows with neither id are kept in the window only).

    ``counts`` gains the rows of mapped items and cohort subjects that match no stay ("unassigned") or that
    none of their candidate stays keeps ("outside_window")."""
    rows = pc.indices_nonzero(pc.is_in(batch.column("itemid"), value_set=wanted_items))
    batch = batch.take(rows)
    cohort_rows = pc.indices_nonzero(pc.is_in(batch.column("subject_id"), value_set=stays.subjects))
    if len(cohort_rows) == 0:
        return None
    batch = batch.take(cohort_rows)
    rows = np.asarray(rows.take(cohort_rows)).astype(np.int64) + first_row
    charttime = _charttime_ms(batch, rows, path)
    hadm_id, has_hadm = _int_column(batch, "hadm_id")
    if "stay_id" in batch.schema.names:
        stay_id, has_stay = _int_column(batch, "stay_id")
    else:
        stay_id, has_stay = np.zeros(len(rows), np.int64), np.zeros(len(rows), bool)
    event, stay_pos = stays.candidates(stay_id, has_stay, hadm_id, has_hadm, np.asarray(batch.column("subject_id")))
    since = charttime[event] - stays.intime[stay_pos]
    in_window = (since >= 0) & (since < stays.hours * MS_PER_HOUR) & (charttime[event] <= stays.outtime[stay_pos])
    static_with_id = np.asarray(pc.is_in(batch.column("itemid"), value_set=static_items)) & (has_stay | has_hadm)
    keep = in_window | ((since < 0) & static_with_id[event])
    n_candidates = np.count_nonzero(np.bincount(event, minlength=len(rows)))
    event, stay_pos, since = event[keep], stay_pos[keep], since[keep]
    counts["unassigned"] += len(rows) - n_candidates
    counts["outside_window"] += n_candidates - np.count_nonzero(np.bincount(event, minlength=len(rows)))
    if len(event) == 0:
        return None
    if rows[-1] >= MAX_ROWS:
        raise raw.RawDataError(f"{path}: more than {MAX_ROWS} rows; the order key cannot hold the row number")
    kept = batch.take(pa.array(event))
    needs_text = pc.or_(kept.column("valuenum").is_null(), pc.is_in(kept.column("itemid"), value_set=text_items))
    frame = pd.DataFrame({
        "itemid": np.asarray(kept.column("itemid")),
        "value": pc.if_else(needs_text, kept.column("value"), pa.scalar(None, pa.string())).to_pandas(),
        "valuenum": kept.column("valuenum").to_numpy(zero_copy_only=False)})
    return KeptEvents(stay_pos, since, (table_index << ROW_BITS) | rows[event], frame)


def prefetch(blocks: Iterator, depth: int = 2) -> Iterator:
    """Iterate ``blocks`` on a background thread, ``depth`` items ahead, so that decompression, parsing and
    Arrow filtering (which release the GIL) overlap the caller's work on the previous block; errors surface
    in the caller."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in blocks:
                while not stop.is_set():
                    try:
                        slots.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put((done, None))
        except BaseException as error:  # handed to the consumer, raised there
            slots.put((done, error))

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        producer.join()


def iter_blocks(path: Path, columns: list[str], block_size: int) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Parsed blocks of ``columns`` with the file row number of each block's first row.

    Only empty fields are null (GCS text such as 'None' is data); errors name the file, column and row."""
    header = raw.read_header(path)
    read_options = pacsv.ReadOptions(block_size=block_size, use_threads=True)
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: ARROW_TYPES[c] for c in columns},
                                   null_values=[""], strings_can_be_null=True, quoted_strings_can_be_null=False)
    first_row = 0
    try:
        reader = pacsv.open_csv(path, read_options=read_options, convert_options=convert)
        for batch in reader:
            yield batch, first_row
            first_row += batch.num_rows
    except pa.ArrowInvalid as error:
        column = _column_in_error(str(error), header)
        if column is None:
            raise raw.RawDataError(f"{path}: cannot be parsed after data row {first_row} ({error})") from error
        raise raw.RawDataError(_locate_bad_value(path, column, first_row, block_size)) from error
    except (OSError, pa.ArrowException) as error:  # truncated or corrupt gzip
        raise raw.RawDataError(f"{path}: cannot be read after data row {first_row} "
                               f"({type(error).__name__}: {error})") from error


def _column_in_error(message: str, header: list[str]) -> str | None:
    match = re.search(r"CSV column #(\d+)", message)
    return header[int(match.group(1))] if match and int(match.group(1)) < len(header) else None


def _locate_bad_value(path: Path, column: str, first_row: int, block_size: int) -> str:
    """Re-read ``column`` as text from the failing block on to name the first value of the wrong type."""
    wanted = ARROW_TYPES[column]
    pattern = r"^\s*-?\d+\s*$" if pa.types.is_integer(wanted) else r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
    convert = pacsv.ConvertOptions(include_columns=[column], column_types={column: pa.string()},
                                   null_values=[""], strings_can_be_null=True)
    row = 0
    for batch in pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=block_size),
                                convert_options=convert):
        if row + batch.num_rows > first_row:
            text = batch.column(0)
            bad = np.asarray(pc.invert(pc.match_substring_regex(text, pattern)).fill_null(False))
            bad[: max(first_row - row, 0)] = False
            if bad.any():
                at = int(np.flatnonzero(bad)[0])
                return (f"{path}: column {column!r}, data row {row + at + 1}: value {text[at].as_py()!r} "
                        f"is not a valid {wanted}")
        row += batch.num_rows
    return f"{path}: column {column!r} holds a value that is not a valid {wanted}"


def stream_table(path: Path, table: str, stays: StayLookup, wanted_items: np.ndarray, text_items: np.ndarray,
                 static_items: np.ndarray, consume: Callable[[KeptEvents], None], counts: dict[str, int],
                 block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Stream one event table through :func:`select_block` into ``consume``; returns the rows read."""
    table_index = EVENT_TABLES.index(table)
    wanted, text = pa.array(wanted_items, pa.int64()), pa.array(text_items, pa.int64())
    static = pa.array(static_items, pa.int64())
    n_rows = n_kept = 0

    def selected() -> Iterator[KeptEvents | None]:  # Arrow work, on the prefetch thread
        nonlocal n_rows
        for batch, first_row in iter_blocks(path, READ_COLUMNS[table], block_size):
            n_rows += batch.num_rows
            yield select_block(batch, first_row, table_index, path, stays, wanted, text, static, counts)

    for kept in prefetch(selected()):
        if kept is not None:
            n_kept += len(kept.stay_pos)
            consume(kept)
    log.info("%s: %d rows read, %d events of mapped items kept (first %d h of cohort stays; static variables "
             "also before intime)", path, n_rows, n_kept, stays.hours)
    return n_rows
