"""Smoke test of benchmarks/ema_update.py at its smallest: the rows it promises, written as they are measured, and
its check (the multi-tensor update is the loop's bit for bit on the CPU). No timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_ema_update_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("einops", reason="the benchmark builds examples/sit's SiT (the examples extra)")
    spec = importlib.util.spec_from_file_location("bench_ema_update", BENCHMARKS / "ema_update.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    written = []
    real_write = bench.write_json
    monkeypatch.setattr(bench, "write_json", lambda path, result: written.append(len(result["rows"])) or
                        real_write(path, result))
    out = tmp_path / "ema_update.json"
    bench.main(bench.parse_args(["--configs", "tiny", "--devices", "cpu", "--repeats", "2", "--min-block-s", "0",
                                 "--threads", "1", "--out", str(out)]))
    assert written == [3, 6]  # after each size, not once at the end
    result = json.loads(out.read_text())
    assert {"date", "torch", "device", "threads", "repeats", "decay"} <= result["meta"].keys()
    rows = {(row["size"], row["mode"]): row for row in result["rows"]}
    assert sorted(rows) == sorted((size, mode) for size in ("full", "one") for mode in ("loop", "foreach", "lerp"))
    for (size, _), row in rows.items():
        assert row["tensors"] == rows[(size, "loop")]["tensors"] > 50 and len(row["ms_all"]) == 2
        assert row["ms_median"] > 0 and row["speedup_vs_loop"] > 0
    assert rows[("full", "foreach")]["bit_identical_to_loop"] and rows[("full", "foreach")]["max_abs_diff_vs_loop"] == 0
    assert 0 < rows[("full", "lerp")]["max_abs_diff_vs_loop"] < 1e-6  # rounded differently, by float rounding
