"""Data loading: TSLib-compatible CSV datasets and built-in synthetic demo data."""
from mmts_fast.data.synthetic import synthetic_table
from mmts_fast.data.timemmd import TimeMMDDataset, align_texts, load_timemmd
from mmts_fast.data.tslib import (
    ForecastDataset,
    TimeSeriesTable,
    infer_freq,
    load_csv,
    make_loaders,
    split_borders,
    time_features,
)

__all__ = [
    "ForecastDataset",
    "TimeMMDDataset",
    "TimeSeriesTable",
    "align_texts",
    "load_timemmd",
    "infer_freq",
    "load_csv",
    "make_loaders",
    "split_borders",
    "synthetic_table",
    "time_features",
]
