"""The data a training run reads: the data set of --data, the resumable loader of this process's share of
every global batch (see data/streams.py), the VAE where the data needs one with the factors of its latents
(modeling/latent_scaling.py), and the fixed held-out set of the FM-loss evaluation.

Held-out sets: sinusoid draws fresh images from another seed, fashion-mnist uses its test split, imagenet /
latents the data set at --eval-data-path (e.g. the ImageNet validation folder, or its extract_latents.py
output) or else --eval-samples items of the training set spread over its classes (data/heldout_split.py),
which are then removed from the training stream.
"""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from evaluation.heldout import HeldoutSet, make_heldout
from modeling.hub import absolute_if_local
from modeling.latent_scaling import LatentScaling, check_same, from_record, of_vae
from modeling.vae import encode_images, load_vae
from runtime.cli import UsageError
from runtime.distributed import DistContext
from runtime.preemption import ignore_stop_signals
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.datasets import build_dataset
from data.errors import DataError
from data.heldout_split import HELDOUT_SEED, spread_indices, without
from data.image_folder import ImageFolderDataset, to_tensor
from data.latent_images import attach_images
from data.latents import LatentDataset
from data.streams import SeededItems, StreamSampler, cpu_seeded

__all__ = ["data_kwargs", "TrainData", "load_data", "build_heldout", "latent_scaling"]


def data_kwargs(args: argparse.Namespace, path: str | None) -> dict:
    """Keyword arguments of data.build_dataset for --data."""
    if args.data == "sinusoid":
        return dict(num_samples=args.data_size, image_size=args.image_size, seed=args.global_seed)
    if args.data == "fashion-mnist":
        return dict(root=path, split="train", image_size=args.image_size)
    if path is None:
        raise UsageError(f"--data {args.data} needs --data-path")
    if args.data == "imagenet":
        return dict(root=path, image_size=args.image_size)
    return dict(path=path)


@dataclass
class TrainData:
    """The training stream and what the model needs to know about it."""

    dataset: Dataset  # what the stream draws from: without the held-out items when they come from it
    sampler: StreamSampler
    loader: DataLoader
    vae: nn.Module | None  # imagenet: encodes the images every step; latents: decodes the sample grids
    encode: bool  # whether the training images go through the VAE (--data imagenet)
    in_channels: int
    input_size: int
    num_classes: int
    heldout: HeldoutSet | None
    scaling: LatentScaling | None = None  # the factors of the model's latents (None: pixel data)
    heldout_source: str = "none (--eval-every 0)"  # what the held-out set is, for the log
    notes: tuple[str, ...] = ()  # a warning line each in the log: assumptions, what folder scans left out
    image_pixels: int = 0  # the side of the images behind the model's input (latents: meta.json's image_size)


def latent_scaling(args: argparse.Namespace, dataset: Dataset, vae: nn.Module | None
                   ) -> tuple[LatentScaling | None, list[str]]:
    """The factors of the latents the model trains on, and notes on what had to be assumed. imagenet: the
    VAE's config; latents: meta.json's record, checked against --vae when the VAE is loaded."""
    if args.data == "imagenet":
        return of_vae(vae), []
    if args.data != "latents":
        return None, []
    meta = dataset.meta
    scaling, assumed = from_record(meta, dataset.latent_shape[0])
    notes = []
    if assumed:
        notes.append(f"{args.data_path}/meta.json predates the record of the VAE's shift_factor: its latents are "
                     f"taken as {scaling.describe()}")
    if vae is not None:
        hint = (f"add \"shift_factor\": {of_vae(vae).shift_factor} to its meta.json if the latents are this VAE's, "
                "or " if assumed and of_vae(vae).shift_factor is not None else "")
        check_same(scaling, of_vae(vae), f"the latents in {args.data_path} ({meta.get('vae')!r})", f"--vae {args.vae}",
                   f"{hint}pass the --vae that made them (or --sample-every 0 to train without a VAE)")
    return scaling, notes


DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of DiT and SiT


def resolve_vae(args: argparse.Namespace, dataset: Dataset) -> None:
    """Fill in --vae when it was not given: --data latents takes the VAE its meta.json names (so the grids,
    the checkpoint's record and sample.py use the VAE that made the latents), the rest SD's."""
    if args.vae is None and args.data in ("imagenet", "latents"):
        # Made absolute as --vae is (train.parse_args): args.json and checkpoints are read from other folders.
        args.vae = absolute_if_local((dataset.meta.get("vae") if args.data == "latents" else None) or DEFAULT_VAE)


def load_data(args: argparse.Namespace, ctx: DistContext, seed: int) -> TrainData:
    """The data set, the held-out set (removed from the data set when drawn from it) and the resumable loader
    of this rank's share of each global batch."""
    try:
        dataset, channels, size, num_classes = build_dataset(args.data, **data_kwargs(args, args.data_path))
    except DataError as error:
        raise UsageError(str(error)) from error
    resolve_vae(args, dataset)
    image_pixels = dataset.meta["image_size"] if args.data == "latents" else size  # before the held-out split
    vae = None
    if args.data == "imagenet":
        vae = load_vae(args.vae, ctx.device)
    elif args.data == "latents" and (args.sample_every > 0 or args.fid_every > 0):
        try:
            vae = load_vae(args.vae, ctx.device)
        except UsageError as error:
            raise UsageError(f"{error} (the VAE decodes the sample grids and the FID's samples; --sample-every 0 "
                             "trains without it, with --fid-every 0)") from error
    scaling, notes = latent_scaling(args, dataset, vae)
    notes += scan_notes(dataset)  # read here: the held-out split below wraps the data set
    in_channels, input_size = (channels, size)
    if args.data == "imagenet":  # the model sees latents: the VAE's channels, at its downsampling
        in_channels, input_size = vae.config.latent_channels, size // 2 ** (len(vae.config.block_out_channels) - 1)
    encode = args.data == "imagenet"
    heldout, source = None, "none (--eval-every 0)"
    latents = dataset if isinstance(dataset, LatentDataset) else None  # the held-out split may wrap it
    if args.eval_every > 0:
        heldout, excluded, source, heldout_notes = build_heldout(args, dataset, size, ctx.device,
                                                                 vae if encode else None, scaling)
        notes += heldout_notes
        if excluded:
            dataset = without(dataset, excluded)
    if args.repa and latents is not None:  # after the held-out set, which has no use for the images
        try:
            notes += attach_images(latents, args.repa_image_path)
        except DataError as error:
            raise UsageError(str(error)) from error
    local_batch = args.global_batch_size // ctx.world_size
    sampler = StreamSampler(len(dataset), local_batch, ctx.rank, ctx.world_size, seed=args.global_seed)
    loader = DataLoader(
        SeededItems(dataset, (in_channels, input_size, input_size)), batch_size=local_batch, sampler=sampler,
        num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda", drop_last=True,
        # Workers start once per run, not per epoch. Safe: set_position reaches the sampler in this process, and
        # every item draws from its own seed, not from the worker's.
        persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),  # keeps the DataLoader off the global RNG
        worker_init_fn=ignore_stop_signals,  # a job-wide SIGTERM stops the training loop, not its workers
    )
    return TrainData(dataset, sampler, loader, vae, encode, in_channels, input_size, num_classes, heldout, scaling,
                     source, tuple(notes), image_pixels)


def scan_notes(dataset: Dataset) -> list[str]:
    """What the scan of an image folder left out (hidden entries, pipes named like images, ...), as a log note."""
    summary = dataset.scan_summary if isinstance(dataset, ImageFolderDataset) else None
    return [summary] if summary else []


def heldout_item(dataset: Dataset, index: int, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """One held-out item, the same on every rank and in every run: images unflipped, latents drawn from the
    held-out set's own generator."""
    if isinstance(dataset, ImageFolderDataset):
        return to_tensor(dataset.load_array(index)), dataset.labels[index]
    if "generator" in inspect.signature(type(dataset).__getitem__).parameters:
        return dataset.__getitem__(index, generator=generator)[:2]  # no source image (data/latent_images.py)
    with cpu_seeded(HELDOUT_SEED + index):
        return dataset[index][:2]


def _take_heldout(args: argparse.Namespace, train_set: Dataset, image_size: int, scaling: LatentScaling | None
                  ) -> tuple[Dataset, list[int], list[int] | None, str]:
    """(data set, indices into it, the training indices to exclude or None, description)."""
    n = args.eval_samples
    if args.data == "sinusoid":
        dataset = build_dataset("sinusoid", num_samples=n, image_size=image_size,
                                seed=args.global_seed + 1_000_003)[0]
        return dataset, list(range(n)), None, f"{n} fresh sinusoids (seed --global-seed + 1000003)"
    if args.data == "fashion-mnist":
        dataset = build_dataset("fashion-mnist", root=args.data_path, split="test", image_size=image_size)[0]
        n = min(n, len(dataset))
        return dataset, list(range(n)), None, f"the first {n} images of the Fashion-MNIST test split"
    if args.eval_data_path is not None:
        dataset = build_dataset(args.data, **data_kwargs(args, args.eval_data_path))[0]
        if isinstance(dataset, LatentDataset):
            check_same(scaling, from_record(dataset.meta, dataset.latent_shape[0])[0],
                       f"the training latents in {args.data_path}", f"the --eval-data-path latents in "
                       f"{args.eval_data_path}", "extract both with the same --vae")
        n = min(n, len(dataset))
        indices = spread_indices(dataset.labels, n)
        return dataset, indices, None, (f"{n} items of --eval-data-path {args.eval_data_path} over "
                                        f"{len(set(np.asarray(dataset.labels)[indices].tolist()))} classes")
    left = len(train_set) - n
    if left < args.global_batch_size:
        raise UsageError(f"holding out --eval-samples {n} of the {len(train_set)} training items leaves {max(left, 0)}"
                         f", fewer than a global batch of {args.global_batch_size}: lower --eval-samples, pass "
                         "--eval-data-path (e.g. the ImageNet validation folder) or --eval-every 0")
    indices = spread_indices(train_set.labels, n)
    classes = len(set(np.asarray(train_set.labels)[indices].tolist()))
    return train_set, indices, indices, (f"{n} items of --data-path over {classes} classes, excluded from "
                                         "training")


def build_heldout(args: argparse.Namespace, train_set: Dataset, image_size: int, device: torch.device,
                  vae: nn.Module | None, scaling: LatentScaling | None = None
                  ) -> tuple[HeldoutSet, list[int] | None, str, list[str]]:
    """The fixed held-out set of the FM-loss evaluation (see evaluation/heldout.py), the indices of the
    training set it took (to exclude from training; None when it has its own data), what it is and what the
    scan of its own image folder left out (for the log). Images that the model sees as latents are encoded
    with vae (the posterior mean, with scaling)."""
    try:
        dataset, indices, excluded, source = _take_heldout(args, train_set, image_size, scaling)
    except DataError as error:
        raise UsageError(f"held-out set: {error}") from error
    gen = torch.Generator().manual_seed(HELDOUT_SEED)  # fixed: every run sees the same held-out items
    takes_generator = "generator" in inspect.signature(type(dataset).__getitem__).parameters
    if args.data in ("sinusoid", "fashion-mnist"):  # as before: these sets are read exactly as they always were
        items = [dataset.__getitem__(i, generator=gen) if takes_generator else dataset[i] for i in indices]
    else:
        items = [heldout_item(dataset, i, gen) for i in indices]
    x = torch.stack([item[0] for item in items]).to(device)
    y = torch.tensor([int(item[1]) for item in items], device=device)
    if vae is not None:
        x = encode_images(vae, x, scaling, sample=False, chunk=32)
    own_notes = scan_notes(dataset) if dataset is not train_set else []  # the training set's are noted already
    return make_heldout(x, y, seed=HELDOUT_SEED), excluded, source, own_notes
