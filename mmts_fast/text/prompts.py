"""Prompts for the LLM-enhanced models (SPEC 1.2): a static dataset description and AutoTimes-style
dynamic prompts, one per time step: ``"This is Time Series from {start} to {end}"``."""
from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

import numpy as np

from mmts_fast.data.tslib import median_spacing_s, split_freq

__all__ = ["DATASET_DESCRIPTIONS", "static_prompt", "dynamic_prompts", "freq_step", "DATE_FORMAT",
           "DATE_FORMAT_SECONDS"]

#: Short factual descriptions of the datasets in ``../shared/data``.
DATASET_DESCRIPTIONS: dict[str, str] = {
    "ETTh1": ("ETTh1 is an hourly electricity transformer dataset from one region of China, July 2016 "
              "to June 2018: six power-load channels (HUFL, HULL, MUFL, MULL, LUFL, LULL) and the "
              "target oil temperature (OT)."),
    "ETTm1": ("ETTm1 is a 15-minute electricity transformer dataset from one region of China, July 2016 "
              "to June 2018: six power-load channels (HUFL, HULL, MUFL, MULL, LUFL, LULL) and the "
              "target oil temperature (OT)."),
    "Energy": ("Time-MMD Energy holds weekly U.S. retail gasoline prices in dollars per gallon (all grades, "
               "all formulations) from the EIA, 1993 to 2024, nationally (target OT) and by region."),
    "Health_US": ("Time-MMD Health_US holds weekly U.S. influenza-like illness (ILI) surveillance from the "
                  "CDC, 1997 to 2024; the target OT is the percentage of patient visits for ILI."),
    "Environment": ("Time-MMD Environment holds the daily Air Quality Index (AQI) of the New York-Newark-"
                    "Jersey City area from the U.S. EPA, 1980 to 2023; the target OT is the daily AQI."),
}

#: Timestamps in prompts: minutes, no seconds (unless the step is under a minute, see
#: :data:`DATE_FORMAT_SECONDS`).
DATE_FORMAT = "%Y-%m-%d %H:%M"
#: Timestamps in prompts of data whose step is under a minute.
DATE_FORMAT_SECONDS = "%Y-%m-%d %H:%M:%S"


def _is_path(text_or_path: str | Path) -> bool:
    """A :class:`~pathlib.Path`, or a one-line string ending in ``.txt`` that is an existing file or
    looks like a path (no whitespace); other strings (``"Daily sales, see notes.txt"``) are text."""
    if isinstance(text_or_path, Path):
        return True
    s = str(text_or_path).strip()
    if not s.endswith(".txt") or "\n" in s:
        return False
    return not any(c.isspace() for c in s) or Path(s).expanduser().is_file()


def static_prompt(text_or_path: str | Path) -> str:
    """The static prompt: a ``.txt`` file's content, a built-in description (by dataset name,
    see :data:`DATASET_DESCRIPTIONS`) or the given description string itself (stripped).

    A string is read as a file when it ends in ``.txt`` and is an existing file or has no
    whitespace (then a missing file is a ``FileNotFoundError``); a description that merely ends in
    ``.txt`` (``"Daily sales, see notes.txt"``) is used as text."""
    if _is_path(text_or_path):
        p = Path(str(text_or_path).strip()).expanduser() if isinstance(text_or_path, str) else text_or_path
        if not p.is_file():
            raise FileNotFoundError(f"prompt file not found: {p}")
        text = p.read_text(encoding="utf-8").strip()
    else:
        text = DATASET_DESCRIPTIONS.get(str(text_or_path), str(text_or_path)).strip()
    if not text:
        raise ValueError(f"empty static prompt from {text_or_path!r}")
    return text


_UNITS = {"t": "minutes", "min": "minutes", "h": "hours", "d": "days", "b": "days", "w": "weeks",
          "s": "seconds", "m": "months", "mon": "months", "q": "quarters", "y": "years"}


def freq_step(freq: str | timedelta) -> timedelta | int:
    """One step of ``freq``: a timedelta, or an int number of calendar months.

    Strings are an optional count and a TSLib/pandas unit: ``"h"``, ``"15min"``/``"15t"``, ``"d"``,
    ``"b"`` (a day), ``"w"``, ``"m"``/``"mon"`` (calendar months), ``"q"`` (3 months), ``"y"``
    (12 months), ``"s"``.
    """
    if isinstance(freq, timedelta):
        if freq <= timedelta(0):
            raise ValueError(f"freq must be positive, got {freq}")
        return freq
    n, unit = split_freq(freq)
    unit = _UNITS.get(unit)
    if unit is None:
        raise ValueError(f"unsupported freq {freq!r}; expected e.g. 'h', '15min', 'd', 'w', 'm' or a timedelta")
    if n < 1:
        raise ValueError(f"freq must be positive, got {freq!r}")
    if unit in ("months", "quarters", "years"):
        return n * {"months": 1, "quarters": 3, "years": 12}[unit]
    return timedelta(**{unit: n})


def _add(d: datetime, step: timedelta | int) -> datetime:
    """``d + step``; a step of calendar months keeps the day of the month (clipped to the month's
    length) and keeps a month-end at the month-end (2000-02-29 + 1 month = 2000-03-31)."""
    if isinstance(step, timedelta):
        return d + step
    months = d.month - 1 + step
    year, month = d.year + months // 12, months % 12 + 1
    last = calendar.monthrange(year, month)[1]
    day = last if d.day == calendar.monthrange(d.year, d.month)[1] else min(d.day, last)
    return d.replace(year=year, month=month, day=day)


def _infer_step(dates: Sequence[datetime]) -> timedelta | int:
    """The step of ``dates``: its median spacing, or a whole number of calendar months when the
    median spacing is 28 days or more and matches the median calendar-month difference (monthly,
    quarterly, yearly data whose days vary with the months' lengths)."""
    step = median_spacing_s(dates)
    if step >= 28 * 86400:
        months = sorted((b.year - a.year) * 12 + b.month - a.month for a, b in zip(dates, dates[1:]))
        n = months[len(months) // 2]
        if n >= 1 and 28 * n * 86400 <= step <= 31 * n * 86400:
            return n
    return timedelta(seconds=step)


def _as_datetimes(dates: Sequence[datetime]) -> Sequence[datetime]:
    if isinstance(dates, np.ndarray) and np.issubdtype(dates.dtype, np.datetime64):
        return dates.astype("datetime64[us]").tolist()
    return dates


def dynamic_prompts(dates: Sequence[datetime], freq: str | timedelta | None = None) -> list[str]:
    """One AutoTimes-style prompt per time step: ``"This is Time Series from {start} to {end}"``,
    ``start`` the step's timestamp and ``end = start + freq`` (inferred from ``dates`` when None: the
    median spacing, or calendar months for monthly/quarterly/yearly data), both formatted as
    :data:`DATE_FORMAT` (:data:`DATE_FORMAT_SECONDS` when the step is under a minute).

    ``freq`` is the data's real step, count included (``"15min"``, ``"3h"``), not a time-feature letter."""
    dates = _as_datetimes(dates)
    step = _infer_step(dates) if freq is None else freq_step(freq)
    fmt = DATE_FORMAT_SECONDS if isinstance(step, timedelta) and step < timedelta(minutes=1) else DATE_FORMAT
    return [f"This is Time Series from {d.strftime(fmt)} to {_add(d, step).strftime(fmt)}" for d in dates]
