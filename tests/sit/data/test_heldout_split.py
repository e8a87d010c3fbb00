"""Held-out sets of --data imagenet / latents: spread over the classes of a class-sorted folder, removed from the
training stream, the same on every rank and in every run, and named for what they are in the log."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import train
from data.datasets import ImageFolderDataset
from data.heldout_split import spread_indices, without
from data.train_data import heldout_item, load_data
from image_folders import write_image_folder
from runtime.cli import UsageError
from runtime.distributed import DistContext

NUM, CLASSES = 40, 5  # class-sorted, as an ImageFolder of ImageNet lists its images


def write_index_latents(root: Path) -> Path:
    """Latents whose every value is the item's index (std 0, factors 1 / 0), labels sorted by class."""
    root.mkdir(parents=True)
    meta = dict(num_images=NUM, image_size=8, chunk_size=16, latent_shape=[4, 2, 2], num_classes=CLASSES,
                scaling_factor=1.0, shift_factor=0.0, dtype="float16")
    (root / "meta.json").write_text(json.dumps(meta))
    np.save(root / "labels.npy", np.arange(NUM, dtype=np.int64) // (NUM // CLASSES))
    for chunk, start in enumerate(range(0, NUM, 16)):
        rows = np.arange(start, min(start + 16, NUM), dtype=np.float16)
        moments = np.zeros((len(rows), 2, 2, 4, 2, 2), np.float16)
        moments[:, :, 0] = rows[:, None, None, None, None]
        np.save(root / f"chunk_{chunk:06d}.npy", moments)
    return root


def args_for(data: Path, *extra: str):
    return train.parse_args(["--data", "latents", "--data-path", str(data), "--model", "SiT-N/2", "--num-workers",
                             "0", "--global-batch-size", "4", "--eval-every", "1", "--eval-samples", "10",
                             "--sample-every", "0", "--max-steps", "2", "--no-console-log", "--no-progress", *extra])


def training_ids(data, epochs: int = 2) -> set[int]:
    seen = set()
    for epoch in range(epochs):
        data.sampler.set_position(epoch, 0)
        for x, *_ in data.loader:
            seen.update(int(v) for v in x[:, 0, 0, 0])
    return seen


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    return write_index_latents(tmp_path_factory.mktemp("heldout") / "latents")


def test_spread_indices_cycle_through_the_classes() -> None:
    labels = np.repeat(np.arange(CLASSES), NUM // CLASSES)
    picked = spread_indices(labels, 10)
    assert len(set(picked)) == 10 and picked == spread_indices(labels, 10)
    assert sorted(np.bincount(labels[picked]).tolist()) == [2] * CLASSES
    assert len(set(labels[picked[:CLASSES]].tolist())) == CLASSES  # one of each class before a second of any
    assert sorted(spread_indices([3, 3, 3], 3)) == [0, 1, 2]  # one class: all of it, in a seeded order
    with pytest.raises(ValueError):
        spread_indices(labels, NUM + 1)


def test_without_keeps_the_rest_in_order_and_forwards_the_generator(latents: Path) -> None:
    from data.datasets import LatentDataset

    full = LatentDataset(str(latents))
    rest = without(full, [0, 5, 39])
    assert len(rest) == NUM - 3 and rest.indices[:5].tolist() == [1, 2, 3, 4, 6]
    z, label = rest.__getitem__(3, generator=torch.Generator().manual_seed(0))
    assert float(z[0, 0, 0]) == 4.0 and label == full.labels[4]


def test_heldout_items_never_reach_training_and_span_the_classes(latents: Path) -> None:
    cpu = torch.device("cpu")
    ranks = [load_data(args_for(latents), DistContext(rank, rank, 2, cpu, False), seed=rank) for rank in (0, 1)]
    held = [data.heldout for data in ranks]
    assert torch.equal(held[0].x, held[1].x) and torch.equal(held[0].y, held[1].y)  # every rank, same set
    held_ids = {int(v) for v in held[0].x[:, 0, 0, 0]}
    assert len(held_ids) == 10
    assert len(set(held[0].y.tolist())) == CLASSES  # not the last class of a class-sorted folder
    trained = training_ids(ranks[0]) | training_ids(ranks[1])
    assert not held_ids & trained
    assert trained | held_ids == set(range(NUM))  # the other 30 items, all of them, are trained on
    again = load_data(args_for(latents), DistContext(0, 0, 1, cpu, False), seed=5)  # a later run, or a resume
    assert torch.equal(again.heldout.x, held[0].x) and len(again.dataset) == NUM - 10


def test_log_and_csv_say_what_the_heldout_set_is(latents: Path, tmp_path: Path) -> None:
    out = train.main(args_for(latents, "--results-dir", str(tmp_path)))
    log = (Path(out["experiment_dir"]) / "log.txt").read_text()
    assert "Held-out set: 10 items of --data-path over 5 classes, excluded from training" in log
    assert "Data: 30 items" in log
    with open(out["log_csv"]) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["heldout_fm_loss"] != "" and rows[0]["step"] == "0"


def test_eval_data_path_is_used_whole_and_not_excluded(latents: Path) -> None:
    data = load_data(args_for(latents, "--eval-data-path", str(latents)),
                     DistContext(0, 0, 1, torch.device("cpu"), False), seed=0)
    assert len(data.dataset) == NUM and "--eval-data-path" in data.heldout_source
    assert len(set(data.heldout.y.tolist())) == CLASSES


def test_no_evaluation_trains_on_everything(latents: Path) -> None:
    data = load_data(args_for(latents, "--eval-every", "0"), DistContext(0, 0, 1, torch.device("cpu"), False), 0)
    assert data.heldout is None and len(data.dataset) == NUM


def test_a_heldout_set_that_leaves_no_batch_is_one_line(latents: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"--eval-samples 38 of the 40 training items leaves 2, fewer than a "
                                         r"global batch of 4: lower --eval-samples, pass --eval-data-path"):
        train.main(args_for(latents, "--eval-samples", "38", "--results-dir", str(tmp_path / "r")))
    assert not (tmp_path / "r").exists()


def test_heldout_images_are_not_flipped_whatever_the_rng(tmp_path: Path) -> None:
    dataset = ImageFolderDataset(write_image_folder(tmp_path / "images"), image_size=8)
    gen = torch.Generator()
    views = []
    for seed in range(4):
        torch.manual_seed(seed)
        views.append(heldout_item(dataset, 1, gen)[0])
    assert all(torch.equal(view, views[0]) for view in views)
