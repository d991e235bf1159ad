"""Built-in demo data: a seasonal multivariate series that needs no download."""
from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np

from mmts_fast.data.tslib import TimeSeriesTable

_STEPS = {"t": timedelta(minutes=15), "min": timedelta(minutes=15), "h": timedelta(hours=1),
          "d": timedelta(days=1)}


def synthetic_table(n_rows: int = 4000, n_channels: int = 4, freq: str = "h", seed: int = 0) -> TimeSeriesTable:
    """A deterministic demo series starting 2020-01-01.

    Each channel mixes a daily (24-row) and a weekly (168-row) seasonality with random phases
    and amplitudes, a slow linear trend and AR(1) noise. Channels are ``ch0 .. ch{C-2}`` and the
    last one is ``OT`` (the target). ``freq`` ("h", "t"/"min" = 15 minutes, "d") only sets the
    date spacing; the periods are counted in rows.
    """
    if n_rows < 2 or n_channels < 1:
        raise ValueError(f"need n_rows >= 2 and n_channels >= 1, got {n_rows}, {n_channels}")
    if freq not in _STEPS:
        raise ValueError(f"unsupported freq {freq!r}; expected one of {sorted(_STEPS)}")
    rng = np.random.default_rng(seed)
    t = np.arange(n_rows, dtype=np.float64)[:, None]
    c = n_channels
    daily = rng.uniform(0.5, 2.0, c) * np.sin(2 * np.pi * t / 24 + rng.uniform(0, 2 * np.pi, c))
    weekly = rng.uniform(0.3, 1.5, c) * np.sin(2 * np.pi * t / 168 + rng.uniform(0, 2 * np.pi, c))
    trend = rng.uniform(-1.0, 1.0, c) * t / n_rows + rng.uniform(-1.0, 1.0, c)
    phi, eps = rng.uniform(0.5, 0.9, c), rng.normal(0.0, 0.2, (n_rows, c))
    noise = np.empty_like(eps)
    noise[0] = eps[0]
    for i in range(1, n_rows):
        noise[i] = phi * noise[i - 1] + eps[i]
    values = (daily + weekly + trend + noise).astype(np.float32)
    start, step = datetime(2020, 1, 1), _STEPS[freq]
    dates = [start + i * step for i in range(n_rows)]
    columns = [f"ch{k}" for k in range(c - 1)] + ["OT"]
    return TimeSeriesTable(dates=dates, columns=columns, values=values, name=f"synthetic(seed={seed})")
