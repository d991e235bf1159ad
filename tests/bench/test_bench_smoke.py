"""Smoke test of the K1 benchmark script and its renderer: a tiny shape, in-process, no timing checks."""
import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bench_tiny_and_render(tmp_path, capsys):
    bench, render = _load("bench_expert_heads"), _load("render")
    out = tmp_path / "results" / "eh.jsonl"
    impls = ["k1", "reference", "per_expert_loop"]     # compiled_reference skipped: compile is slow
    args = ["--shapes", "tiny", "--impls", ",".join(impls), "--out", str(out),
            "--device", "cpu", "--dtype", "float32"]
    rows = bench.main(args)

    lines = [json.loads(s) for s in out.read_text().splitlines() if s.strip()]
    assert len(lines) == len(rows) == 2 * len(impls) * 2            # 2 window sets x impls x 2 modes
    for r in lines:
        for k in ("bench", "impl", "backend", "mode", "device", "dtype", "B", "L", "C", "H", "M", "windows",
                  "median_ms", "p20_ms", "p80_ms", "reps", "date", "torch", "triton", "threads"):
            assert k in r, f"missing field {k}: {r}"
        assert r["bench"] == "expert_heads" and "error" not in r, r
        assert (r["B"], r["L"], r["C"], r["H"], r["M"]) == (2, 24, 3, 8, 2)
        assert r["reps"] == 2 and r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["rel_err_vs_k1"] <= 1e-3
    assert {r["impl"] for r in lines} == set(impls)
    assert {r["mode"] for r in lines} == {"fwd", "fwd+bwd"}
    assert {tuple(r["windows"]) for r in lines} == {(24, 24), (24, 12)}
    assert {r["backend"] for r in lines if r["impl"] == "k1"} == {"torch"}   # auto on CPU: eager

    # a second run appends; the renderer keeps only the latest row per key
    bench.main(args + ["--modes", "fwd"])
    assert len(out.read_text().splitlines()) == len(lines) + 2 * len(impls)
    capsys.readouterr()
    md = render.main([str(out)])
    assert md.strip() == capsys.readouterr().out.strip()
    table = [s for s in md.splitlines() if s.startswith("| 8 |")]
    assert len(table) == 4                                          # (2 window sets) x (2 modes), deduplicated
    assert "k1 vs per_expert_loop" in md and "k1 vs reference" in md
    assert "error" not in "\n".join(table)


def test_default_outputs_and_render_refusals(tmp_path):
    """Quick runs never default into the committed bench/results files; render.py says what it cannot render."""
    import pytest
    from conftest import REPO
    lib, render = _load("benchlib"), _load("render")
    assert lib.default_out("expert_heads", "cpu") == REPO / "bench" / "results" / "expert_heads_cpu.jsonl"
    assert lib.default_out("models", "cpu", quick=True) == REPO / "runs" / "bench" / "models_cpu_quick.jsonl"
    rows = tmp_path / "mem.jsonl"
    rows.write_text('{"bench": "lora_amr_memory", "peak_mb": 1.0}\n')
    with pytest.raises(SystemExit, match="renders the kernel benchmarks .*lora_amr_memory"):
        render.main([str(rows)])


def test_summarize_runs(tmp_path):
    import pytest
    summarize = _load("summarize_runs")
    for seed, mse in ((2021, 0.4), (2022, 0.5)):
        d = tmp_path / f"model_H96_s{seed}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "train_config": {"seed": seed}, "test": {"mse": mse, "mae": 0.3}, "val": {"mse": 0.7},
            "train_time_s": 10.0, "best_epoch": 2,
            "history": [{"epoch": 1, "train_mse": 0.9}, {"epoch": 2, "train_mse": 0.6}]}))
    assert "| model_H96 | 2021,2022 | 0.4500 ± 0.0707 |" in summarize.main([str(tmp_path)])
    assert "| model_H96_s2021 | 2 | 0.6000 | 0.7000 | 0.4000 | 0.3000 |" in summarize.main([str(tmp_path), "--per-run"])
    with pytest.raises(SystemExit, match="no such folder"):
        summarize.main([str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="no finished runs"):
        summarize.main([str(tmp_path / "model_H96_s2021")])
