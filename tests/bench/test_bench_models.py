"""bench_models.py --quick, in process: every model row is measured and written as a JSON line."""
import importlib.util
import json

from conftest import REPO


def test_bench_models_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("_bench_models", REPO / "bench" / "bench_models.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "models.jsonl"
    rows = bench.main(["--quick", "--device", "cpu", "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert written == json.loads(json.dumps(rows)) and all(r["device"] and r["date"] for r in written)
    steps = [r for r in written if r["bench"] == "train_step"]
    assert {r["model"] for r in steps} == {"rlinear_mole", "lemole", "lemole_static", "lemole_no_text"}
    assert {r["dynamic"] for r in steps if r["model"] == "lemole"} == {"table", "per_window"}
    assert all(r["median_ms"] > 0 for r in steps)
    assert all(r["ratio_vs_rlinear_mole"] == 1.0 for r in steps if r["model"] == "rlinear_mole")
    assert any(r["bench"] == "mome_throughput" for r in written)
    # FLOP counts: LeMoLE's dynamic branch adds work, its windows let an implementation skip some
    flop = {(r["model"], r.get("dynamic")): r for r in steps if r["fused_adam"]}
    assert flop[("rlinear_mole", None)]["flop_ratio_vs_rlinear_mole"] == 1.0
    assert (flop[("lemole", "table")]["flop_ratio_vs_rlinear_mole"] > flop[("lemole_static", None)]["flop_ratio_vs_rlinear_mole"]
            > flop[("lemole_no_text", None)]["flop_ratio_vs_rlinear_mole"] > 1.0)
    for r in steps:
        if r["model"] != "rlinear_mole":
            assert 0 < r["gflop_floor"] < r["gflop"]
            assert r["floor_flop_ratio_vs_rlinear_mole"] < r["flop_ratio_vs_rlinear_mole"]
