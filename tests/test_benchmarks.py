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
    # The suite runs only on a lent GPU, with minutes of device time: a stale flag must fail here instead.
    import re
    import shlex

    suite = (BENCHMARKS / "gpu_suite.sh").read_text()
    commands = re.findall(r"cmd=\((.*?)\)", suite, flags=re.S)
    assert len(commands) == 4
    for command in commands:
        script, *argv = shlex.split(command.replace("\\\n", " "))
        module = load(Path(script).stem)
        module.parse_args(argv)


@pytest.mark.slow  # runs all four parts at tiny size: ~1 min on 2 cores
def test_gpu_suite_runs_end_to_end_on_tiny_configs(tmp_path):
    # The suite itself (argument arrays, time limits, tee/exit codes, $OUT) runs nowhere but on a lent GPU;
    # here a stand-in interpreter shrinks every command to the tiny CPU config.
    import os
    import subprocess

    shim = tmp_path / "python"
    shim.write_text(f"""#!{sys.executable}
import os, sys
shrink = {{"XL/2": "tiny", "250": "2", "128": "4", "30": "2", "8": "4", "7": "1", "5": "1"}}
argv = [shrink.get(a, a) for a in sys.argv[1:] if a not in ("--compile", "on")]
if argv and argv[0].endswith(".py"):
    argv += ["--threads", "1"] + ([] if argv[0].endswith("sampling.py") else ["--warmup", "1"])
os.execv({sys.executable!r}, [{sys.executable!r}, *argv])
""")
    shim.chmod(0o755)
    env = {**os.environ, "PYTHON": str(shim), "OUT": str(tmp_path / "out")}
    parts = ["overhead", "overhead_compile", "train_step", "sampling"]
    run = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), *parts], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for part in parts:
        assert f"=== {part}: exit 0" in run.stdout
        assert json.loads((tmp_path / "out" / f"{part}.json").read_text())["rows"]
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
                                          "--out", str(out)]))
    assert json.loads(out.read_text())["commits"] == ["HEAD", "HEAD"]
    assert set(result["paired_overhead_pct"]) == {"baseline", "control", "anm@HEAD"}
    assert result["paired_overhead_pct"]["baseline"] == 0 and len(result["cpu_ms"]["anm@HEAD"]) == 2
