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
    csv = tmp_path / "desc.csv"   # dates in descending order: the frequency cannot be inferred
    rows = ["date,a,OT"] + [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00:00,{i % 7},{(i * 3) % 11}"
                            for i in reversed(range(400))]
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(SystemExit, match="pass freq"):
        main(["train", "--data", str(csv), "--out", str(tmp_path / "r"), *SMALL])
    capsys.readouterr()
    main(["train", "--data", str(csv), "--freq", "h", "--out", str(tmp_path / "r"), "--experts", "2",
          "--text-encoder", "smollm2", "--top-k", "1", *SMALL])
    err = capsys.readouterr().err
    assert "warning: --text-encoder is ignored by --model rlinear_mole" in err
    assert "warning: --top-k is ignored by --model rlinear_mole" in err
    assert json.loads((tmp_path / "r" / "data.json").read_text())["freq"] == "h"
