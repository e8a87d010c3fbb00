"""train.py's --fid-every: FID-N, sFID, precision and recall of the EMA model every K steps (and at the last
step), as sample_ddp.py + evaluate.py would give for that checkpoint (evaluation/sample_metrics.py).

The results are log.csv's columns ``fid``, ``sfid``, ``precision``, ``recall`` and ``fid_seconds`` (the
evaluation's wall time; also to TensorBoard / W&B through the run's MetricLog) and a log.txt line. The
evaluation leaves training exactly as it would be without it: it samples from the EMA (which carries no ANM
hooks) in eval mode, draws every number from its own generators and forks the global RNG around itself, so
weights and training columns are bit-identical with and without --fid-every. A stop signal during it
abandons it after a batch (nothing of it is written); the loop then saves its checkpoint and exits 75 as
after any step, and the resumed run evaluates that step first, since log.csv lacks its FID.

What the flags mean for a resume (runtime/run_flags.py, METRIC): left out, they come from the checkpoint;
the settings that change the numbers (everything but --fid-every, --fid-per-proc-batch-size and the
reference's path) are fixed once a run has them: args.json's ``fid_settings`` records them, the reference by
content, and a resume with others is refused, so log.csv's fid column never mixes two metrics.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

from data.train_data import TrainData
from modeling.generation import describe_cfg_channels, make_sample_fn
from modeling.models import SiT
from modeling.transport import create_transport
from runtime.cli import UsageError
from runtime.distributed import DistContext, broadcast_object
from runtime.fid_flags import check_given_without_cadence, resolve_fid_sampler, store_resolved
from runtime.preemption import StopSignals
from runtime.run_flags import GIVEN_KEY
from runtime.run_log import MetricLog, read_rows
from runtime.sampling_cli import describe_sampler, sampler_kwargs

from evaluation import sample_metrics
from evaluation.reference_batch import ReferenceBatch, reference_warning, sample_count_warning

__all__ = ["TrainingFID", "pixel_size", "fid_steps"]


def pixel_size(data: TrainData) -> int:
    """The side of the run's images: the model's input, times the VAE's downsampling for latent runs."""
    if data.vae is None:
        return data.input_size
    return data.input_size * 2 ** (len(data.vae.config.block_out_channels) - 1)


def fid_steps(log_csv: str) -> set[int]:
    """The steps log.csv holds a FID for."""
    if not os.path.exists(log_csv):
        return set()
    return {int(row["step"]) for row in read_rows(log_csv)[1] if row.get("fid")}


def another_metric(saved: dict[str, Any], now: dict[str, Any] | None, flags: list[str]) -> UsageError:
    """The refusal of a resume whose FID would not be the run's FID."""
    changed = [f"{key} {saved.get(key)!r} (now {now.get(key)!r})" for key in sorted(set(saved) | set(now))
               if saved.get(key) != now.get(key)] if now is not None else [f"--{f.replace('_', '-')}" for f in flags]
    return UsageError(f"this run's FIDs were computed with other settings ({', '.join(changed)}): a resumed run keeps "
                      "its metric, or log.csv's fid column would mix two. Leave the --fid-* flags out (they come from "
                      "the checkpoint) or pass the saved values; for other settings use evaluate_run.py after "
                      "training, or start a new run under another --exp-name")


class TrainingFID:
    """The run's FID evaluation: :meth:`setup` checks the flags and the reference before the run folder exists,
    :meth:`evaluate_if_due` runs in the loop, :meth:`catch_up` after a resume.

    >>> fid = TrainingFID.setup(args, ctx, data, checkpoint, stop, max_steps, warnings)  # doctest: +SKIP
    >>> row.update(fid.evaluate_if_due(step, ema, logger))  # doctest: +SKIP
    """

    def __init__(self, every: int = 0, max_steps: int = 0, metrics: sample_metrics.SampleMetrics | None = None,
                 data: TrainData | None = None, ctx: DistContext | None = None, describe: str = "") -> None:
        self.every, self.max_steps, self.metrics, self.data, self.ctx = every, max_steps, metrics, data, ctx
        self.describe = describe
        self.stopped = False  # a stop signal abandoned an evaluation: the loop stops after this step
        self.seconds = 0.0  # evaluation time since pop_seconds, kept out of the training speed

    @classmethod
    def setup(cls, args: argparse.Namespace, ctx: DistContext, data: TrainData, checkpoint: dict | None,
              stop: StopSignals, max_steps: int, warnings: list[str]) -> TrainingFID:
        """Check the --fid-* flags and the reference (cli.UsageError naming the fix), record the settings in
        args (fid_* and fid_settings), add warnings about unsound sizes; a disabled evaluator for --fid-every 0."""
        saved = ((checkpoint or {}).get("args") or {}).get("fid_settings")
        check_given_without_cadence(args, getattr(args, GIVEN_KEY, []))
        if args.fid_every < 0:
            raise UsageError(f"--fid-every must be >= 0 (0 = never), got {args.fid_every}")
        if args.fid_every == 0:
            args.fid_settings = saved  # kept for a later stretch of the run that evaluates again
            return cls()
        if args.fid_ref is None:
            raise UsageError("--fid-every needs --fid-ref: an ADM reference batch at the run's resolution (e.g. "
                             "VIRTUAL_imagenet256_labeled.npz, or build_reference.py --data-path IMAGES --image-size "
                             f"{pixel_size(data)} --out ref.npz)")
        given = [key for key in getattr(args, GIVEN_KEY, []) if key.startswith("fid_")]
        try:
            resolved = resolve_fid_sampler(args, data.in_channels, args.class_dropout_prob > 0)
        except UsageError as error:
            raise (another_metric(saved, None, given) if saved and given else error) from error
        extractor = sample_metrics.make_extractor(ctx.device, "--fid-every")
        dims = getattr(extractor, "dims", sample_metrics.FEATURE_DIMS)
        reference = ReferenceBatch.open(args.fid_ref, dims, pixel_size(data))
        settings = sample_metrics.metric_settings(
            args.fid_samples, reference, sample_metrics.network_name(extractor), resolved["sampler"],
            resolved["cfg_scale"], resolved["cfg_channels"], resolved["guidance_interval"], args.fid_global_seed,
            args.fid_precision, args.fid_per_proc_batch_size)
        if saved and saved != settings:
            raise another_metric(saved, settings, given)
        if args.fid_samples <= settings["k"]:
            raise UsageError(f"--fid-samples {args.fid_samples}: precision and recall take each sample's "
                             f"{settings['k']}rd nearest neighbour among the samples; use more than {settings['k']}")
        store_resolved(args, resolved)
        args.fid_ref, args.fid_settings = reference.path, settings
        warnings += [w for w in (reference_warning(reference.num_images, f"--fid-ref {reference.path}"),
                                 sample_count_warning(args.fid_samples)) if w]
        try:
            sample_fn = make_sample_fn(create_transport(args.path_type, args.prediction),
                                       **sampler_kwargs(resolved["sampler"]))
        except (ValueError, ImportError) as error:  # an SDE with an infinite score; dopri5 without torchdiffeq
            raise UsageError(f"--fid-* sampler ({describe_sampler(resolved['sampler'])}): {error}") from error
        metrics = sample_metrics.SampleMetrics(reference, extractor, dims, settings, sample_fn, ctx, stop,
                                               args.stop_sync_seconds, args.fid_per_proc_batch_size)
        channels = resolved["cfg_channels"]
        guidance = f", cfg {resolved['cfg_scale']} on {describe_cfg_channels(channels, data.in_channels)}" \
            if channels else ""
        describe = (f"FID-{args.fid_samples:,} of the EMA against {reference.path} ({reference.num_images:,} images; "
                    f"{describe_sampler(resolved['sampler'])}{guidance}, seed {args.fid_global_seed})")
        return cls(args.fid_every, max_steps, metrics, data, ctx, describe)

    def due(self, step: int) -> bool:
        """Whether step is one to evaluate at: a multiple of --fid-every, or the last step."""
        return self.metrics is not None and step > 0 and (step % self.every == 0 or step == self.max_steps)

    def _evaluate(self, step: int, ema: SiT, logger) -> dict[str, float]:
        start = time.time()
        shape = (self.data.in_channels, self.data.input_size, self.data.input_size)
        result = self.metrics.evaluate(ema, self.data.vae, self.data.scaling, shape)
        self.seconds += time.time() - start
        if result is None:
            self.stopped = True
            logger.info(f"(step={step:07d}) FID evaluation abandoned for a stop signal: nothing of it is written")
            return {}
        if result:  # rank 0
            logger.info(f"(step={step:07d}) FID {result['fid']:.4f}, sFID {result['sfid']:.4f}, precision "
                        f"{result['precision']:.4f}, recall {result['recall']:.4f}: {self.describe}, "
                        f"{result['fid_seconds']:.1f} s")
        return result

    def evaluate_if_due(self, step: int, ema: SiT, logger) -> dict[str, float]:
        """log.csv's fid, sfid, precision, recall, fid_seconds at a step that is due (rank 0), else {}."""
        return self._evaluate(step, ema, logger) if self.due(step) else {}

    def catch_up(self, step: int, epoch: int, ema: SiT, metric_log: MetricLog, logger) -> None:
        """After a resume at a step that was due: evaluate it now if log.csv lacks its FID (a stop signal
        abandoned that evaluation, or the run had none then), in a row of its own."""
        if not self.due(step):
            return
        done = step in fid_steps(metric_log.csv.path) if metric_log.csv is not None else None
        if broadcast_object(done):
            return
        logger.info(f"(step={step:07d}) log.csv has no FID of the resumed step: evaluating it before training on")
        row = self._evaluate(step, ema, logger)
        self.seconds = 0.0  # spent before training resumes: no part of a logged interval
        if row:
            metric_log.write(dict(step=step, epoch=epoch, **row))

    def pop_seconds(self) -> float:
        """The evaluations' seconds since the last call (train.py leaves them out of steps_per_sec)."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds
