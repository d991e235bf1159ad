"""The CLI as a user runs it: train on built-in data, eval with a plot, export checked in ONNX Runtime."""
import json

import pytest

from mmts_fast.cli import build_parser, main

SMALL = ["--lookback", "48", "--horizon", "12", "--epochs", "2", "--batch-size", "32", "--quiet"]


def test_train_eval_export(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "dlinear_mole", "--out", str(out), *SMALL]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["mse"] > 0 and metrics["test"]["mae"] > 0
    assert {"config.json", "model.safetensors", "data.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".*tmp"))                    # no temporary files left behind
    main(["eval", str(out)])
    assert (out / "forecast.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert f"mse {metrics['test']['mse']:.4f}" in text     # eval reproduces the training-time test MSE
    main(["export", str(out), "--out", str(tmp_path / "m.onnx")])
    line = [l for l in capsys.readouterr().out.splitlines() if "max abs error" in l][0]
    assert float(line.split("max abs error ")[1].split()[0]) <= 1e-4


def test_train_on_csv_and_errors(tmp_path):
    csv = tmp_path / "toy.csv"
    rows = ["date,a,OT"] + [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00,{i % 7},{(i * 3) % 11}" for i in range(400)]
    csv.write_text("\n".join(rows) + "\n")
    main(["train", "--data", str(csv), "--out", str(tmp_path / "r"), "--experts", "2", *SMALL])
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["test"]["mse"] > 0
    with pytest.raises(SystemExit, match="lookback\\+horizon needs"):
        main(["train", "--data", str(csv), "--out", str(tmp_path / "r2"), "--lookback", "300", "--horizon", "96"])
    with pytest.raises(SystemExit, match="unknown model"):
        main(["train", "--model", "nope", "--out", str(tmp_path / "r3")])
    with pytest.raises(SystemExit, match="longer than the lookback"):
        main(["train", "--out", str(tmp_path / "r4"), "--experts", "2", "--windows", "48", "60", *SMALL])
    with pytest.raises((SystemExit, FileNotFoundError), match="missing.csv"):
        main(["train", "--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "r5")])


def _toy_csv(tmp_path, n=400):
    csv = tmp_path / "toy.csv"
    rows = ["date,a,OT"] + [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00,{i % 7},{(i * 3) % 11}" for i in range(n)]
    csv.write_text("\n".join(rows) + "\n")
    return csv


def test_out_folder_holding_a_run(tmp_path):
    """A second train into a run folder stops (before loading data) unless --overwrite, which replaces
    the run files and nothing else; a failed run leaves no data.json behind; --out may not be a file."""
    out = tmp_path / "run"
    args = ["--data", str(_toy_csv(tmp_path)), "--experts", "2", *SMALL]
    main(["train", "--out", str(out), *args])
    (out / "forecast.png").write_bytes(b"old plot")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="already holds a run .*config.json.*pass --overwrite"):
        main(["train", "--model", "dlinear_mole", "--out", str(out), *args])
    assert json.loads((out / "config.json").read_text())["model_type"] == "rlinear_mole"    # untouched
    main(["train", "--model", "dlinear_mole", "--out", str(out), "--overwrite", *args])
    assert json.loads((out / "config.json").read_text())["model_type"] == "dlinear_mole"
    assert not (out / "forecast.png").exists() and (out / "notes.txt").read_text() == "mine"

    failed = tmp_path / "failed"
    with pytest.raises(SystemExit, match="fewer than one batch of 5000"):
        main(["train", "--out", str(failed), *args, "--batch-size", "5000"])
    assert not failed.exists()          # checked before the folder is made: nothing left behind
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main(["train", "--out", str(tmp_path / "afile"), *args])
    # both checked before any data is read: a missing data file is not what they report
    missing = ["--data", str(tmp_path / "missing.csv"), *SMALL]
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        main(["train", "--out", str(tmp_path / "afile"), *missing])
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "--out", str(out), *missing])


def test_user_errors_are_one_line(tmp_path):
    """Errors a user can cause end as `error: ...` (SystemExit), never a traceback."""
    import torch
    csv = _toy_csv(tmp_path)
    args = ["--data", str(csv), "--experts", "2", *SMALL]
    with pytest.raises(SystemExit, match="training loss became"):
        main(["train", "--out", str(tmp_path / "nan"), *args, "--lr", "1e30"])
    with pytest.raises(SystemExit, match="unknown device 'gpu'"):
        main(["train", "--out", str(tmp_path / "gpu"), *args, "--device", "gpu"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device is available"):
            main(["train", "--out", str(tmp_path / "cuda"), *args, "--device", "cuda"])
    with pytest.raises(SystemExit, match="no config.json"):
        main(["export", str(tmp_path / "nonexistent")])
    with pytest.raises(SystemExit, match="epochs must be >= 1, got 0"):
        main(["train", "--out", str(tmp_path / "e0"), *args, "--epochs", "0"])
    with pytest.raises(SystemExit, match="--windows must be positive"):
        main(["train", "--out", str(tmp_path / "w0"), *args, "--windows", "48", "0"])
    with pytest.raises(SystemExit, match="2 windows but --experts is 4"):
        main(["train", "--out", str(tmp_path / "w2"), *SMALL, "--windows", "48", "24"])


def test_ignored_options_warn_and_freq(tmp_path, capsys):
    csv = tmp_path / "desc.csv"   # dates in descending order: windows would run backwards in time
    rows = ["date,a,OT"] + [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00,{i % 7},{(i * 3) % 11}"
                            for i in reversed(range(400))]
    csv.write_text("\n".join(rows) + "\n")
    for freq in ([], ["--freq", "h"]):
        with pytest.raises(SystemExit, match="dates must be in increasing order; row 3 .*sort the file by date"):
            main(["train", "--data", str(csv), "--out", str(tmp_path / "r"), *freq, *SMALL])
    capsys.readouterr()
    csv = _toy_csv(tmp_path)      # hourly; --freq overrides the inferred frequency (t: minute features too)
    main(["train", "--data", str(csv), "--freq", "t", "--out", str(tmp_path / "r"), "--experts", "2",
          "--text-encoder", "smollm2", "--top-k", "1", *SMALL])
    err = capsys.readouterr().err
    assert "warning: --text-encoder is ignored by --model rlinear_mole" in err
    assert "warning: --top-k is ignored by --model rlinear_mole" in err
    spec = json.loads((tmp_path / "r" / "data.json").read_text())
    assert spec["freq"] == "t" and spec["n_time_features"] == 5
    main(["train", "--data", str(csv), "--out", str(tmp_path / "r2"), "--model", "dlinear_mole",
          "--experts", "2", "--text-encoder", "minilm", "--segments", "3", "--dropout", "0.3", *SMALL])
    err = capsys.readouterr().err     # given explicitly, even at a text model's default value
    for option in ("--text-encoder", "--segments", "--dropout"):
        assert f"warning: {option} is ignored by --model dlinear_mole" in err


def test_mome_top_k_and_windows_warning(tmp_path, capsys):
    """MoME with fewer experts than its default top_k names --top-k; --top-k sets it; --windows warns."""
    args = ["--data", str(_toy_csv(tmp_path)), "--model", "mome", "--no-text", "--experts", "1",
            "--lookback", "16", "--horizon", "4", "--epochs", "1", "--batch-size", "64", "--quiet"]
    with pytest.raises(SystemExit, match="top_k=2 is larger than n_experts=1 .*--top-k"):
        main(["train", "--out", str(tmp_path / "k2"), *args])
    capsys.readouterr()
    main(["train", "--out", str(tmp_path / "k1"), "--top-k", "1", "--windows", "16", *args])
    assert json.loads((tmp_path / "k1" / "config.json").read_text())["top_k"] == 1
    assert "warning: --windows is ignored by --model mome" in capsys.readouterr().err


def test_eval_export_errors_and_export_data(tmp_path):
    """eval/export of a folder with data.json but no model, and an unavailable --device in eval, end as one
    line; export takes --data (the run's data moved) like eval."""
    import torch
    csv = _toy_csv(tmp_path)
    out = tmp_path / "run"
    main(["train", "--data", str(csv), "--out", str(out), "--experts", "2", *SMALL])
    half = tmp_path / "half"
    half.mkdir()
    (half / "data.json").write_text((out / "data.json").read_text())
    for cmd in ("eval", "export"):
        with pytest.raises(SystemExit, match="error: no config.json in .*half"):
            main([cmd, str(half)])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device is available"):
            main(["eval", str(out), "--device", "cuda"])
    moved = csv.rename(tmp_path / "moved.csv")
    main(["export", str(out), "--data", str(moved), "--out", str(tmp_path / "m.onnx")])
    assert (tmp_path / "m.onnx").exists()


def test_load_in_4bit_with_text_lm_warns(tmp_path, capsys):
    """LLM-TS Net's fine-tuned LM runs dense: --load-in-4bit there says it is ignored (it was silent)."""
    with pytest.raises(SystemExit):
        main(["train", "--model", "llm_ts_net", "--text-lm", str(tmp_path / "no_lm"), "--load-in-4bit",
              "--out", str(tmp_path / "r"), *SMALL])
    assert "warning: --load-in-4bit is ignored with --text-lm" in capsys.readouterr().err


def _old_run(tmp_path, *extra):
    """A run folder with a run in it (and a plot, as eval leaves one); returns (out, train args)."""
    out = tmp_path / "run"
    args = ["--data", str(_toy_csv(tmp_path)), "--experts", "2", *SMALL]
    main(["train", "--out", str(out), *args, *extra])
    (out / "forecast.png").write_bytes(b"old plot")
    return out, args


def test_overwrite_keeps_the_old_run_until_the_new_checkpoint(tmp_path, monkeypatch):
    """--overwrite removes the old run's files only when the new run writes its first checkpoint: a run
    that fails before (a typo in --data, a bad option, a batch larger than the data) leaves them; when
    the new checkpoint is written they are already gone (MoLA: before its stage1/ checkpoint)."""
    from mmts_fast.models import ForecastModel
    out, args = _old_run(tmp_path)
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    for bad in (["--data", str(tmp_path / "typo.csv")], ["--batch-size", "5000"], ["--lr-decay", "-1"],
                ["--model", "mola", "--data", str(tmp_path / "typo.csv")], ["--model", "mola", "--batch-size", "300"]):
        with pytest.raises(SystemExit):
            main(["train", "--out", str(out), "--overwrite", *args, *bad])
        assert {p.name: p.read_bytes() for p in out.iterdir()} == old, bad
    seen = []
    save = ForecastModel.save_pretrained

    def spy(self, directory):
        seen.append(sorted(p.name for p in out.rglob("*") if p.is_file()))
        save(self, directory)
    monkeypatch.setattr(ForecastModel, "save_pretrained", spy)
    main(["train", "--model", "dlinear_mole", "--out", str(out), "--overwrite", *args])
    assert seen[0] == []        # nothing of the old run left when the first new checkpoint is written
    assert json.loads((out / "config.json").read_text())["model_type"] == "dlinear_mole"
    seen.clear()
    main(["train", "--model", "mola", "--out", str(out), "--overwrite", *args])
    assert seen[0] == [] and (out / "stage1" / "config.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "mola"


def test_export_out_is_never_another_file_or_a_folder(tmp_path):
    out, _ = _old_run(tmp_path)
    victim = tmp_path / "toy.csv"
    before = victim.read_bytes()
    with pytest.raises(SystemExit, match=r"--out .*toy\.csv exists and is not an \.onnx file"):
        main(["export", str(out), "--out", str(victim)])
    assert victim.read_bytes() == before
    (tmp_path / "somedir").mkdir()
    with pytest.raises(SystemExit, match=r"--out .*somedir is a folder"):
        main(["export", str(out), "--out", str(tmp_path / "somedir")])
    main(["export", str(out)])              # the default DIR/model.onnx, twice: a previous .onnx is replaced
    main(["export", str(out)])
    assert (out / "model.onnx").exists()


def test_eval_other_data_must_have_the_runs_columns(tmp_path, capsys):
    out, _ = _old_run(tmp_path)
    swapped = tmp_path / "swapped.csv"
    rows = (tmp_path / "toy.csv").read_text().splitlines()
    swapped.write_text("\n".join(["date,b,OT"] + rows[1:]) + "\n")
    with pytest.raises(SystemExit, match=r"columns \['b', 'OT'\] differ from the columns the model was trained "
                                         r"on \['a', 'OT'\]"):
        main(["eval", str(out), "--data", str(swapped)])
    with pytest.raises(SystemExit, match=r"columns \['b', 'OT'\] differ"):
        main(["export", str(out), "--data", str(swapped), "--out", str(tmp_path / "m.onnx")])
    daily = tmp_path / "daily.csv"
    daily.write_text("\n".join(["date,a,OT"] + [f"2020-{1 + i // 28:02d}-{1 + i % 28:02d},{r.split(',', 1)[1]}"
                                                for i, r in enumerate(rows[1:337])]) + "\n")
    capsys.readouterr()
    main(["eval", str(out), "--data", str(daily)])
    assert "look like freq 'd' but the model was trained with freq 'h'" in capsys.readouterr().err
    help_text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "own train split" in " ".join(help_text.split())


def test_export_eval_named_data_and_broken_files_are_errors(tmp_path, monkeypatch):
    """export --data that cannot be loaded, an unreadable data.json, a damaged model.safetensors and a
    failed ONNX Runtime check are one error line each, naming the file."""
    out, _ = _old_run(tmp_path)
    with pytest.raises(SystemExit, match="CSV file not found: .*nonexistent.csv"):
        main(["export", str(out), "--data", str(tmp_path / "nonexistent.csv"), "--out", str(tmp_path / "m.onnx")])
    import mmts_fast.export

    def failing_check(model, path, *a, **k):
        raise AssertionError(f"{path}: ONNX Runtime differs from PyTorch by max abs 1e-07 > atol 1e-12")
    monkeypatch.setattr(mmts_fast.export, "verify_onnx", failing_check)
    with pytest.raises(SystemExit, match=r"the ONNX Runtime check failed: .*the exported file was left at .*m2\.onnx"):
        main(["export", str(out), "--out", str(tmp_path / "m2.onnx"), "--atol", "1e-12"])
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in out.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_text("garbage\n")
    for cmd in ("eval", "export"):
        with pytest.raises(SystemExit, match=r"broken/model\.safetensors is not a readable safetensors file"):
            main([cmd, str(broken)])
    (broken / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (broken / "data.json").write_text("{bad")
    for cmd in ("eval", "export"):
        with pytest.raises(SystemExit, match=r"broken/data\.json is not a readable data\.json"):
            main([cmd, str(broken)])


def test_borders_option_lr_decay_target_and_freq(tmp_path, capsys):
    ett = _toy_csv(tmp_path).rename(tmp_path / "ETTh1_small.csv")
    args = ["--data", str(ett), "--experts", "2", *SMALL]
    with pytest.raises(SystemExit, match="ett_h borders need at least 14400 rows.*pass --borders custom"):
        main(["train", "--out", str(tmp_path / "b"), *args])
    main(["train", "--out", str(tmp_path / "b"), *args, "--borders", "custom", "--freq", "15min"])
    spec = json.loads((tmp_path / "b" / "data.json").read_text())
    assert spec["borders"] == "custom" and spec["freq"] == "t"
    main(["eval", str(tmp_path / "b")])      # eval splits the file as train did
    with pytest.raises(SystemExit, match="lr_decay must be > 0, got -1"):
        main(["train", "--out", str(tmp_path / "d"), *args, "--borders", "custom", "--lr-decay", "-1"])
    with pytest.raises(SystemExit, match="target column 'nope' not found"):
        main(["train", "--out", str(tmp_path / "t"), *args, "--borders", "custom", "--target", "nope"])
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()
    no_ot = tmp_path / "no_ot.csv"      # OT is only the default: a file without it trains, a named OT must exist
    no_ot.write_text(_toy_csv(tmp_path).read_text().replace("date,a,OT", "date,a,b"))
    with pytest.raises(SystemExit, match="target column 'OT' not found in \\['a', 'b'\\]"):
        main(["train", "--out", str(tmp_path / "o"), "--data", str(no_ot), "--target", "OT", "--experts", "2", *SMALL])
    main(["train", "--out", str(tmp_path / "o"), "--data", str(no_ot), "--experts", "2", *SMALL])


def test_eval_plot_path(tmp_path, capsys):
    out, _ = _old_run(tmp_path)
    capsys.readouterr()
    main(["eval", str(out), "--plot", str(tmp_path / "noext")])
    assert f"plot: {tmp_path / 'noext.png'}" in capsys.readouterr().out and (tmp_path / "noext.png").exists()
    (tmp_path / "plots").mkdir()
    main(["eval", str(out), "--plot", str(tmp_path / "plots")])
    assert f"plot: {tmp_path / 'plots' / 'forecast.png'}" in capsys.readouterr().out
    assert (tmp_path / "plots" / "forecast.png").stat().st_size > 10_000


def test_help_texts():
    sub = build_parser()._subparsers._group_actions[0].choices
    train = " ".join(sub["train"].format_help().split())
    for text in ("input window length L (default 336)", "forecast length H (default 96)", "(default 40)",
                 "training batch size (default 8)", "(default 6)", "random seed (default 2021)",
                 "target column, put last (default OT", "stage 1 only", "15min", "--borders"):
        assert text in train, text
    assert "(RLinear/RMLP" not in train
    assert "run directory (default runs/demo)" in " ".join(sub["run"].format_help().split())
    assert "(default 0.0001)" in " ".join(sub["export"].format_help().split())


def test_debug_shows_the_error_underneath_a_one_line_error(tmp_path, monkeypatch, capsys):
    """MMTS_FAST_DEBUG=1 prints the traceback of the exception behind the CLI's own `error: ...` lines
    (here the loader's, for an unknown target), which the CLI raises as SystemExit itself."""
    csv = _toy_csv(tmp_path)
    args = ["train", "--out", str(tmp_path / "t"), "--data", str(csv), "--features", "MS", "--target", "nope", *SMALL]
    with pytest.raises(SystemExit, match="nope"):
        main(args)
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setenv("MMTS_FAST_DEBUG", "1")
    with pytest.raises(SystemExit, match="nope"):
        main(args)
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_config_records_the_encoder_options_that_change_embeddings():
    from mmts_fast.cli import _encoder_record
    assert _encoder_record({"encoder": "minilm", "layers": None, "load_in_4bit": False}) == "minilm"
    assert _encoder_record({"encoder": "smollm2", "layers": 2, "load_in_4bit": True}) == \
        "smollm2 (layers=2, load_in_4bit=True)"
