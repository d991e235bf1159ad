"""The CLI as a user runs it: train on built-in data, eval with a plot, export checked in ONNX Runtime."""
import json

import pytest

from mmts_fast.cli import main

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
    assert not (failed / "data.json").exists()
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
        with pytest.raises(SystemExit, match="dates must be in increasing order; row 1 .*sort the file by date"):
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
