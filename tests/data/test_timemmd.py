"""Tests for the Time-MMD loader (mmts_fast.data.timemmd): numeric channels, text records and the
leakage rule (a window sees only texts that end at or before its last step)."""
from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from mmts_fast.data.timemmd import TimeMMDDataset, TimeMMDTexts, TextRecord, align_texts, load_timemmd
from mmts_fast.data.tslib import ForecastDataset, load_csv

SHARED = Path(__file__).resolve().parents[3] / "shared/data/Time-MMD"


def _domain(name: str) -> Path:
    p = SHARED / name
    if not (p / f"{name}.csv").is_file():
        pytest.skip(f"real data not present: {p}")
    return p


def assert_no_leakage(window_end: np.ndarray, text_end: np.ndarray, idx: torch.Tensor) -> None:
    """Chosen text ends at or before the window end; the next text (if any) ends after it."""
    idx = idx.numpy()
    window_end = window_end.astype("datetime64[s]")
    text_end = text_end.astype("datetime64[s]")
    has = idx >= 0
    assert (text_end[idx[has]] <= window_end[has]).all()
    nxt = idx + 1
    later = nxt < len(text_end)
    assert (text_end[nxt[later]] > window_end[later]).all()


def write_domain(folder: Path, name: str = "Toy", n_days: int = 60) -> Path:
    """A daily toy domain with a non-numeric column and texts with NA parts and equal end dates."""
    d = folder / name
    d.mkdir()
    start = datetime(2020, 1, 1)
    lines = ["date,OT,label,value,start_date,end_date"]
    for i in range(n_days):
        day = (start + timedelta(days=i)).date()
        lines.append(f"{day},{i},{'hi' if i % 2 else 'lo'},{i * 2},{day},{day}")
    (d / f"{name}.csv").write_text("\n".join(lines) + "\n")
    report = [",start_date,end_date,fact,preds",
              '0,2020-01-01,2020-01-10,"fact A","pred A;more"',
              '1,2020-01-05,2020-01-10,NA,"NA;NA"',  # nothing left: skipped
              '2,2020-01-08,2020-01-20,"fact B",NA']
    search = [",start_date,end_date,fact,preds",
              '0,2020-01-09,2020-01-10,"fact C","NA;pred C"',  # same end date as A, later in order
              '1,2020-01-21,2020-01-21,,"pred D"']
    (d / f"{name}_report.csv").write_text("\n".join(report) + "\n")
    (d / f"{name}_search.csv").write_text("\n".join(search) + "\n")
    return d


def test_toy_domain_texts_and_columns(tmp_path):
    table, texts = load_timemmd(write_domain(tmp_path))
    assert table.columns == ["value", "OT"] and table.dropped_columns == ["label"]
    assert [r.text for r in texts] == ["fact A pred A;more", "fact C pred C", "fact B", "pred D"]
    assert [r.source for r in texts] == ["report", "search", "report", "search"]
    assert texts.end_dates.tolist() == sorted(texts.end_dates.tolist())
    # the numerical csv path works as well as the folder
    table2, texts2 = load_timemmd(tmp_path / "Toy" / "Toy.csv")
    assert np.array_equal(table2.values, table.values) and texts2.texts == texts.texts


def test_na_placeholder_texts_are_missing(tmp_path):
    """Parts that are "NA" followed by whitespace or "(" (LLM placeholders for "no information") are
    missing like a bare NA; words that merely start with NA ("NAFTA", "NASA's") are kept."""
    d = write_domain(tmp_path)
    (d / "Toy_report.csv").write_text(
        ",start_date,end_date,fact,preds\n"
        '0,2020-01-01,2020-01-10,"NA (No relevant information found)","NA \n\nPlease provide a valid excerpt."\n'
        '1,2020-01-02,2020-01-11,"NA\n\nNote: nothing relevant.","real pred"\n'
        '2,2020-01-03,2020-01-12,"NAFTA trade rose.","NA(no data);pred two"\n'
        '3,2020-01-04,2020-01-13,"NASA\'s satellite.","na"\n')
    (d / "Toy_search.csv").write_text(",start_date,end_date,fact,preds\n"
                                      '0,2020-01-05,2020-01-14," NA  ","NA (no predictions)"\n')
    _, texts = load_timemmd(d)
    assert [r.text for r in texts] == ["real pred", "NAFTA trade rose. pred two", "NASA's satellite."]


def test_real_domains_keep_no_na_placeholder_texts():
    for name in ("Health_US", "Energy", "Environment"):
        _, texts = load_timemmd(_domain(name))
        assert len(texts) > 0 and not [r.text for r in texts if re.match(r"\s*NA[\s(]", r.text)]


def set_cell(domain: Path, data_row: int, column: str, value: str) -> None:
    """Overwrite one cell of the domain's numerical csv (``data_row`` 0-based, i.e. file line + 2)."""
    csv_path = domain / f"{domain.name}.csv"
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[data_row + 1].split(",")
    cells[header.index(column)] = value
    lines[data_row + 1] = ",".join(cells)
    csv_path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("bad, problem", [("NaN", "NaN/inf value 'NaN'"), ("", "empty value"),
                                          ("n/a", "non-numeric value 'n/a'")])
def test_bad_cell_in_target_raises_not_dropped(tmp_path, bad, problem):
    d = write_domain(tmp_path)
    set_cell(d, 9, "OT", bad)  # line 11, 2020-01-10
    msg = re.escape(f"{d / 'Toy.csv'}: {problem} in row 11 (date 2020-01-10), column 'OT'")
    with pytest.raises(ValueError, match=msg):
        load_timemmd(d)
    for features in ("M", "S"):  # the dataset path the CLI takes: the same error, never "not found"
        with pytest.raises(ValueError, match=msg):
            TimeMMDDataset(d, "train", lookback=6, horizon=2, features=features)


def test_bad_cell_in_other_column_dropped_with_warning(tmp_path, caplog):
    d = write_domain(tmp_path)
    set_cell(d, 3, "value", "x")  # line 5, 2020-01-04
    with caplog.at_level(logging.WARNING, logger="mmts_fast.data.timemmd"):
        table, _ = load_timemmd(d)
    assert table.columns == ["OT"] and table.dropped_columns == ["label", "value"]
    assert np.array_equal(table.values[:, 0], np.arange(60, dtype=np.float32))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "Toy.csv" in msg
    assert "column 'label': non-numeric value 'lo' in row 2 (date 2020-01-01)" in msg
    assert "column 'value': non-numeric value 'x' in row 5 (date 2020-01-04)" in msg
    assert table.dropped_reasons["value"] == "non-numeric value 'x' in row 5 (date 2020-01-04)"


def test_explicit_target_with_bad_cell_raises(tmp_path):
    d = write_domain(tmp_path)
    table, _ = load_timemmd(d)  # 'label' dropped by design under the default target
    assert "label" in table.dropped_columns
    where = re.escape("non-numeric value 'lo' in row 2 (date 2020-01-01)")
    msg = where + re.escape(", column 'label'")
    with pytest.raises(ValueError, match=msg):
        load_timemmd(d, target="label")
    with pytest.raises(ValueError, match=msg):
        TimeMMDDataset(d, "train", lookback=6, horizon=2, features="S", target="label")
    # a table loaded for another target: the dataset says the column was dropped, not "not found"
    for features in ("M", "S"):
        with pytest.raises(ValueError, match="target column 'label' was dropped when loading: " + where):
            TimeMMDDataset(load_timemmd(d), "train", lookback=6, horizon=2, features=features, target="label")


def test_line_numbers_count_blank_lines(tmp_path):
    d = write_domain(tmp_path)
    csv_path = d / "Toy.csv"
    lines = csv_path.read_text().splitlines()
    lines.insert(3, "")  # a blank line 4: the data row of 2020-01-10 moves to line 12
    csv_path.write_text("\n".join(lines) + "\n")
    assert len(load_timemmd(d)[0]) == 60
    set_cell(d, 10, "OT", "bad")  # file line 12 (the blank line is line 4)
    with pytest.raises(ValueError, match=re.escape("'bad' in row 12 (date 2020-01-10), column 'OT'")):
        load_timemmd(d)


def test_align_equal_dates_at_the_boundary():
    text_end = [datetime(2020, 1, 10), datetime(2020, 1, 10), datetime(2020, 1, 20)]
    windows = [datetime(2020, 1, 9), datetime(2020, 1, 10), datetime(2020, 1, 10, 0, 0, 1),
               datetime(2020, 1, 19, 23, 59, 59), datetime(2020, 1, 20), datetime(2021, 1, 1)]
    idx = align_texts(windows, text_end)
    assert idx.dtype == torch.long and idx.tolist() == [-1, 1, 1, 1, 2, 2]  # equal date: included, latest
    assert_no_leakage(np.array(windows, dtype="datetime64[s]"), np.array(text_end, dtype="datetime64[s]"), idx)
    assert align_texts(windows, []).tolist() == [-1] * 6
    with pytest.raises(ValueError, match="sorted"):
        align_texts(windows, text_end[::-1])


def test_toy_dataset_leakage_and_batch(tmp_path):
    table, texts = load_timemmd(write_domain(tmp_path))
    for split in ("train", "val", "test"):
        ds = TimeMMDDataset((table, texts), split, lookback=6, horizon=2)
        rows = ds.series.start + 5 + np.arange(len(ds))
        assert np.array_equal(ds.window_end_dates, np.array(table.dates, dtype="datetime64[s]")[rows])
        assert_no_leakage(ds.window_end_dates, texts.end_dates, ds.text_idx)
    ds = TimeMMDDataset((table, texts), "train", lookback=6, horizon=2)
    # window 3 ends on 2020-01-09 (no text yet); window 4 ends on 2020-01-10 (A and C end then: C)
    assert ds.text_idx[3].item() == -1 and ds.text_of(3) is None
    assert ds.text_of(4).text == "fact C pred C"


def test_energy_leakage_every_window():
    table, texts = load_timemmd(_domain("Energy"))
    assert table.columns[-1] == "OT" and table.values.shape == (1622, 9)
    assert {r.source for r in texts} == {"report", "search"} and len(texts) > 2000
    assert all(r.text.strip() for r in texts)
    stats = None
    for split in ("train", "val", "test"):
        ds = TimeMMDDataset((table, texts), split, lookback=36, horizon=12, stats=stats)
        stats = stats or (ds.mean, ds.std)
        assert_no_leakage(ds.window_end_dates, texts.end_dates, ds.text_idx)
        ref = ForecastDataset(table, split, lookback=36, horizon=12, borders="custom", stats=stats)
        assert len(ds) == len(ref)
        x, y, xm, ym, k = ds[len(ds) - 1]
        for a, b in zip((x, y, xm, ym), ref[len(ref) - 1]):
            assert torch.equal(a, b)
        idx = torch.tensor([0, 7, len(ds) - 1])
        bx, by, bxm, bym, bk = ds.batch(idx)
        assert bx.shape == (3, 36, 9) and by.shape == (3, 12, 9) and bk.tolist() == ds.text_idx[idx].tolist()
        assert torch.equal(bx[2], x) and bk[2] == k
        # explicit check on the last window against the dates themselves
        last_date = table.dates[ds.series.start + 35 + len(ds) - 1]
        assert texts[int(k)].end_date <= last_date


def test_health_us_drops_non_numeric_columns():
    path = _domain("Health_US")
    with pytest.raises(ValueError, match="non-numeric"):
        load_csv(path / "Health_US.csv")
    table, texts = load_timemmd(path)
    assert {"REGION TYPE", "REGION", "YEAR_WEEK"} <= set(table.dropped_columns)
    assert not set(table.dropped_columns) & set(table.columns)
    assert {"start_date", "end_date", "date"}.isdisjoint(table.columns)
    assert table.columns[-1] == "OT" and np.isfinite(table.values).all() and len(table) > 1300
    ds = TimeMMDDataset((table, texts), "test", lookback=36, horizon=12)
    assert ds.n_channels == len(table.columns)
    assert_no_leakage(ds.window_end_dates, texts.end_dates, ds.text_idx)
    # 'AGE 25-64' has 'X' cells: dropped as a channel, an error as the target (not "not found")
    assert "AGE 25-64" in table.dropped_columns
    with pytest.raises(ValueError, match=re.escape("'X' in row 629 (date 2009-09-28), column 'AGE 25-64'")):
        load_timemmd(path, target="AGE 25-64")


def test_texts_container_sorts():
    recs = [TextRecord(datetime(2020, 1, 2), datetime(2020, 1, 5), "b", "search"),
            TextRecord(datetime(2020, 1, 1), datetime(2020, 1, 3), "a", "report")]
    t = TimeMMDTexts(recs)
    assert t.texts == ["a", "b"] and len(t) == 2 and t[1].source == "search"


def test_non_iso_dates_header_checks_and_unknown_target(tmp_path, caplog):
    """Time-MMD numerical files read dates as load_csv does (non-ISO formats, mixed timezones), refuse
    duplicate column names, and an unknown target is an error with --features M too."""
    d = write_domain(tmp_path)
    csv_path = d / "Toy.csv"
    lines = csv_path.read_text().splitlines()
    iso = load_timemmd(d)[0].dates
    body = [f"{datetime.fromisoformat(l.split(',')[0]).strftime('%m/%d/%Y')},{l.split(',', 1)[1]}" for l in lines[1:]]
    csv_path.write_text("\n".join([lines[0]] + body) + "\n")
    assert load_timemmd(d)[0].dates == iso
    with pytest.raises(ValueError, match="target column 'nope' not found"):
        TimeMMDDataset(d, "train", lookback=6, horizon=2, features="M", target="nope")
    csv_path.write_text("\n".join([lines[0], lines[1].replace("2020-01-01,", "2020-01-01T00:00+01:00,", 1)]
                                  + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"Toy\.csv: date '2020-01-02' in row 3, column 'date' has no timezone"):
        load_timemmd(d)
    csv_path.write_text("\n".join([lines[0].replace("label", "value")] + lines[1:]) + "\n")
    with pytest.raises(ValueError, match="column name 'value' appears 2 times"):
        load_timemmd(d)
