"""Smoke test of benchmarks/term_cost.py at its smallest: the rows it promises, written as they are measured. No
timing is asserted."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_term_cost_smoke(tmp_path: Path) -> None:
    pytest.importorskip("einops", reason="the benchmark builds examples/sit's SiT (the examples extra)")
    pytest.importorskip("transformers", reason="REPA's encoder is a transformers DINOv2")
    spec = importlib.util.spec_from_file_location("bench_term_cost", BENCHMARKS / "term_cost.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "term_cost.json"
    rows = bench.main(bench.parse_args(["--configs", "tiny", "--device", "cpu", "--repeats", "2", "--batch", "2",
                                        "--threads", "1", "--out", str(out)]))
    result = json.loads(out.read_text())
    assert result["complete"] and {"date", "torch", "device", "batch"} <= result["meta"].keys()
    modes = ["step", "anm", "dispersive", "repa", "all", "encoder"]
    assert [row["mode"] for row in result["rows"]] == modes == [row["mode"] for row in rows]
    for row in result["rows"]:
        assert row["ms_median"] > 0 and len(row["ms_all"]) == 2
    assert result["rows"][0]["vs_step"] == 1.0
    assert len(out.with_suffix(".jsonl").read_text().splitlines()) == 6  # each row on disk as it was measured
