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
