"""Time-Series-Library (TSLib) compatible CSV loading, splits, scaling and windows.

The conventions follow TSLib (``data_provider/data_loader.py``) so that numbers are comparable
with DLinear, PatchTST, Time-LLM and friends:

* ETT hourly files: train rows ``[0, 8640)``, val ``[8640-L, 11520)``, test ``[11520-L, 14400)``
  (minutely files: the same times 4); other files: a 70/10/20 split.
* A StandardScaler fit on the train rows only and applied to every row.
* ``timeF`` time features in ``[-0.5, 0.5]``.
* Windows ``x = data[s:s+L]``, ``y = data[s+L-label_len : s+L+H]``; the last test batch is kept.
"""
from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "TimeSeriesTable",
    "load_csv",
    "parse_cell",
    "parse_dates",
    "read_rows",
    "time_features",
    "infer_freq",
    "split_borders",
    "ForecastDataset",
    "make_loaders",
]

logger = logging.getLogger(__name__)

#: Non-numeric columns that are dropped silently (Time-MMD numerical files carry them).
IGNORED_COLUMNS = ("start_date", "end_date")
SPLITS = ("train", "val", "test")

Borders = Union[str, Sequence[tuple[int, int]]]


@dataclass
class TimeSeriesTable:
    """A multivariate series: one timestamp and one float32 row of channels per time step."""

    dates: list[datetime]
    columns: list[str]
    values: np.ndarray  # float32 [N, C]
    name: str = "<table>"
    #: 1-based line number in the file of each row, when read from a file (for error messages)
    lines: Optional[list[int]] = None

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.values.ndim != 2:
            raise ValueError(f"{self.name}: values must be 2-D [rows, channels], got {self.values.shape}")
        n, c = self.values.shape
        if len(self.dates) != n or len(self.columns) != c:
            raise ValueError(
                f"{self.name}: {len(self.dates)} dates and {len(self.columns)} columns "
                f"do not match values of shape {self.values.shape}"
            )

    def __len__(self) -> int:
        return len(self.dates)


# --------------------------------------------------------------------------------------- CSV


def read_rows(path: Path) -> tuple[list[list[str]], list[int]]:
    """The non-blank records of a CSV file and, for each, its 1-based line number in the file
    (blank lines are skipped but still counted, so error messages point at the right line)."""
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for r in reader:
                if any(cell.strip() for cell in r):
                    rows.append(r)
                    lines.append(reader.line_num)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 CSV text file (byte {e.object[e.start]:#04x} at offset {e.start} "
                         f"is not UTF-8; a compressed or binary file must be converted to CSV first)") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None
    return rows, lines


def check_header(path, header: list[str]) -> list[str]:
    """``header`` with its empty names (a pandas index column, as ``df.to_csv()`` writes it) replaced by
    ``""`` for the caller to skip, with a warning; a ``ValueError`` naming a name that appears twice."""
    empty = [j + 1 for j, h in enumerate(header) if h == ""]
    if empty:
        logger.warning("%s: ignoring %d column(s) with an empty header name (position %s; e.g. a pandas index "
                       "column): not used as channels", path, len(empty), ", ".join(map(str, empty)))
    dup = next((h for h, n in Counter(h for h in header if h).items() if n > 1), None)
    if dup is not None:
        raise ValueError(f"{path}: column name {dup!r} appears {header.count(dup)} times in the header; "
                         "column names must be unique")
    return header


#: Date formats tried, in order, when the first date is not ISO 8601 (``datetime.fromisoformat``); the
#: first one that parses the file's first date is used for every row.
DATE_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d", "%Y/%m/%d %H:%M:%S", "%Y/%m/%d %H:%M", "%Y/%m/%d",
                "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M", "%m/%d/%Y")
_ACCEPTED = "accepted: ISO 8601 (2016-07-01 00:00:00) or " + ", ".join(DATE_FORMATS)


def parse_dates(path, cells: Sequence[str], lines: Sequence[int], column: str = "date") -> list[datetime]:
    """The dates of a file's date column. ISO 8601 when the first date is ISO, else the first of
    :data:`DATE_FORMATS` that parses the first date, used for every row (a file has one format). A
    ``ValueError`` names the file, row (``lines``: file line numbers) and the accepted formats for a date
    that does not parse, and a mix of dates with and without a timezone."""
    parse = None
    if cells:
        first = cells[0].strip()
        try:
            datetime.fromisoformat(first)
            parse, used = datetime.fromisoformat, "ISO 8601"
        except ValueError:
            for fmt in DATE_FORMATS:
                try:
                    datetime.strptime(first, fmt)
                except ValueError:
                    continue
                parse, used = (lambda c, fmt=fmt: datetime.strptime(c, fmt)), fmt
                break
    dates: list[datetime] = []
    for i, (cell, line) in enumerate(zip(cells, lines)):
        cell = cell.strip()
        try:
            if parse is None:
                raise ValueError
            d = parse(cell)
        except ValueError:
            how = f"({_ACCEPTED})" if parse is None else f"(the file's first date is {used}; one format per file)"
            raise ValueError(f"{path}: unparseable date {cell!r} in row {line}, column {column!r} {how}") from None
        if i and (d.tzinfo is None) != (dates[0].tzinfo is None):
            raise ValueError(f"{path}: date {cell!r} in row {line}, column {column!r} "
                             f"{'has no' if d.tzinfo is None else 'has a'} timezone but the first date "
                             f"{cells[0].strip()!r} {'has one' if d.tzinfo is None else 'does not'}: "
                             "give every date a timezone offset or none")
        dates.append(d)
    return dates


def parse_cell(cell: str) -> tuple[float, None] | tuple[None, str]:
    """``(value, None)`` for a finite number, else ``(None, problem)`` where ``problem`` is
    ``"empty value"``, ``"non-numeric value 'abc'"`` or ``"NaN/inf value 'nan'"`` (the wording
    of the loaders' error messages: ``"<file>: <problem> in row <line>, column <name>"``)."""
    cell = cell.strip()
    if cell == "":
        return None, "empty value"
    try:
        v = float(cell)
    except ValueError:
        return None, f"non-numeric value {cell!r}"
    if not math.isfinite(v):
        return None, f"NaN/inf value {cell!r}"
    return v, None


def load_csv(path: str | Path, target: str = "OT") -> TimeSeriesTable:
    """Read a TSLib-style CSV: a ``date`` column plus numeric channels.

    ``start_date``/``end_date`` columns are ignored; the ``target`` column, if present, is moved
    last (as TSLib does). Raises ``FileNotFoundError`` for a missing file and ``ValueError``
    naming the file, row (1-based line number in the file) and column for malformed content.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    rows, lines = read_rows(path)
    if not rows:
        raise ValueError(f"{path}: the file is empty (no header row)")
    header = check_header(path, [h.strip() for h in rows[0]])
    if "date" not in header:
        raise ValueError(f"{path}: no 'date' column in the header {header}")
    date_idx = header.index("date")
    chan_idx = [j for j, h in enumerate(header) if h not in ("date", "") and h not in IGNORED_COLUMNS]
    if not chan_idx:
        raise ValueError(f"{path}: zero channels (only 'date' and ignored columns in {header})")
    names = [header[j] for j in chan_idx]

    body = rows[1:]
    if not body:
        raise ValueError(f"{path}: no data rows")
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise ValueError(f"{path}: row {lines[i + 1]} has {len(row)} fields, the header has {len(header)}")
    dates = parse_dates(path, [row[date_idx] for row in body], lines[1:])
    values = np.empty((len(body), len(chan_idx)), dtype=np.float64)
    for i, row in enumerate(body):
        line = lines[i + 1]
        for k, j in enumerate(chan_idx):
            v, problem = parse_cell(row[j])
            if problem is not None:
                raise ValueError(f"{path}: {problem} in row {line}, column {header[j]!r}")
            values[i, k] = v

    if target in names:
        t = names.index(target)
        order = [k for k in range(len(names)) if k != t] + [t]
        names = [names[k] for k in order]
        values = values[:, order]
    return TimeSeriesTable(dates=dates, columns=names, values=values.astype(np.float32), name=str(path),
                           lines=lines[1:])


# ------------------------------------------------------------------------------ time features

_FREQ_ALIASES = {"s": "s", "t": "t", "min": "t", "h": "h", "d": "d", "b": "d", "w": "w", "m": "m", "mon": "m"}


def split_freq(freq: str) -> tuple[int, str]:
    """``(count, unit)`` of a TSLib/pandas freq string, an optional count and a unit (``"15min"`` ->
    ``(15, "min")``, ``"h"`` -> ``(1, "h")``; unit lower-cased); ``(0, "")`` when it is not of that form."""
    m = re.fullmatch(r"\s*(\d*)\s*([A-Za-z]+)\s*", str(freq))
    return (int(m.group(1) or 1), m.group(2).lower()) if m else (0, "")


def _norm_freq(freq: str) -> str:
    """The timeF letter of a TSLib/pandas freq string: an optional count and a unit (``"h"``, ``"3h"``,
    ``"15min"``, ``"t"``, ``"s"``, ``"d"``, ``"b"``, ``"w"``, ``"m"``/``"mon"``), as
    :func:`mmts_fast.text.prompts.freq_step` reads them."""
    count, unit = split_freq(freq)
    unit = _FREQ_ALIASES.get(unit)
    if unit is None or count < 1:
        raise ValueError(f"unsupported freq {freq!r}; expected a unit from {sorted(_FREQ_ALIASES)} with an "
                         "optional count (e.g. h, 3h, 15min, d)")
    return unit


def time_features(dates: Sequence[datetime], freq: str = "h") -> np.ndarray:
    """TSLib ``timeF`` features (``embed='timeF'``), each scaled to ``[-0.5, 0.5]``.

    ============  ========================================================  ===
    freq          features (in order)                                       F
    ============  ========================================================  ===
    ``s``         second/59, then the ``t`` features                        6
    ``t``/``min`` minute/59, hour/23, weekday/6, (day-1)/30, (yearday-1)/365  5
    ``h``         hour/23, weekday/6, (day-1)/30, (yearday-1)/365           4
    ``d``/``b``   weekday/6, (day-1)/30, (yearday-1)/365                    3
    ``w``         (day-1)/30, (ISO week-1)/52                                2
    ``m``         (month-1)/11                                              1
    ============  ========================================================  ===

    (each minus 0.5). Returns float32 ``[N, F]``.
    """
    f = _norm_freq(freq)
    cols: list[list[float]] = []
    for d in dates:
        day = (d.day - 1) / 30.0
        if f == "w":
            cols.append([day, (d.isocalendar()[1] - 1) / 52.0])
            continue
        if f == "m":
            cols.append([(d.month - 1) / 11.0])
            continue
        row = [d.weekday() / 6.0, day, (d.timetuple().tm_yday - 1) / 365.0]
        if f in ("h", "t", "s"):
            row.insert(0, d.hour / 23.0)
        if f in ("t", "s"):
            row.insert(0, d.minute / 59.0)
        if f == "s":
            row.insert(0, d.second / 59.0)
        cols.append(row)
    n_feat = {"s": 6, "t": 5, "h": 4, "d": 3, "w": 2, "m": 1}[f]
    out = np.asarray(cols, dtype=np.float64).reshape(len(cols), n_feat) - 0.5
    return out.astype(np.float32)


def median_spacing_s(dates: Sequence[datetime]) -> float:
    """Median spacing of ``dates`` in seconds; a clear error for fewer than two dates or dates that do
    not increase (the caller should then be given its frequency)."""
    if len(dates) < 2:
        raise ValueError(f"cannot infer a frequency from {len(dates)} date(s); pass freq explicitly")
    secs = np.diff(np.array([(d - dates[0]).total_seconds() for d in dates], dtype=np.float64))
    step = float(np.median(secs))
    if step == 0:
        date, count = Counter(dates).most_common(1)[0]
        raise ValueError(f"dates repeat: {date} appears {count} times (the most common date; median spacing 0 s); "
                         "the times of day may be missing from the date column: give each row its full date "
                         "and time, or pass freq explicitly")
    if step < 0:
        raise ValueError(f"dates are not increasing (median spacing {step} s); pass freq explicitly")
    return step


def infer_freq(dates: Sequence[datetime]) -> str:
    """Guess the TSLib freq letter ("t", "h", "d", "w" or "m") from the median spacing."""
    step = median_spacing_s(dates)
    if step < 3600:
        return "t"
    if step < 86400:
        return "h"
    if step < 7 * 86400:
        return "d"
    if step < 28 * 86400:
        return "w"
    return "m"


# ----------------------------------------------------------------------------------- borders


def split_borders(n_rows: int, lookback: int, kind: str) -> list[tuple[int, int]]:
    """TSLib train/val/test row ranges ``[(start, end)] * 3`` (val/test start ``lookback`` early).

    ``kind``: ``"ett_h"`` (12/4/4 months of hours), ``"ett_m"`` (the same, 15-minute rows) or
    ``"custom"`` (70/10/20). Starts may be negative when ``lookback`` exceeds the train split;
    :class:`ForecastDataset` reports that as too short.
    """
    L = lookback
    if kind in ("ett_h", "ett_m"):
        m = 1 if kind == "ett_h" else 4
        tr, va, te = 12 * 30 * 24 * m, 4 * 30 * 24 * m, 4 * 30 * 24 * m
        if n_rows < tr + va + te:
            raise ValueError(
                f"{kind} borders need at least {tr + va + te} rows, the file has {n_rows}; "
                "use borders='custom' for other files (--borders custom in the CLI)"
            )
        return [(0, tr), (tr - L, tr + va), (tr + va - L, tr + va + te)]
    if kind == "custom":
        n_train = int(n_rows * 0.7)
        n_test = int(n_rows * 0.2)
        n_val = n_rows - n_train - n_test
        return [(0, n_train), (n_train - L, n_train + n_val), (n_rows - n_test - L, n_rows)]
    raise ValueError(f"unknown borders kind {kind!r}; expected 'ett_h', 'ett_m', 'custom' or 'auto'")


def _borders_kind(name: str | None) -> str:
    """``auto`` rule: ETTh* files -> ett_h, ETTm* -> ett_m, anything else (or a table) -> custom."""
    if name is not None:
        if name.startswith("ETTh"):
            return "ett_h"
        if name.startswith("ETTm"):
            return "ett_m"
    return "custom"


# ----------------------------------------------------------------------------------- dataset


class ForecastDataset(Dataset):
    """Sliding windows over one split of a series, TSLib style.

    ``data`` is a CSV path or a :class:`TimeSeriesTable`. ``features``: ``"M"`` all channels in
    and out, ``"S"`` the target only, ``"MS"`` all channels in, the target only out. The scaler
    is fit on the train rows (``mean``/``std`` per input channel) unless ``stats=(mean, std)``
    is given. Items are float32 tensors ``(x [L, C], y [label_len+H, C_y], x_mark [L, F],
    y_mark [label_len+H, F])``.
    """

    def __init__(
        self,
        data: str | Path | TimeSeriesTable,
        split: str = "train",
        lookback: int = 336,
        horizon: int = 96,
        label_len: int = 0,
        features: str = "M",
        target: str = "OT",
        borders: Borders = "auto",
        freq: str | None = None,
        scale: bool = True,
        stats: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if lookback <= 0 or horizon <= 0:
            raise ValueError(f"lookback and horizon must be > 0, got lookback={lookback}, horizon={horizon}")
        if not 0 <= label_len <= lookback:
            raise ValueError(f"label_len must be in [0, lookback={lookback}], got {label_len}")
        if features not in ("M", "S", "MS"):
            raise ValueError(f"features must be 'M', 'S' or 'MS', got {features!r}")

        if isinstance(data, TimeSeriesTable):
            table, file_name = data, None
        else:
            table, file_name = load_csv(data, target=target), Path(data).name
        self.source = table.name
        self.split, self.lookback, self.horizon, self.label_len = split, lookback, horizon, label_len
        self.features, self.target = features, target

        # channel selection (target last, as TSLib orders them)
        columns = list(table.columns)
        values = table.values
        if target in columns:
            t = columns.index(target)
            order = [k for k in range(len(columns)) if k != t] + [t]
            columns, values = [columns[k] for k in order], values[:, order]
        elif target in (getattr(table, "dropped_columns", None) or ()):
            # a Time-MMD table loaded for another target: the column was dropped as non-numeric
            reason = (getattr(table, "dropped_reasons", None) or {}).get(target, "non-numeric cells")
            raise ValueError(f"{table.name}: target column {target!r} was dropped when loading: {reason}; "
                             f"load the table with target={target!r} to get the error for the bad cell")
        elif features in ("S", "MS") or target != "OT":   # M: the default target OT may be absent
            raise ValueError(f"{table.name}: target column {target!r} not found in {columns}")
        if features == "S":
            columns, values = columns[-1:], values[:, -1:]
        self.columns: list[str] = columns
        self.n_channels = len(columns)
        self.n_out_channels = 1 if features in ("S", "MS") else self.n_channels

        # borders
        n = len(table)
        kind = _borders_kind(file_name) if borders == "auto" else borders
        try:
            ranges = split_borders(n, lookback, kind) if isinstance(kind, str) else [tuple(b) for b in kind]
        except ValueError as e:
            raise ValueError(f"{table.name}: {e}") from None
        if len(ranges) != 3:
            raise ValueError(f"borders must give 3 (start, end) ranges, got {ranges}")
        start, end = ranges[SPLITS.index(split)]
        need = lookback + horizon
        if start < 0 or end > n or end - start < need:
            raise ValueError(
                f"{table.name} has {n} rows; the {split} split has {max(0, end - max(start, 0))} rows "
                f"(rows [{start}, {end})) and lookback+horizon needs {lookback}+{horizon}={need}"
            )
        self.borders = ranges
        self.start, self.end = start, end

        # scaler fit on the train rows only
        if stats is not None:
            mean, std = (np.asarray(a, dtype=np.float64).reshape(-1) for a in stats)
        elif scale:
            tr0, tr1 = ranges[0]
            train = values[max(tr0, 0):tr1].astype(np.float64)
            mean, std = train.mean(axis=0), train.std(axis=0)
            std = np.where(std == 0, 1.0, std)
        else:
            mean, std = np.zeros(self.n_channels), np.ones(self.n_channels)
        if mean.shape != (self.n_channels,) or std.shape != (self.n_channels,):
            raise ValueError(f"stats must have {self.n_channels} entries, got {mean.shape}, {std.shape}")
        self.mean: np.ndarray = mean.astype(np.float32)
        self.std: np.ndarray = std.astype(np.float32)

        rows = values[start:end].astype(np.float64)
        scaled = ((rows - self.mean.astype(np.float64)) / self.std.astype(np.float64)).astype(np.float32)
        back = next((i for i in range(1, len(table.dates)) if table.dates[i] < table.dates[i - 1]), None)
        if back is not None:   # windows would run backwards in time (repeated dates are let through)
            row = table.lines[back] if table.lines is not None else back   # the file's line number
            raise ValueError(f"{table.name}: dates must be in increasing order; row {row} ({table.dates[back]}) "
                             f"comes after {table.dates[back - 1]}: sort the file by date")
        try:
            self.freq = _norm_freq(freq) if freq is not None else infer_freq(table.dates)
        except ValueError as e:
            raise ValueError(f"{table.name}: {e}") from None
        marks = time_features(table.dates[start:end], self.freq)
        self.n_time_features = marks.shape[1]
        self._x = torch.from_numpy(scaled)
        self._y = self._x if features == "M" else self._x[:, -1:]
        self._marks = torch.from_numpy(marks)

    def __len__(self) -> int:
        return (self.end - self.start) - self.lookback - self.horizon + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        s_end = i + self.lookback
        r0, r1 = s_end - self.label_len, s_end + self.horizon
        return self._x[i:s_end], self._y[r0:r1], self._marks[i:s_end], self._marks[r0:r1]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The windows at ``indices`` stacked, as a DataLoader would collate them, in one gather."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        xs = indices[:, None] + torch.arange(self.lookback)
        ys = indices[:, None] + self.lookback - self.label_len + torch.arange(self.label_len + self.horizon)
        return self._x[xs], self._y[ys], self._marks[xs], self._marks[ys]

    def inverse_transform(self, arr: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Undo the scaling. The last axis is either all input channels or 1 (the target)."""
        c = arr.shape[-1]
        if c == self.n_channels:
            mean, std = self.mean, self.std
        elif c == 1:
            mean, std = self.mean[-1:], self.std[-1:]
        else:
            raise ValueError(f"last axis has {c} channels, expected {self.n_channels} or 1")
        if isinstance(arr, torch.Tensor):
            return arr * torch.as_tensor(std, dtype=arr.dtype, device=arr.device) + torch.as_tensor(
                mean, dtype=arr.dtype, device=arr.device
            )
        return np.asarray(arr) * std + mean


# ----------------------------------------------------------------------------------- loaders


def make_loaders(
    data: str | Path | TimeSeriesTable,
    lookback: int,
    horizon: int,
    batch_size: int = 32,
    label_len: int = 0,
    features: str = "M",
    target: str = "OT",
    borders: Borders = "auto",
    num_workers: int = 0,
    seed: int | None = None,
    freq: str | None = None,
) -> dict[str, DataLoader]:
    """Train/val/test DataLoaders as TSLib builds them (train: shuffle + drop_last; val/test keep
    every window, including the last partial batch). The file is read once and the train
    split's scaler is shared by val and test."""
    if isinstance(data, TimeSeriesTable):
        table = data
        kind = "custom" if borders == "auto" else borders
    else:
        table = load_csv(data, target=target)
        kind = _borders_kind(Path(data).name) if borders == "auto" else borders
    common = dict(
        lookback=lookback, horizon=horizon, label_len=label_len, features=features,
        target=target, borders=kind, freq=freq,
    )
    train = ForecastDataset(table, "train", **common)
    stats = (train.mean, train.std)
    val = ForecastDataset(table, "val", stats=stats, **common)
    test = ForecastDataset(table, "test", stats=stats, **common)
    gen = None
    if seed is not None:
        gen = torch.Generator()
        gen.manual_seed(seed)
    return {
        "train": DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                            num_workers=num_workers, generator=gen),
        "val": DataLoader(val, batch_size=batch_size, shuffle=False, drop_last=False,
                          num_workers=num_workers),
        "test": DataLoader(test, batch_size=batch_size, shuffle=False, drop_last=False,
                           num_workers=num_workers),
    }
