"""Smoke tests of the benchmark scripts: they run end to end at their smallest and write the JSON they
promise. No timing is asserted (CI machines are too noisy for that)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


# What the benchmarks import from the examples extra (they run examples/sit's SiT and VAE code): in a venv
# with the library alone (make test-torch) these tests skip, naming the package.
EXAMPLES_EXTRA_MODULES = {"einops", "diffusers", "numpy", "PIL", "matplotlib", "tqdm", "torchdiffeq"}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        if error.name not in EXAMPLES_EXTRA_MODULES:
            raise
        pytest.skip(f"benchmarks/{name}.py needs {error.name} (the examples extra: pip install -e '.[examples]')")
    return module


def needs_diffusers() -> None:
    pytest.importorskip("diffusers", reason="the benchmark builds a diffusers VAE (the examples extra)")


def test_train_step_smoke(tmp_path):
    needs_diffusers()
    bench = load("train_step")
    out = tmp_path / "train_step.json"
    bench.main(bench.parse_args([
        "--device", "cpu", "--configs", "tiny", "--batch-size", "2", "--steps", "1", "--repeats", "2",
        "--warmup", "1", "--check-steps", "2", "--no-compile", "--threads", "1", "--out", str(out),
    ]))
    result = json.loads(out.read_text())
    assert {"date", "torch", "device", "threads", "steps", "repeats"} <= result["meta"].keys()
    assert [row["mode"] for row in result["rows"]] == ["reference", "ref-bf16", "fast"]
    for row in result["rows"]:
        assert row["config"] == "tiny" and row["batch"] == 2 and len(row["ms_all"]) == 2
        assert row["ms_median"] > 0 and row["speedup_vs_reference"] > 0 and row["speedup_vs_ref_bf16"] > 0
    reference, ref_bf16, fast = result["rows"]
    assert (reference["precision"], reference["online_vae"]) == ("fp32", True)
    assert (ref_bf16["precision"], ref_bf16["online_vae"]) == ("bf16", False)
    assert (fast["precision"], fast["online_vae"], fast["compile"]) == ("bf16", False, False)
    (check,) = result["checks"]
    assert check["steps"] == 2 and len(check["fast_losses"]) == len(check["fp32_losses"]) == 2
    assert math.isfinite(check["max_rel_diff"]) and check["max_rel_diff"] < 2e-3  # bf16 vs fp32, same draws: ~1e-4


def test_sampling_smoke(tmp_path):
    needs_diffusers()
    bench = load("sampling")
    out = tmp_path / "sampling.json"
    bench.main(bench.parse_args([
        "--device", "cpu", "--configs", "tiny", "--num-steps", "2", "--batch-size", "6", "--repeats", "1",
        "--check-samples", "6", "--threads", "1", "--out", str(out),
    ]))
    result = json.loads(out.read_text())
    assert {"date", "torch", "device", "num_steps", "cfg_scale", "repeats"} <= result["meta"].keys()
    reference, fast = result["rows"]
    assert (reference["mode"], reference["batch"], reference["precision"]) == ("reference", 4, "fp32")
    assert (fast["mode"], fast["batch"], fast["precision"]) == ("fast", 6, "bf16")
    for row in result["rows"]:
        assert row["num_steps"] == 2 and row["img_per_s_median"] > 0 and row["speedup_vs_reference"] > 0
    (check,) = result["checks"]
    assert check["samples"] == 6
    # Same labels, noise and Brownian increments: batch size must not change fp32 samples beyond rounding.
    assert check["fp32_batch4_vs_batchN"]["latent_max_abs"] < 1e-3
    assert check["fp32_batch4_vs_batchN"]["uint8_max_abs"] <= 1
    assert math.isfinite(check["bf16_vs_fp32"]["latent_max_abs"])


def test_overhead_smoke(tmp_path):
    bench = load("overhead")
    out = tmp_path / "overhead.json"
    bench.main(bench.parse_args([
        "--device", "cpu", "--configs", "tiny", "--precisions", "fp32", "--batch-size", "2", "--steps", "1",
        "--repeats", "2", "--warmup", "1", "--threads", "1", "--out", str(out),
    ]))
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["baseline", "anm", "naive", "control"]
    assert rows[0]["overhead_pct"] == 0.0 and all(len(row["ms_all"]) == 2 for row in rows)
    # The library keeps one fp32 norm per token for backward, never a copy of an activation.
    anm_row = rows[1]
    assert 0 < anm_row["saved_extra_mib"] < 0.05 and rows[3]["saved_extra_mib"] == 0
    assert all(row["page_faults_per_step"] is None or row["page_faults_per_step"] >= 0 for row in rows)


def test_overhead_every_mode_records_when_compiled_after_the_baseline():
    # The baseline's hook-free SiT.forward graph is compiled first; Dynamo would reuse it for a hooked SiT
    # compiled directly (it does not guard on submodule hooks), and the naive mode would measure nothing.
    import torch

    torch.compiler.reset()
    bench = load("overhead")
    template = bench.SiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, in_channels=4,
                         num_classes=10, learn_sigma=False)
    built = {mode: bench.build(mode, template, compile_model=True, backend="eager") for mode in bench.MODES}
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,))
    for mode in bench.MODES:  # baseline first, as in the benchmark
        runner, regulariser, _ = built[mode]
        for _ in range(2):
            runner(x, t, y)
            if mode == "naive":
                assert len(regulariser.norms) == 2
            if regulariser is not None:
                assert regulariser.loss().item() > 0


def test_overhead_mode_subset_always_times_the_baseline(tmp_path):
    bench = load("overhead")
    assert bench.parse_args(["--compile"]).compile == "both"
    assert bench.parse_args(["--compile", "on"]).compile == "on"
    out = tmp_path / "overhead.json"
    bench.main(bench.parse_args([
        "--device", "cpu", "--configs", "tiny", "--precisions", "bf16", "--batch-size", "2", "--steps", "1",
        "--repeats", "2", "--warmup", "1", "--threads", "1", "--modes", "anm", "--out", str(out),
    ]))
    rows = json.loads(out.read_text())["rows"]
    assert [(row["mode"], row["precision"]) for row in rows] == [("baseline", "bf16"), ("anm", "bf16")]


def test_gpu_suite_commands_parse():
    # The suite runs only on a GPU, often with minutes of budget: a stale flag must fail here instead.
    import re
    import shlex

    suite = (BENCHMARKS / "gpu_suite.sh").read_text()
    commands = re.findall(r"cmd=\((.*?)\)", suite, flags=re.S)
    assert len(commands) == 6
    for command in commands:
        script, *argv = shlex.split(command.replace("\\\n", " "))
        module = load(Path(script).stem)
        module.parse_args(argv)


@pytest.mark.slow  # runs all six parts at tiny size: ~1.5 min on 2 cores
def test_gpu_suite_runs_end_to_end_on_tiny_configs(tmp_path):
    # The suite itself (argument arrays, time limits, tee/exit codes, $OUT) runs nowhere but on a GPU;
    # here a stand-in interpreter shrinks every command to the tiny CPU config.
    import os
    import subprocess

    shim = tmp_path / "python"
    shim.write_text(f"""#!{sys.executable}
import os, sys
shrink = {{"XL/2": "tiny", "B/4": "tiny", "250": "2", "128": "4", "64": "2", "30": "2", "8": "4", "7": "1",
          "5": "1"}}
argv = [shrink.get(a, a) for a in sys.argv[1:] if a not in ("--compile", "on")]
if argv and argv[0].endswith(("overhead.py", "train_step.py", "sampling.py")):
    argv += ["--threads", "1"] + ([] if argv[0].endswith("sampling.py") else ["--warmup", "1"])
if argv and argv[0].endswith("term_cost.py"):
    argv += ["--threads", "1", "--device", "cpu"]
if argv and argv[0].endswith("example_e2e.py"):
    argv += ["--scale", "cpu", "--device", "cpu", "--nproc", "2", "--stages", "straight", "stop", "resume", "nan"]
os.execv({sys.executable!r}, [{sys.executable!r}, *argv])
""")
    shim.chmod(0o755)
    env = {**os.environ, "PYTHON": str(shim), "OUT": str(tmp_path / "out")}
    parts = ["overhead", "overhead_compile", "train_step", "sampling", "term_cost", "example"]
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), *parts], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for part in parts:
        assert f"=== {part}: exit 0" in run.stdout
        result = json.loads((tmp_path / "out" / f"{part}.json").read_text())
        assert result["rows"] and result["complete"]
    summary = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert all(summary[part]["complete"] and summary[part]["rows"] > 0 for part in parts)
    bogus = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "bogus"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert bogus.returncode == 2 and "unknown part bogus" in bogus.stderr


def test_compare_commits_smoke(tmp_path):
    import subprocess

    root = BENCHMARKS.parent
    if subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("compare_commits.py reads the library out of git history: not a git checkout")
    bench = load("compare_commits")
    out = tmp_path / "compare.json"
    result = bench.main(bench.parse_args(["HEAD", "HEAD", "--steps", "1", "--repeats", "2", "--warmup", "1",
                                          "--loss-calls", "20", "--out", str(out)]))
    assert json.loads(out.read_text())["commits"] == ["HEAD", "HEAD"]
    assert set(result["paired_overhead_pct"]) == {"baseline", "control", "anm@HEAD"}
    assert result["paired_overhead_pct"]["baseline"] == 0 and len(result["cpu_ms"]["anm@HEAD"]) == 2
    assert result["loss_call"]["aten_ops"]["HEAD"] > 0 and result["loss_call"]["cpu_us_median"]["HEAD"] > 0


# -- results that survive a time limit -------------------------------------------------------------------
class Stopped(Exception):
    """What a time limit does to a benchmark, at the worst moment: right after a row was written."""


def stop_after_first_row(monkeypatch):
    report = sys.modules["report"]  # the module the benchmark scripts import (benchmarks/ is on their path)
    real = report.ResultFile.row

    def row(self, key, value):
        real(self, key, value)
        raise Stopped

    monkeypatch.setattr(report.ResultFile, "row", row)


def assert_cut_short_with_one_row(out: Path) -> dict:
    result = json.loads(out.read_text())
    assert result["complete"] is False and "repeat 1/" in result["stage"]
    assert len(result["rows"]) == 1 and result["rows"][0]["repeats_done"] == 1
    assert [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()] == result["rows"]
    return result


def test_overhead_keeps_the_rows_it_measured_when_stopped(tmp_path, monkeypatch):
    bench = load("overhead")
    stop_after_first_row(monkeypatch)
    out = tmp_path / "overhead.json"
    with pytest.raises(Stopped):
        bench.main(bench.parse_args([
            "--device", "cpu", "--configs", "tiny", "--precisions", "fp32", "bf16", "--batch-size", "2",
            "--steps", "1", "--repeats", "3", "--warmup", "1", "--threads", "1", "--modes", "anm", "--out", str(out),
        ]))
    assert assert_cut_short_with_one_row(out)["rows"][0]["mode"] == "baseline"


def test_train_step_keeps_the_rows_it_measured_when_stopped(tmp_path, monkeypatch):
    needs_diffusers()
    bench = load("train_step")
    stop_after_first_row(monkeypatch)
    out = tmp_path / "train_step.json"
    with pytest.raises(Stopped):
        bench.main(bench.parse_args([
            "--device", "cpu", "--configs", "tiny", "--batch-size", "2", "--steps", "1", "--repeats", "2",
            "--warmup", "1", "--check-steps", "2", "--no-compile", "--threads", "1", "--modes", "ref-bf16", "fast",
            "--out", str(out),
        ]))
    assert_cut_short_with_one_row(out)


def test_sampling_keeps_the_rows_it_measured_when_stopped(tmp_path, monkeypatch):
    needs_diffusers()
    bench = load("sampling")
    stop_after_first_row(monkeypatch)
    out = tmp_path / "sampling.json"
    with pytest.raises(Stopped):
        bench.main(bench.parse_args([
            "--device", "cpu", "--configs", "tiny", "--num-steps", "2", "--batch-size", "4", "--repeats", "2",
            "--check-samples", "4", "--threads", "1", "--out", str(out),
        ]))
    assert_cut_short_with_one_row(out)


def test_a_killed_benchmark_leaves_valid_json_of_what_it_measured(tmp_path):
    # SIGKILL, as `timeout -k` sends when SIGTERM is not enough: no handler runs, the files must already
    # hold the rows.
    import signal
    import subprocess
    import time

    load("overhead")  # skips without the examples extra, like the other overhead tests
    out = tmp_path / "overhead.json"
    process = subprocess.Popen([
        sys.executable, str(BENCHMARKS / "overhead.py"), "--device", "cpu", "--configs", "tiny", "--precisions",
        "fp32", "--batch-size", "2", "--steps", "1", "--repeats", "1000", "--warmup", "1", "--threads", "1",
        "--modes", "anm", "--out", str(out),
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            log = out.with_suffix(".jsonl")
            if log.exists() and len(log.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the benchmark ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    result = json.loads(out.read_text())
    assert result["complete"] is False and {row["mode"] for row in result["rows"]} == {"baseline", "anm"}


def test_gpu_suite_collects_what_a_part_stopped_by_its_limit_left(tmp_path):
    # A stand-in interpreter: each benchmark command writes one row the way the scripts do, then hangs
    # until the suite's time limit (GPU_SUITE_LIMIT) stops it.
    import os
    import subprocess

    shim = tmp_path / "python"
    shim.write_text(f"""#!{sys.executable}
import os, sys, time
argv = sys.argv[1:]
if argv and argv[0].endswith("overhead.py"):
    sys.path.insert(0, {str(BENCHMARKS)!r})
    from report import ResultFile
    results = ResultFile(argv[argv.index("--out") + 1], meta={{"argv": argv}})
    results.stage("tiny bf16 compile=False: repeat 1/5")
    results.row(("tiny", "baseline"), {{"mode": "baseline", "ms_median": 1.0}})
    time.sleep(120)
os.execv({sys.executable!r}, [{sys.executable!r}, *argv])
""")
    shim.chmod(0o755)
    env = {**os.environ, "PYTHON": str(shim), "OUT": str(tmp_path / "out"), "GPU_SUITE_LIMIT": "5"}
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "overhead"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 124, run.stdout[-3000:] + run.stderr[-3000:]
    assert "=== overhead: stopped by the 5s limit" in run.stdout
    assert "overhead            1 rows  cut short (stage: tiny bf16 compile=False: repeat 1/5)" in run.stdout
    summary = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert summary["overhead"]["rows"] == 1 and summary["overhead"]["complete"] is False
