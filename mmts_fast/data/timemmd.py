"""Time-MMD (Liu et al., NeurIPS 2024 D&B): a numerical series plus dated texts per domain.

A domain folder ``<Domain>/`` holds ``<Domain>.csv`` (``date``, ``start_date``, ``end_date`` and
channels, target ``OT``) and ``<Domain>_report.csv`` / ``<Domain>_search.csv`` (``start_date,
end_date, fact, preds``). Leakage rule (SPEC 3): a window may only see texts whose ``end_date``
is at or before the ``date`` of the window's last step; each window gets the latest such text.
"""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mmts_fast.data.tslib import ForecastDataset, TimeSeriesTable, check_header, parse_cell, parse_dates, read_rows

__all__ = ["TextRecord", "TimeMMDTexts", "load_timemmd", "load_texts", "align_texts", "TimeMMDDataset"]

logger = logging.getLogger(__name__)

#: Columns of the numerical file that are never channels.
DATE_COLUMNS = ("date", "start_date", "end_date")
TEXT_SOURCES = ("report", "search")
_NA = {"", "na", "n/a", "nan", "none", "null"}


@dataclass(frozen=True)
class TextRecord:
    """One dated text of a domain."""

    start_date: datetime
    end_date: datetime
    text: str
    source: str  # "report" or "search"


@dataclass
class TimeMMDTexts:
    """The texts of a domain sorted by ``end_date`` (stable: ties keep report-then-search file order)."""

    records: list[TextRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.records = sorted(self.records, key=lambda r: r.end_date)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> TextRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[TextRecord]:
        return iter(self.records)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.records]

    @property
    def end_dates(self) -> np.ndarray:
        """``datetime64[s]`` array, non-decreasing."""
        return _to_datetime64([r.end_date for r in self.records])


# ------------------------------------------------------------------------------------ loading


def _domain_files(domain_dir_or_csv: str | Path) -> tuple[Path, Path, str]:
    """(numerical csv, folder, domain name) from a domain folder or its numerical csv."""
    p = Path(domain_dir_or_csv)
    if p.is_dir():
        csv_path = p / f"{p.name}.csv"
    else:
        csv_path = p
    if not csv_path.is_file():
        raise FileNotFoundError(f"Time-MMD numerical file not found: {csv_path}")
    return csv_path, csv_path.parent, csv_path.stem


def _read_numeric(csv_path: Path, target: str) -> TimeSeriesTable:
    """The numeric channels of a Time-MMD file, ``target`` last.

    A column with any empty, non-numeric or NaN/inf cell is dropped (Time-MMD files carry text
    columns such as Health_US's ``REGION``) with a warning naming it and its first bad cell; the
    names are kept in ``table.dropped_columns`` and the reasons in ``table.dropped_reasons``. The
    ``target`` column is never dropped: a bad cell there raises a ``ValueError`` naming the file,
    row (1-based line number), date, column and value, as :func:`~mmts_fast.data.tslib.load_csv`
    does.
    """
    rows, lines = read_rows(csv_path)
    if len(rows) < 2:
        raise ValueError(f"{csv_path}: no data rows")
    header = check_header(csv_path, [h.strip() for h in rows[0]])
    if "date" not in header:
        raise ValueError(f"{csv_path}: no 'date' column in the header {header}")
    body, body_lines = rows[1:], lines[1:]
    for r, line in zip(body, body_lines):
        if len(r) != len(header):
            raise ValueError(f"{csv_path}: row {line} has {len(r)} fields, the header has {len(header)}")
    d = header.index("date")
    dates = parse_dates(csv_path, [r[d] for r in body], body_lines)

    names, cols, reasons = [], [], {}   # reasons: dropped column -> its first bad cell, in header order
    for j, h in enumerate(header):
        if h in DATE_COLUMNS or h == "":
            continue
        vals: list[float] = []
        for r, line in zip(body, body_lines):
            v, problem = parse_cell(r[j])
            if problem is not None:
                where = f"{problem} in row {line} (date {r[d].strip()})"
                if h == target:
                    raise ValueError(
                        f"{csv_path}: {where}, column {h!r}: the target column must be numeric in every "
                        "row (fix or fill the cell, or choose another target)"
                    )
                reasons[h] = where
                break
            vals.append(v)
        else:
            names.append(h)
            cols.append(vals)
    if reasons:
        logger.warning("%s: dropped %d column(s) with non-numeric cells (not used as channels): %s",
                       csv_path.name, len(reasons), "; ".join(f"column {h!r}: {r}" for h, r in reasons.items()))
    if not names:
        raise ValueError(f"{csv_path}: no numeric channel columns in {header}")
    values = np.asarray(cols, dtype=np.float64).T
    if target in names:  # target last, as TSLib orders channels
        t = names.index(target)
        order = [k for k in range(len(names)) if k != t] + [t]
        names, values = [names[k] for k in order], values[:, order]
    table = TimeSeriesTable(dates=dates, columns=names, values=values.astype(np.float32), name=str(csv_path),
                            lines=list(body_lines))
    table.dropped_columns = list(reasons)  # type: ignore[attr-defined]
    table.dropped_reasons = reasons  # type: ignore[attr-defined]
    return table


#: A placeholder part: "NA" followed by whitespace or "(" ("NA (No relevant information found)",
#: "NA \n\nPlease provide a valid excerpt..."). Case-sensitive: "NAFTA", "NASA's", "National" are text.
_NA_PLACEHOLDER = re.compile(r"NA[\s(]")


def _is_missing(part: str) -> bool:
    p = part.strip()
    return p.lower() in _NA or _NA_PLACEHOLDER.match(p) is not None


def _clean(cell: str | None) -> str:
    """A text cell without its NA markers: ``;``-separated parts that are "NA", "nan", empty, ...
    or an NA placeholder ("NA" then whitespace or "(": "NA (No relevant information found)") are
    dropped ("NA;NA" -> "", "NA;pred" -> "pred")."""
    if cell is None:
        return ""
    return ";".join(p for p in cell.split(";") if not _is_missing(p)).strip()


def load_texts(folder: str | Path, domain: str) -> TimeMMDTexts:
    """The report and search texts of ``domain`` in ``folder``: ``text = fact + " " + preds``
    (missing parts skipped, records with neither skipped). Absent files are skipped with a note."""
    folder = Path(folder)
    records: list[TextRecord] = []
    for source in TEXT_SOURCES:
        path = folder / f"{domain}_{source}.csv"
        if not path.is_file():
            logger.info("no %s texts for %s (%s absent)", source, domain, path)
            continue
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = {"start_date", "end_date", "fact", "preds"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: missing columns {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                text = " ".join(t for t in (_clean(row["fact"]), _clean(row["preds"])) if t)
                if not text:
                    continue
                try:
                    start = datetime.fromisoformat(row["start_date"].strip())
                    end = datetime.fromisoformat(row["end_date"].strip())
                except (ValueError, AttributeError):
                    raise ValueError(f"{path}: unparseable start_date/end_date in record near line {line}") from None
                records.append(TextRecord(start_date=start, end_date=end, text=text, source=source))
    return TimeMMDTexts(records)


def load_timemmd(domain_dir_or_csv: str | Path, target: str = "OT") -> tuple[TimeSeriesTable, TimeMMDTexts]:
    """A Time-MMD domain: ``(table, texts)``. The table keeps the numeric channels only (dropped
    columns are logged as a warning and listed in ``table.dropped_columns``); the ``target``
    column is never dropped: a bad cell in it is a ``ValueError``. ``texts`` are sorted by end_date."""
    csv_path, folder, domain = _domain_files(domain_dir_or_csv)
    return _read_numeric(csv_path, target), load_texts(folder, domain)


# ----------------------------------------------------------------------------------- alignment


def _to_datetime64(dates: Sequence[datetime] | np.ndarray) -> np.ndarray:
    return np.asarray(dates, dtype="datetime64[s]")


def align_texts(window_end_dates: Sequence[datetime] | np.ndarray,
                text_end_dates: Sequence[datetime] | np.ndarray) -> torch.Tensor:
    """For each window, the index of the latest text whose end_date is at or before the window's
    last step date, or -1 when there is none. ``text_end_dates`` must be non-decreasing; with
    equal end dates the last one is chosen. Returns a LongTensor ``[len(window_end_dates)]``."""
    w = _to_datetime64(window_end_dates)
    t = _to_datetime64(text_end_dates)
    if t.size > 1 and (np.diff(t) < np.timedelta64(0, "s")).any():
        raise ValueError("text_end_dates must be sorted (non-decreasing)")
    idx = np.searchsorted(t, w, side="right") - 1
    return torch.from_numpy(idx.astype(np.int64))


# ------------------------------------------------------------------------------------ dataset


class TimeMMDDataset(Dataset):
    """A :class:`ForecastDataset` over a Time-MMD domain (70/10/20 "custom" borders) whose items
    also carry the aligned text index: ``(x, y, x_mark, y_mark, text_idx)``.

    ``text_idx`` indexes ``self.texts`` (-1: no text yet); the text of window ``i`` ends at or
    before the date of the window's last input step. Other arguments are ForecastDataset's.
    """

    def __init__(
        self,
        data: str | Path | tuple[TimeSeriesTable, TimeMMDTexts],
        split: str = "train",
        lookback: int = 36,
        horizon: int = 12,
        label_len: int = 0,
        features: str = "M",
        target: str = "OT",
        freq: str | None = None,
        scale: bool = True,
        stats: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        table, texts = data if isinstance(data, tuple) else load_timemmd(data, target=target)
        self.table, self.texts = table, texts
        self.series = ForecastDataset(table, split, lookback=lookback, horizon=horizon, label_len=label_len,
                                      features=features, target=target, borders="custom", freq=freq,
                                      scale=scale, stats=stats)
        s = self.series
        last_rows = s.start + lookback - 1 + np.arange(len(s))  # absolute row of each window's last step
        window_end = _to_datetime64(table.dates)[last_rows]
        self.window_end_dates: np.ndarray = window_end
        self.text_idx: torch.Tensor = align_texts(window_end, texts.end_dates)

    # passthrough of the series attributes models and trainers read
    def __getattr__(self, name: str):
        if name == "series":  # not yet set (during __init__ or unpickling)
            raise AttributeError(name)
        return getattr(self.series, name)

    def __len__(self) -> int:
        return len(self.series)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if i < 0:
            i += len(self)
        x, y, xm, ym = self.series[i]
        return x, y, xm, ym, self.text_idx[i]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The windows at ``indices`` stacked, plus their text indices ``[B]``, in one gather each."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return (*self.series.batch(indices), self.text_idx[indices])

    def text_of(self, i: int) -> TextRecord | None:
        """The text record window ``i`` sees, or None."""
        k = int(self.text_idx[i])
        return self.texts[k] if k >= 0 else None
