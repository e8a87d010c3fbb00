"""The data a training run reads: the data set of --data, the resumable loader of this process's share of
every global batch (see data/streams.py), the VAE where the data needs one, and the fixed held-out set of the
FM-loss evaluation.
"""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

import torch
from evaluation.heldout import HeldoutSet, make_heldout
from modeling.vae import load_vae
from runtime.cli import UsageError
from runtime.distributed import DistContext
from runtime.preemption import ignore_stop_signals
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data.datasets import LATENT_SCALE, DataError, build_dataset
from data.streams import SeededItems, StreamSampler

__all__ = ["data_kwargs", "TrainData", "load_data", "build_heldout"]


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

    dataset: Dataset
    sampler: StreamSampler
    loader: DataLoader
    vae: nn.Module | None  # imagenet: encodes the images every step; latents: decodes the sample grids
    encode: bool  # whether the training images go through the VAE (--data imagenet)
    in_channels: int
    input_size: int
    num_classes: int
    heldout: HeldoutSet | None


def load_data(args: argparse.Namespace, ctx: DistContext, seed: int) -> TrainData:
    """The data set, the resumable loader of this rank's share of each global batch, and the held-out set."""
    try:
        dataset, channels, size, num_classes = build_dataset(args.data, **data_kwargs(args, args.data_path))
    except DataError as error:
        raise UsageError(str(error)) from error
    vae = None
    if args.data == "imagenet":
        vae = load_vae(args.vae, ctx.device)
    elif args.data == "latents" and args.sample_every > 0:
        try:
            vae = load_vae(args.vae, ctx.device)
        except UsageError as error:
            raise UsageError(f"{error} (the VAE decodes the sample grids; --sample-every 0 trains without it)") \
                from error
    in_channels, input_size = (channels, size)
    if args.data == "imagenet":  # the model sees latents: the VAE's channels, at its downsampling
        in_channels, input_size = vae.config.latent_channels, size // 2 ** (len(vae.config.block_out_channels) - 1)
    local_batch = args.global_batch_size // ctx.world_size
    sampler = StreamSampler(len(dataset), local_batch, ctx.rank, ctx.world_size, seed=args.global_seed)
    loader = DataLoader(
        SeededItems(dataset, (in_channels, input_size, input_size)), batch_size=local_batch, sampler=sampler,
        num_workers=args.num_workers, pin_memory=ctx.device.type == "cuda", drop_last=True,
        generator=torch.Generator().manual_seed(seed),  # keeps the DataLoader off the global RNG
        worker_init_fn=ignore_stop_signals,  # a job-wide SIGTERM stops the training loop, not its workers
    )
    encode = args.data == "imagenet"
    heldout = build_heldout(args, dataset, size, ctx.device, vae if encode else None) if args.eval_every > 0 else None
    return TrainData(dataset, sampler, loader, vae, encode, in_channels, input_size, num_classes, heldout)


def build_heldout(args: argparse.Namespace, train_set: Dataset, image_size: int, device: torch.device,
                  vae: nn.Module | None) -> HeldoutSet:
    """The fixed held-out set of the FM-loss evaluation (see evaluation/heldout.py).

    sinusoid: fresh images from another seed; fashion-mnist: the test split; imagenet/latents: the
    dataset at --eval-data-path, else the last --eval-samples items of the training set (then it is
    a fixed monitoring set, not a held-out one)."""
    try:
        if args.data == "sinusoid":
            dataset = build_dataset("sinusoid", num_samples=args.eval_samples, image_size=image_size,
                                    seed=args.global_seed + 1_000_003)[0]
        elif args.data == "fashion-mnist":
            dataset = build_dataset("fashion-mnist", root=args.data_path, split="test", image_size=image_size)[0]
        elif args.eval_data_path is not None:
            dataset = build_dataset(args.data, **data_kwargs(args, args.eval_data_path))[0]
        else:
            dataset = train_set
    except DataError as error:
        raise UsageError(f"held-out set: {error}") from error
    n = min(args.eval_samples, len(dataset))
    start = len(dataset) - n if dataset is train_set else 0
    gen = torch.Generator().manual_seed(12345)  # fixed: every run sees the same held-out items
    takes_generator = "generator" in inspect.signature(type(dataset).__getitem__).parameters
    items = [dataset.__getitem__(i, generator=gen) if takes_generator else dataset[i]
             for i in range(start, start + n)]
    x = torch.stack([item[0] for item in items]).to(device)
    y = torch.tensor([int(item[1]) for item in items], device=device)
    if vae is not None:
        with torch.no_grad():
            x = torch.cat([vae.encode(chunk).latent_dist.mean * LATENT_SCALE for chunk in x.split(32)])
    return make_heldout(x, y, seed=12345)
