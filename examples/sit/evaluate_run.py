"""
Metrics after training: FID-N, sFID, precision and recall of a train.py run's milestone checkpoints (their EMA),
computed exactly as train.py --fid-every computes them during training (evaluation/sample_metrics.py: the
numbers evaluate.py gives for sample_ddp.py's .npz of the same settings), for a run trained without them.

    torchrun --nproc_per_node 8 examples/sit/evaluate_run.py results/SiT-B-4-latents-anm \\
        --fid-ref VIRTUAL_imagenet256_labeled.npz --fid-samples 10000
    python examples/sit/evaluate_run.py results/run --fid-ref ref.npz --fid-samples 1000 --steps 2000 4000

The --fid-* flags are train.py's, with sample_ddp.py's defaults. Each checkpoint's samples are sharded over
the torchrun ranks (gloo on CPU). Results stay in the run folder, by settings: <run>/metrics/<digest>/
{settings.json, <step>.json}, and every result of every settings in <run>/eval_log.csv (columns step, fid,
sfid, precision, recall, fid_seconds, settings, checkpoint, fid_<setting>...). A rerun computes only the
checkpoints that have no result under these settings; other settings get a folder of their own.
SIGTERM, SIGUSR1 or SIGINT stop every rank after its current batch with exit status 75; the checkpoint in
progress is dropped and the same command resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any cwd
from evaluation import sample_metrics  # noqa: E402
from evaluation.reference_batch import ReferenceBatch, reference_warning, sample_count_warning  # noqa: E402
from evaluation.run_metrics import (  # noqa: E402
    done_steps,
    prepare_folder,
    run_checkpoints,
    write_eval_log,
    write_result,
)
from modeling.generation import has_null_class, make_sample_fn  # noqa: E402
from modeling.loading import load_model  # noqa: E402
from modeling.transport import create_transport  # noqa: E402
from runtime.cli import HelpFormatter, UsageError, run  # noqa: E402
from runtime.distributed import DistContext, broadcast_object, cleanup, setup_distributed  # noqa: E402
from runtime.fid_flags import add_fid_args, resolve_fid_sampler  # noqa: E402
from runtime.preemption import (  # noqa: E402
    EXIT_PREEMPTED,
    SYNC_SECONDS,
    StopSignals,
    catches_stop_signals,
    exit_preempted,
)
from runtime.sampling_cli import describe_sampler, load_checked_vae, sampler_kwargs  # noqa: E402


def check_args(args: argparse.Namespace) -> dict[int, str]:
    """Flags that are wrong before anything is loaded; returns the checkpoints to evaluate ({step: path})."""
    if args.fid_ref is None:
        raise UsageError("--fid-ref is required: an ADM reference batch at the run's resolution (e.g. "
                         "VIRTUAL_imagenet256_labeled.npz, or build_reference.py's output)")
    if not 0 < args.stop_sync_seconds < float("inf"):
        raise UsageError(f"--stop-sync-seconds must be > 0 and finite, got {args.stop_sync_seconds}")
    if args.fid_samples <= sample_metrics.K_NEIGHBOURS:
        raise UsageError(f"--fid-samples {args.fid_samples}: precision and recall need more than "
                         f"{sample_metrics.K_NEIGHBOURS} samples")
    return run_checkpoints(args.run, args.steps)


def setup(args: argparse.Namespace, ctx: DistContext, first: str, stop: StopSignals
          ) -> tuple[sample_metrics.SampleMetrics, Any, Any, tuple[int, ...], dict[str, Any]]:
    """(the metrics of these settings, VAE, latent factors, sample shape, settings), from the first checkpoint's
    model (a run's checkpoints share it); cli.UsageError for flags or a reference that do not fit it."""
    model, info = load_model(first, ctx.device)
    vae, scaling = load_checked_vae(argparse.Namespace(vae=args.vae, ckpt=first), info, ctx.device,
                                    announce=ctx.is_main)
    if args.vae is not None and not info["latent"]:
        raise UsageError(f"--vae: {first} is a pixel-space model that uses no VAE; drop the flag")
    config = info["config"]
    pixels = config["input_size"] * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
    resolved = resolve_fid_sampler(args, model.in_channels, has_null_class(model))
    extractor = sample_metrics.make_extractor(ctx.device, "evaluate_run.py")
    dims = getattr(extractor, "dims", sample_metrics.FEATURE_DIMS)
    reference = ReferenceBatch.open(args.fid_ref, dims, pixels)
    settings = sample_metrics.metric_settings(
        args.fid_samples, reference, sample_metrics.network_name(extractor), resolved["sampler"],
        resolved["cfg_scale"], resolved["cfg_channels"], resolved["guidance_interval"], args.fid_global_seed,
        args.fid_precision, args.fid_per_proc_batch_size)
    try:
        sample_fn = make_sample_fn(create_transport(**info["transport"]), **sampler_kwargs(resolved["sampler"]))
    except (ValueError, ImportError) as error:  # an SDE with an infinite score; dopri5 without torchdiffeq
        raise UsageError(f"--fid-* sampler ({describe_sampler(resolved['sampler'])}): {error}") from error
    if ctx.is_main:
        for warning in (reference_warning(reference.num_images, f"--fid-ref {args.fid_ref}"),
                        sample_count_warning(args.fid_samples)):
            if warning:
                print(f"warning: {warning}", file=sys.stderr, flush=True)
    metrics = sample_metrics.SampleMetrics(reference, extractor, dims, settings, sample_fn, ctx, stop,
                                           args.stop_sync_seconds, args.fid_per_proc_batch_size)
    shape = (config["in_channels"], config["input_size"], config["input_size"])
    return metrics, vae, scaling, shape, settings


@catches_stop_signals
def main(args: argparse.Namespace, stop: StopSignals) -> dict[int, dict[str, float]]:
    """Evaluate every chosen checkpoint without a result under these settings; returns {step: result} of all
    chosen steps (rank 0; read back from the run folder for the ones done before)."""
    checkpoints = check_args(args)
    ctx = setup_distributed()
    try:
        metrics, vae, scaling, shape, settings = setup(args, ctx, next(iter(checkpoints.values())), stop)
        verdict: tuple[str, str | None] = ("", None)
        if ctx.is_main:  # rank 0 owns the folder; the others follow its verdict instead of waiting
            try:
                verdict = (prepare_folder(args.run, settings, metrics.reference.path), None)
            except (UsageError, OSError) as error:
                verdict = ("", str(error))
        folder, error = broadcast_object(verdict)
        if error is not None:
            raise UsageError(error)
        todo = [step for step in checkpoints if step not in done_steps(folder)]
        if ctx.is_main:
            print(f"{len(checkpoints) - len(todo)} of {len(checkpoints)} checkpoint(s) already evaluated in {folder}; "
                  f"{len(todo)} to go on {ctx.world_size} process(es)", flush=True)
        for step in todo:
            model, _ = load_model(checkpoints[step], ctx.device)  # its EMA
            result = metrics.evaluate(model, vae, scaling, shape)
            if result is None:
                exit_preempted("evaluate_run.py", f"stopped by {stop.first or 'a signal to another rank'} during step "
                               f"{step}'s evaluation, which is dropped; exit status {EXIT_PREEMPTED}: rerun the same "
                               "command to resume", ctx.is_main)
            if ctx.is_main:
                write_result(folder, step, result, checkpoints[step],
                             dict(settings=os.path.basename(folder), processes=ctx.world_size, device=ctx.device.type))
                write_eval_log(args.run)
                print(f"step {step}: " + ", ".join(f"{key} {result[key]:.4f}" for key in sample_metrics.METRIC_KEYS)
                      + f" ({result['fid_seconds']:.1f} s)", flush=True)
        if ctx.is_main:
            print(f"wrote {write_eval_log(args.run)}", flush=True)
        return read_results(folder, checkpoints) if ctx.is_main else {}
    finally:
        cleanup(ctx)


def read_results(folder: str, checkpoints: dict[int, str]) -> dict[int, dict[str, float]]:
    """{step: its metrics} of the chosen checkpoints, from the settings folder."""
    results = {}
    for step in checkpoints:
        with open(os.path.join(folder, f"{step:07d}.json")) as f:
            record = json.load(f)
        results[step] = {key: record[key] for key in (*sample_metrics.METRIC_KEYS, "fid_seconds")}
    return results


def get_parser() -> argparse.ArgumentParser:
    """The command line of evaluate_run.py."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run", type=str, help="a train.py run folder, <results-dir>/<exp-name>")
    parser.add_argument("--steps", type=int, nargs="+", default=None,
                        help="checkpoints to evaluate, by step (default: every milestone: those of --ckpt-every and "
                             "the last step, not the rolling ones)")
    parser.add_argument("--vae", type=str, default=None,
                        help="latent runs: VAE dir or hub id (default: the one the run was trained with)")
    parser.add_argument("--stop-sync-seconds", type=float, default=SYNC_SECONDS,
                        help="seconds between the ranks' checks for a stop signal (default: %(default)s)")
    add_fid_args(parser, cadence=False)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of evaluate_run.py."""
    return get_parser().parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
