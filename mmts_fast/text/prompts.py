"""Prompts for the LLM-enhanced models (SPEC 1.2): a static dataset description and AutoTimes-style
dynamic prompts, one per time step: ``"This is Time Series from {start} to {end}"``."""
from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

from mmts_fast.data.tslib import median_spacing_s, split_freq

__all__ = ["DATASET_DESCRIPTIONS", "static_prompt", "dynamic_prompts", "freq_step", "DATE_FORMAT"]

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

#: Timestamps in prompts: minutes, no seconds.
DATE_FORMAT = "%Y-%m-%d %H:%M"


def static_prompt(text_or_path: str | Path) -> str:
    """The static prompt: a ``.txt`` file's content, a built-in description (by dataset name,
    see :data:`DATASET_DESCRIPTIONS`) or the given description string itself (stripped)."""
    if isinstance(text_or_path, Path) or (str(text_or_path).endswith(".txt") and "\n" not in str(text_or_path)):
        p = Path(text_or_path)
        if not p.is_file():
            raise FileNotFoundError(f"prompt file not found: {p}")
        text = p.read_text(encoding="utf-8").strip()
    else:
        text = DATASET_DESCRIPTIONS.get(str(text_or_path), str(text_or_path)).strip()
    if not text:
        raise ValueError(f"empty static prompt from {text_or_path!r}")
    return text


_UNITS = {"t": "minutes", "min": "minutes", "h": "hours", "d": "days", "b": "days", "w": "weeks",
          "s": "seconds", "m": "months", "mon": "months"}


def freq_step(freq: str | timedelta) -> timedelta | int:
    """One step of ``freq``: a timedelta, or an int number of calendar months.

    Strings are an optional count and a TSLib/pandas unit: ``"h"``, ``"15min"``/``"15t"``, ``"d"``,
    ``"b"`` (a day), ``"w"``, ``"m"``/``"mon"`` (calendar months), ``"s"``.
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
    return n if unit == "months" else timedelta(**{unit: n})


def _add(d: datetime, step: timedelta | int) -> datetime:
    if isinstance(step, timedelta):
        return d + step
    months = d.month - 1 + step
    year, month = d.year + months // 12, months % 12 + 1
    return d.replace(year=year, month=month, day=min(d.day, calendar.monthrange(year, month)[1]))


def _infer_step(dates: Sequence[datetime]) -> timedelta | int:
    step = median_spacing_s(dates)
    if 28 * 86400 <= step <= 31 * 86400:
        return 1
    return timedelta(seconds=step)


def dynamic_prompts(dates: Sequence[datetime], freq: str | timedelta | None = None) -> list[str]:
    """One AutoTimes-style prompt per time step: ``"This is Time Series from {start} to {end}"``,
    ``start`` the step's timestamp and ``end = start + freq`` (inferred from the median spacing of
    ``dates`` when None), both formatted as :data:`DATE_FORMAT`."""
    step = _infer_step(dates) if freq is None else freq_step(freq)
    return [f"This is Time Series from {d.strftime(DATE_FORMAT)} to {_add(d, step).strftime(DATE_FORMAT)}"
            for d in dates]
