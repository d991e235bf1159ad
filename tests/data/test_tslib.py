"""Tests for the TSLib-compatible loader (mmts_fast.data.tslib) and the synthetic demo data."""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from mmts_fast.data import (
    ForecastDataset,
    TimeSeriesTable,
    infer_freq,
    load_csv,
    make_loaders,
    split_borders,
    synthetic_table,
    time_features,
)

SHARED = Path(__file__).resolve().parents[3] / "shared/data"
ETTH1 = SHARED / "ETT/ETTh1.csv"
ENERGY = SHARED / "Time-MMD/Energy/Energy.csv"


def write_csv(path: Path, n_rows: int, header: str = "date,a,OT", bad: dict[tuple[int, int], str] | None = None) -> Path:
    """Hourly CSV with 2 channels; ``bad[(row, col)]`` overrides a cell (row 0 = first data row)."""
    bad = bad or {}
    start = datetime(2021, 1, 1)
    lines = [header]
    for i in range(n_rows):
        cells = [(start + timedelta(hours=i)).isoformat(sep=" "), f"{i * 0.5:.3f}", f"{np.sin(i):.4f}"]
        for (r, c), v in bad.items():
            if r == i:
                cells[c] = v
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def trend_table(n: int = 1000, c: int = 3) -> TimeSeriesTable:
    """A table with a strong trend so that val/test statistics differ from train ones."""
    t = np.arange(n, dtype=np.float64)[:, None]
    values = t / 100.0 * np.arange(1, c + 1) + np.sin(2 * np.pi * t / 24 + np.arange(c))
    dates = [datetime(2020, 1, 1) + timedelta(hours=i) for i in range(n)]
    return TimeSeriesTable(dates=dates, columns=[f"c{k}" for k in range(c - 1)] + ["OT"], values=values)


# ------------------------------------------------------------------------------ time features


def test_time_features_hourly_hand_computed():
    dates = [datetime(2016, 7, 1, 0), datetime(2018, 2, 20, 23)]  # Friday; Tuesday
    got = time_features(dates, "h")
    want = np.array(
        [
            [0 / 23, 4 / 6, 0 / 30, 182 / 365],
            [23 / 23, 1 / 6, 19 / 30, 50 / 365],
        ]
    ) - 0.5
    assert got.dtype == np.float32 and got.shape == (2, 4)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_time_features_minutely_daily_weekly_hand_computed():
    d = datetime(2021, 3, 14, 17, 45)  # Sunday, day of year 73
    want_t = np.array([45 / 59, 17 / 23, 6 / 6, 13 / 30, 72 / 365]) - 0.5
    np.testing.assert_allclose(time_features([d], "t")[0], want_t, atol=1e-6)
    np.testing.assert_allclose(time_features([d], "min")[0], want_t, atol=1e-6)
    np.testing.assert_allclose(time_features([d], "d")[0], want_t[2:], atol=1e-6)
    # weekly: DayOfMonth, WeekOfYear (ISO week 18 for 2024-04-29)
    np.testing.assert_allclose(time_features([datetime(2024, 4, 29)], "w")[0], [28 / 30 - 0.5, 17 / 52 - 0.5], atol=1e-6)
    feats = time_features([datetime(2020, 1, 1) + timedelta(minutes=7 * i) for i in range(5000)], "t")
    assert feats.min() >= -0.5 and feats.max() <= 0.5


def test_infer_freq():
    base = datetime(2020, 1, 1)
    for step, f in [(timedelta(minutes=15), "t"), (timedelta(hours=1), "h"), (timedelta(days=1), "d"),
                    (timedelta(weeks=1), "w"), (timedelta(days=30), "m")]:
        assert infer_freq([base + i * step for i in range(10)]) == f


# ----------------------------------------------------------------------------------- borders


def test_ett_borders():
    assert split_borders(17420, 336, "ett_h") == [(0, 8640), (8640 - 336, 11520), (11520 - 336, 14400)]
    assert split_borders(69680, 96, "ett_m") == [(0, 34560), (34560 - 96, 46080), (46080 - 96, 57600)]
    n = 1000
    assert split_borders(n, 24, "custom") == [(0, 700), (676, 800), (776, 1000)]
    with pytest.raises(ValueError, match="14400 rows"):
        split_borders(1000, 24, "ett_h")


# ------------------------------------------------------------------------------ scaler/windows


def test_scaler_fit_on_train_rows_only():
    table = trend_table()
    n_train = int(len(table) * 0.7)
    train = ForecastDataset(table, "train", lookback=24, horizon=12)
    np.testing.assert_allclose(train.mean, table.values[:n_train].mean(0), rtol=1e-5)
    np.testing.assert_allclose(train.std, table.values[:n_train].std(0), rtol=1e-5)
    scaled = (table.values - train.mean) / train.std
    assert np.abs(scaled[:n_train].mean(0)).max() < 1e-4
    assert np.abs(scaled[n_train:].mean(0)).min() > 1.0  # val/test drift away from the train stats
    for split in ("val", "test"):
        ds = ForecastDataset(table, split, lookback=24, horizon=12)
        np.testing.assert_array_equal(ds.mean, train.mean)
        np.testing.assert_array_equal(ds.std, train.std)
    # inverse_transform round trip
    x = train[3][0].numpy()
    np.testing.assert_allclose(train.inverse_transform(x), table.values[3:27], rtol=1e-4, atol=1e-4)


def test_constant_channel_std_is_one():
    table = trend_table()
    table.values[:, 0] = 5.0
    ds = ForecastDataset(table, "train", lookback=24, horizon=12)
    assert ds.std[0] == 1.0 and ds.mean[0] == 5.0


@pytest.mark.parametrize("features", ["M", "S", "MS"])
@pytest.mark.parametrize("label_len", [0, 8])
def test_windows_are_slices_of_the_scaled_array(features, label_len):
    table = trend_table()
    L, H = 24, 12
    ds = ForecastDataset(table, "val", lookback=L, horizon=H, label_len=label_len, features=features)
    start, end = ds.borders[1]
    values = table.values[:, -1:] if features == "S" else table.values
    scaled = ((values - ds.mean) / ds.std).astype(np.float32)
    marks = time_features(table.dates, "h")
    assert len(ds) == (end - start) - L - H + 1
    y_cols = slice(-1, None) if features in ("S", "MS") else slice(None)
    for i in (0, 5, len(ds) - 1):
        x, y, xm, ym = ds[i]
        s = start + i
        assert all(t.dtype == torch.float32 for t in (x, y, xm, ym))
        assert x.shape == (L, ds.n_channels) and y.shape == (label_len + H, 1 if features != "M" else 3)
        np.testing.assert_allclose(x.numpy(), scaled[s:s + L], atol=1e-5)
        np.testing.assert_allclose(y.numpy(), scaled[s + L - label_len:s + L + H, y_cols], atol=1e-5)
        np.testing.assert_array_equal(xm.numpy(), marks[s:s + L])
        np.testing.assert_array_equal(ym.numpy(), marks[s + L - label_len:s + L + H])
    assert ds.n_channels == (1 if features == "S" else 3)
    assert ds.n_time_features == 4 and ds.freq == "h"


def test_make_loaders_keeps_last_test_batch_and_drops_last_train():
    table = trend_table()
    loaders = make_loaders(table, lookback=24, horizon=12, batch_size=32, seed=0)
    test_ds = loaders["test"].dataset
    assert len(test_ds) % 32 != 0
    assert sum(b[0].shape[0] for b in loaders["test"]) == len(test_ds)
    assert sum(b[0].shape[0] for b in loaders["val"]) == len(loaders["val"].dataset)
    train_sizes = [b[0].shape[0] for b in loaders["train"]]
    assert train_sizes == [32] * (len(loaders["train"].dataset) // 32)
    # val/test share the train scaler; a seed makes the shuffle reproducible
    for split in ("val", "test"):
        np.testing.assert_array_equal(loaders[split].dataset.mean, loaders["train"].dataset.mean)
        np.testing.assert_array_equal(loaders[split].dataset.std, loaders["train"].dataset.std)
    first = [make_loaders(table, lookback=24, horizon=12, batch_size=32, seed=0)["train"] for _ in range(2)]
    torch.testing.assert_close(next(iter(first[0]))[0], next(iter(first[1]))[0])


def test_make_loaders_from_csv(tmp_path):
    path = write_csv(tmp_path / "series.csv", 300)
    loaders = make_loaders(path, lookback=24, horizon=12, batch_size=16, features="MS")
    x, y, xm, ym = next(iter(loaders["test"]))
    assert x.shape == (16, 24, 2) and y.shape == (16, 12, 1) and xm.shape == (16, 24, 4)
    assert loaders["train"].dataset.columns == ["a", "OT"]


def test_synthetic_table_is_deterministic():
    a, b = synthetic_table(n_rows=500, n_channels=3, seed=1), synthetic_table(n_rows=500, n_channels=3, seed=1)
    c = synthetic_table(n_rows=500, n_channels=3, seed=2)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)
    assert a.columns == ["ch0", "ch1", "OT"] and a.values.shape == (500, 3) and a.values.dtype == np.float32
    assert a.dates[0] == datetime(2020, 1, 1) and infer_freq(a.dates) == "h"
    assert np.isfinite(a.values).all()


# ------------------------------------------------------------------------------------ errors


def test_load_csv_target_moved_last(tmp_path):
    path = write_csv(tmp_path / "x.csv", 10, header="date,OT,a")
    table = load_csv(path)
    assert table.columns == ["a", "OT"]
    np.testing.assert_allclose(table.values[:, 0], np.sin(np.arange(10)), atol=1e-4)


def test_error_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_csv(tmp_path / "nope.csv")


def test_error_missing_date_column(tmp_path):
    path = write_csv(tmp_path / "nodate.csv", 10, header="time,a,OT")
    with pytest.raises(ValueError, match=r"nodate\.csv.*no 'date' column"):
        load_csv(path)


def test_error_non_numeric_cell(tmp_path):
    path = write_csv(tmp_path / "bad.csv", 10, bad={(3, 1): "abc"})
    with pytest.raises(ValueError, match=r"non-numeric value 'abc' in row 5, column 'a'"):
        load_csv(path)


def test_error_nan_and_empty_cells(tmp_path):
    path = write_csv(tmp_path / "nan.csv", 10, bad={(6, 2): "NaN"})
    with pytest.raises(ValueError, match=r"NaN/inf value 'NaN' in row 8, column 'OT'"):
        load_csv(path)
    path = write_csv(tmp_path / "empty.csv", 10, bad={(0, 1): ""})
    with pytest.raises(ValueError, match=r"empty value in row 2, column 'a'"):
        load_csv(path)


def test_error_row_is_the_file_line_with_blank_lines(tmp_path):
    path = write_csv(tmp_path / "blank.csv", 10, bad={(6, 2): "oops"})  # line 8
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + ["", ""] + lines[3:]) + "\n")  # two blank lines before it
    with pytest.raises(ValueError, match=r"non-numeric value 'oops' in row 10, column 'OT'"):
        load_csv(path)


def test_error_bad_date_and_no_channels(tmp_path):
    path = write_csv(tmp_path / "date.csv", 10, bad={(2, 0): "yesterday"})
    with pytest.raises(ValueError, match=r"unparseable date 'yesterday' in row 4"):
        load_csv(path)
    (tmp_path / "nochan.csv").write_text("date,start_date\n2020-01-01,2020-01-01\n")
    with pytest.raises(ValueError, match="zero channels"):
        load_csv(tmp_path / "nochan.csv")


def test_error_file_shorter_than_lookback_plus_horizon(tmp_path):
    path = write_csv(tmp_path / "short.csv", 50)
    with pytest.raises(ValueError, match=r"has 50 rows; the train split has 35 rows .* needs 24\+12=36"):
        ForecastDataset(path, "train", lookback=24, horizon=12)
    with pytest.raises(ValueError, match="lookback and horizon must be > 0"):
        ForecastDataset(path, "train", lookback=0, horizon=12)


# --------------------------------------------------------------------------------- real data


def test_etth1_split_lengths():
    if not ETTH1.is_file():
        pytest.skip(f"{ETTH1} not present")
    loaders = make_loaders(ETTH1, lookback=336, horizon=96, batch_size=32)
    lens = {k: len(v.dataset) for k, v in loaders.items()}
    assert lens == {"train": 8209, "val": 2785, "test": 2785}
    ds = loaders["train"].dataset
    assert ds.n_channels == 7 and ds.n_time_features == 4 and ds.freq == "h"
    assert ds.columns[-1] == "OT"
    x, y, xm, ym = ds[0]
    assert x.shape == (336, 7) and y.shape == (96, 7) and xm.shape == (336, 4)


def test_time_mmd_energy():
    if not ENERGY.is_file():
        pytest.skip(f"{ENERGY} not present")
    table = load_csv(ENERGY)
    assert table.columns[-1] == "OT"
    assert "start_date" not in table.columns and "end_date" not in table.columns
    assert table.values.shape == (len(table.dates), len(table.columns)) and len(table.columns) >= 2
    assert infer_freq(table.dates) == "w"
    ds = ForecastDataset(table, "test", lookback=36, horizon=24)
    assert ds.freq == "w" and ds.n_time_features == 2 and len(ds) > 0


def test_dates_out_of_order_are_an_error():
    """Windows must run forward in time: a file with a date earlier than the one before it is refused
    (an explicit freq does not change that); repeated dates are let through."""
    t = trend_table(n=200)
    t.dates[57], t.dates[58] = t.dates[58], t.dates[57]
    with pytest.raises(ValueError, match=r"dates must be in increasing order; row 58 .*sort the file by date"):
        ForecastDataset(t, "train", lookback=24, horizon=8, borders="custom", freq="h")
    t = trend_table(n=200)
    t.dates[58] = t.dates[57]
    assert len(ForecastDataset(t, "train", lookback=24, horizon=8, borders="custom")) > 0


# ------------------------------------------------------------------- date formats and headers


def _rewrite_dates(path: Path, fmt) -> Path:
    """``path`` with each date cell rewritten by ``fmt(datetime)``."""
    lines = path.read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        date, rest = line.split(",", 1)
        out.append(f"{fmt(datetime.fromisoformat(date))},{rest}")
    path.write_text("\n".join(out) + "\n")
    return path


@pytest.mark.parametrize("fmt", [
    lambda d: f"{d.year}/{d.month}/{d.day} {d.hour}:{d.minute:02d}",        # TSLib's exchange_rate.csv
    lambda d: d.strftime("%Y/%m/%d %H:%M"),
    lambda d: f"{d.month}/{d.day}/{d.year} {d.hour}:{d.minute:02d}",
    lambda d: f"{d.year}-{d.month}-{d.day} {d.hour}:{d.minute:02d}",         # ISO-like, single-digit fields
])
def test_non_iso_date_formats(tmp_path, fmt):
    want = load_csv(write_csv(tmp_path / "iso.csv", 30)).dates
    got = load_csv(_rewrite_dates(write_csv(tmp_path / "x.csv", 30), fmt)).dates
    assert got == want


def test_single_digit_dates_without_time(tmp_path):
    """Daily data written without zero padding or time ("2016-1-9"), as spreadsheets export it."""
    days = [datetime(2016, 1, 1) + timedelta(days=i) for i in range(40)]
    path = tmp_path / "daily.csv"
    path.write_text("date,OT\n" + "".join(f"{d.year}-{d.month}-{d.day},{i}\n" for i, d in enumerate(days)))
    assert load_csv(path).dates == days


def test_date_errors_name_formats_and_mixed_timezones(tmp_path):
    path = write_csv(tmp_path / "d.csv", 10, bad={(0, 0): "01.01.2021"})
    with pytest.raises(ValueError, match=r"unparseable date '01.01.2021' in row 2, column 'date' \(accepted: ISO "
                                         r"8601 .*%Y/%m/%d %H:%M"):
        load_csv(path)
    path = _rewrite_dates(write_csv(tmp_path / "m.csv", 10), lambda d: d.strftime("%Y/%m/%d %H:%M"))
    lines = path.read_text().splitlines()
    lines[5] = "2021-01-01 04:00:00," + lines[5].split(",", 1)[1]      # one ISO date in a %Y/%m/%d file
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"m\.csv: unparseable date '2021-01-01 04:00:00' in row 6.*one format"):
        load_csv(path)
    path = write_csv(tmp_path / "tz.csv", 10, bad={(3, 0): "2021-01-01 03:00:00+00:00"})
    with pytest.raises(ValueError, match=r"tz\.csv: date '2021-01-01 03:00:00\+00:00' in row 5, column 'date' "
                                         r"has a timezone but the first date"):
        load_csv(path)


def test_index_column_dropped_and_duplicate_names(tmp_path, caplog):
    import logging
    path = write_csv(tmp_path / "idx.csv", 10)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([","+ lines[0]] + [f"{i},{l}" for i, l in enumerate(lines[1:])]) + "\n")
    with caplog.at_level(logging.WARNING, logger="mmts_fast.data.tslib"):
        table = load_csv(path)
    assert table.columns == ["a", "OT"]
    assert any("idx.csv" in r.getMessage() and "empty header name" in r.getMessage() for r in caplog.records)
    path = write_csv(tmp_path / "dup.csv", 10, header="date,OT,OT")
    with pytest.raises(ValueError, match=r"dup\.csv: column name 'OT' appears 2 times"):
        load_csv(path)


def test_unknown_target_with_features_m(tmp_path):
    path = write_csv(tmp_path / "x.csv", 100)
    with pytest.raises(ValueError, match=r"x\.csv: target column 'nope' not found in \['a', 'OT'\]"):
        ForecastDataset(path, "train", lookback=24, horizon=8, features="M", target="nope")
    # the default target OT may be absent with M: the file's columns are used as they are
    path = write_csv(tmp_path / "no_ot.csv", 100, header="date,a,b")
    assert ForecastDataset(path, "train", lookback=24, horizon=8, features="M").columns == ["a", "b"]


def test_sort_error_names_the_file_line(tmp_path):
    path = write_csv(tmp_path / "s.csv", 100)
    lines = path.read_text().splitlines()
    lines[10], lines[11] = lines[11], lines[10]        # data rows 10/11: file lines 11 and 12
    path.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")   # a blank line: they are lines 12, 13
    with pytest.raises(ValueError, match=r"s\.csv: dates must be in increasing order; row 13 "):
        ForecastDataset(path, "train", lookback=24, horizon=8)


def test_not_utf8_file(tmp_path):
    import gzip
    path = tmp_path / "x.csv.gz"
    path.write_bytes(gzip.compress(write_csv(tmp_path / "x.csv", 10).read_bytes()))
    with pytest.raises(ValueError, match=r"x\.csv\.gz: not a UTF-8 CSV text file"):
        load_csv(path)


def test_repeated_dates_message(tmp_path):
    path = write_csv(tmp_path / "days.csv", 100)
    _rewrite_dates(path, lambda d: d.date().isoformat())      # hourly rows, dates without their times
    with pytest.raises(ValueError, match=r"days\.csv: dates repeat: 2021-01-01 00:00:00 appears 24 times .*times "
                                         r"of day may be missing"):
        ForecastDataset(path, "train", lookback=12, horizon=4)


def test_freq_strings_with_counts():
    t = trend_table(n=200)
    for freq, n_feat in (("15min", 5), ("3h", 4), ("h", 4), ("s", 6), ("2d", 3), ("mon", 1)):
        ds = ForecastDataset(t, "train", lookback=24, horizon=8, borders="custom", freq=freq)
        assert ds.n_time_features == n_feat, freq
    d = datetime(2020, 1, 1, 5, 6, 7)
    np.testing.assert_allclose(time_features([d], "s")[0],
                               np.array([7 / 59, 6 / 59, 5 / 23, 2 / 6, 0, 0]) - 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="unsupported freq '0h'"):
        ForecastDataset(t, "train", lookback=24, horizon=8, borders="custom", freq="0h")
