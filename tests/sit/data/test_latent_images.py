"""The image behind every latent of --data latents (data/latent_images.py, for REPA): extract_latents.py records
the image files, LatentDataset returns the exact image each latent was encoded from (its crop, its flip), the
training stream carries it through DataLoader workers, and every mismatch between images and latents is
refused in one line before anything is written. Proved by re-encoding the returned images with the VAE."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import extract_latents  # noqa: E402
import train  # noqa: E402
from data.errors import DataError  # noqa: E402
from data.image_folder import ImageFolderDataset, to_tensor  # noqa: E402
from data.latent_images import IMAGE_FILES, attach_images  # noqa: E402
from data.latents import LatentDataset  # noqa: E402
from data.streams import SeededItems  # noqa: E402
from data.train_data import heldout_item, load_data  # noqa: E402
from dinov2s import save_tiny_dinov2  # noqa: E402
from image_folders import write_image_folder  # noqa: E402
from modeling.vae import load_vae  # noqa: E402
from runtime.cli import UsageError  # noqa: E402
from runtime.distributed import DistContext  # noqa: E402
from vaes import save_tiny_vae  # noqa: E402

SIZE, NUM = 16, 12  # 16px crops (8x8 latents with the 2x tiny VAE); 3 classes x 4 images, chunks of 5
CPU = DistContext(0, 0, 1, torch.device("cpu"), False)


def extract_args(images: str, vae: Path, out: Path, **overrides):
    args = extract_latents.parse_args(["--data-path", images, "--vae", str(vae), "--out", str(out), "--image-size",
                                       str(SIZE), "--chunk-size", "5", "--batch-size", "2", "--num-workers", "0",
                                       "--dtype", "float32"])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def train_args(latents: Path, *extra: str):
    return train.parse_args(["--data", "latents", "--data-path", str(latents), "--model", "SiT-N/2", "--num-workers",
                             "0", "--global-batch-size", "4", "--eval-every", "1", "--eval-samples", "4",
                             "--sample-every", "0", "--max-steps", "2", "--no-console-log", "--no-progress", *extra])


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny VAE, an ImageFolder of random (so left-right asymmetric, all distinct) PNGs of several sizes, and
    their latents."""
    root = tmp_path_factory.mktemp("latent-images")
    vae = save_tiny_vae(root / "vae")
    images = write_image_folder(root / "train", sizes=((40, 32), (32, 48), (20, 20), (33, 35)),
                                classes=("ant", "bee", "cat"))
    extract_latents.main(extract_args(images, vae, root / "latents"))
    return dict(root=root, vae=vae, images=images, latents=root / "latents")


@pytest.fixture(scope="module")
def encoder(world: dict):
    return load_vae(str(world["vae"]))


def old_style(latents: Path, to: Path) -> Path:
    """The latents as an extraction before image_files.json and meta.json's image_root were recorded."""
    shutil.copytree(latents, to)
    (to / IMAGE_FILES).unlink()
    meta = json.loads((to / "meta.json").read_text())
    del meta["image_root"]
    (to / "meta.json").write_text(json.dumps(meta))
    return to


def encoded_mean(encoder, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.encode(image[None]).latent_dist.mean[0]


def drawn_flip(seed: int) -> int:
    """The flip LatentDataset draws first from a generator seeded with seed."""
    return int(torch.randint(2, (), generator=torch.Generator().manual_seed(seed)))


def assert_image_of(image: torch.Tensor, latents: LatentDataset, index: int, flip: int, encoder) -> None:
    """image is the one the latents of item index, flip, were encoded from (and not its mirror, nor a neighbour's)."""
    mean = encoded_mean(encoder, image)
    moments = torch.from_numpy(np.array(latents.moments(index)))
    torch.testing.assert_close(mean, moments[flip, 0], atol=1e-5, rtol=0)
    assert (mean - moments[1 - flip, 0]).abs().max() > 1e-3  # the flip matters: these images are asymmetric
    for other in (index - 1, index + 1):
        if 0 <= other < len(latents):
            assert (mean - torch.from_numpy(np.array(latents.moments(other)))[flip, 0]).abs().max() > 1e-3


def test_extraction_records_the_image_files_and_root(world: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    latents, images = world["latents"], world["images"]
    files = json.loads((latents / IMAGE_FILES).read_text())
    assert files == [os.path.relpath(p, images) for p in ImageFolderDataset(images, SIZE).paths]
    assert files[:5] == ["ant/0.png", "ant/1.png", "ant/2.png", "ant/3.png", "bee/0.png"]
    assert json.loads((latents / "meta.json").read_text())["image_root"] == os.path.abspath(images)
    # Written atomically, before meta.json (whose presence marks a complete folder), after labels.npy.
    written = []
    real = extract_latents.atomic_write
    monkeypatch.setattr(extract_latents, "atomic_write", lambda path, *a, **k: written.append(
        os.path.basename(path)) or real(path, *a, **k))
    extract_latents.main(extract_args(images, world["vae"], tmp_path / "out", max_chunks=1))
    assert written[:3] == ["labels.npy", IMAGE_FILES, "meta.json"]
    # A relative --data-path records the same files and an absolute root.
    monkeypatch.chdir(Path(images).parent)
    extract_latents.main(extract_args("train", world["vae"], tmp_path / "rel", max_chunks=1))
    assert json.loads((tmp_path / "rel" / IMAGE_FILES).read_text()) == files
    assert json.loads((tmp_path / "rel" / "meta.json").read_text())["image_root"] == os.path.abspath(images)


def test_each_latent_comes_with_the_image_it_was_encoded_from(world: dict, encoder) -> None:
    plain, with_images = LatentDataset(str(world["latents"])), LatentDataset(str(world["latents"]))
    assert attach_images(with_images, None) == []  # the recorded file list matched: nothing to note
    source = ImageFolderDataset(world["images"], SIZE, random_flip=False)
    flips = set()
    for index in range(NUM):
        for seed in range(3):
            z, y = plain.__getitem__(index, generator=torch.Generator().manual_seed(seed))
            z2, y2, image = with_images.__getitem__(index, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(z, z2) and y == y2 == source.labels[index]  # the draws are untouched
            flip = drawn_flip(seed)
            flips.add(flip)
            expected = to_tensor(source.load_array(index))
            assert torch.equal(image, expected.flip(-1) if flip else expected)
            assert_image_of(image, with_images, index, flip, encoder)
    assert flips == {0, 1}
    assert len(heldout_item(with_images, 0, torch.Generator())) == 2  # the held-out set takes (x, y) only
    x, y, noise, u, image = SeededItems(with_images, (4, 8, 8))[(3, 77)]
    assert image.shape == (3, SIZE, SIZE) and torch.equal(
        torch.stack([x, noise]), torch.stack(SeededItems(plain, (4, 8, 8))[(3, 77)][::2]))


def epoch_items(args) -> tuple[list, list, object, object]:
    """One epoch of load_data's stream: the sampler's (index, seed) keys, the items (x, y, noise, u, *rest) of
    its batches, the training data set and the held-out x. The loader and its persistent workers end when
    this returns, before any assertion: kept alive by a failure's traceback, they can hang pytest's exit."""
    data = load_data(args, CPU, seed=0)
    data.sampler.set_position(1, 0)
    keys = list(data.sampler)
    batches = list(data.loader)
    assert len(batches) == 2 and all(len(batch) == 5 - (not args.repa) for batch in batches)
    return keys, [item for batch in batches for item in zip(*batch, strict=True)], data.dataset, data.heldout.x


@pytest.mark.parametrize("workers", [0, 2])
def test_the_training_stream_carries_the_images_through_workers(world: dict, encoder, workers: int) -> None:
    keys, items, dataset, heldout = epoch_items(train_args(world["latents"], "--repa", "--num-workers",
                                                           str(workers)))
    plain_keys, plain_items, plain, plain_heldout = epoch_items(train_args(world["latents"], "--num-workers",
                                                                           str(workers)))
    assert torch.equal(heldout, plain_heldout) and keys == plain_keys
    assert len(dataset) == NUM - 4 and dataset.excluded  # the held-out split wraps the latents
    latents = dataset.dataset
    assert latents.images is not None and plain.dataset.images is None
    for (index, seed), item, plain_item in zip(keys, items, plain_items, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(item[:4], plain_item, strict=True))  # same x, y, noise, u
        assert_image_of(item[4], latents, int(dataset.indices[index]), drawn_flip(seed), encoder)


@pytest.fixture(scope="module")
def repa_encoder(tmp_path_factory) -> list[str]:
    """REPA's flags with a tiny random DINOv2 (4-pixel patches) saved to a folder."""
    pytest.importorskip("transformers")
    path = save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))
    return ["--repa", "--repa-encoder", path, "--repa-depth", "1", "--repa-projector-dim", "8"]


def test_the_encoder_sees_the_images_of_the_batch_latents(world: dict, tmp_path: Path, repa_encoder: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from regularizers.repa_term import RepaTerm

    args = train_args(world["latents"], *repa_encoder)
    data = load_data(args, CPU, seed=0)
    data.sampler.set_position(0, 0)  # the first epoch, which the 2 training steps take
    expected = [batch[4] for batch in data.loader]
    seen = []
    targets = RepaTerm.targets
    monkeypatch.setattr(RepaTerm, "targets", lambda self, images: seen.append(images.clone()) or targets(self, images))
    out = train.main(train_args(world["latents"], *repa_encoder, "--results-dir", str(tmp_path)))
    assert out["step"] == 2 and len(seen) == len(expected) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))  # (3, 16, 16) crops, not latents
    assert seen[0].shape == (4, 3, SIZE, SIZE)
    log = (Path(out["experiment_dir"]) / "log.txt").read_text()
    assert "matched to its latents by count" not in log and "REPA: dinov2" in log


def test_an_old_extraction_resumes_and_trains_with_the_weaker_check_noted(world: dict, tmp_path: Path,
                                                                            encoder, repa_encoder: list[str]) -> None:
    out = tmp_path / "old"
    extract_latents.main(extract_args(world["images"], world["vae"], out, max_chunks=1))
    (out / IMAGE_FILES).unlink()
    meta = json.loads((out / "meta.json").read_text())
    del meta["image_root"]
    (out / "meta.json").write_text(json.dumps(meta))
    extract_latents.main(extract_args(world["images"], world["vae"], out))  # resumes: the new keys are optional
    assert json.loads((out / "meta.json").read_text()) == meta and not (out / IMAGE_FILES).exists()
    for chunk in range(3):
        np.testing.assert_allclose(np.load(out / f"chunk_{chunk:06d}.npy"),
                                   np.load(world["latents"] / f"chunk_{chunk:06d}.npy"), atol=1e-5, rtol=0)
    with pytest.raises(UsageError, match=r"records no image_root .*: pass --repa-image-path /path/to/train"):
        load_data(train_args(out, "--repa"), CPU, seed=0)
    run = train.main(train_args(out, *repa_encoder, "--repa-image-path", world["images"], "--results-dir",
                                str(tmp_path / "runs")))
    assert run["step"] == 2
    log = (Path(run["experiment_dir"]) / "log.txt").read_text()
    note = f"{out} holds no {IMAGE_FILES} (extracted before it was recorded): the images of {world['images']} " \
           "were matched to its latents by count and per-index labels only"
    assert note in log
    data = load_data(train_args(out, "--repa", "--repa-image-path", world["images"], "--eval-every", "0"), CPU, 0)
    assert sum("count and per-index labels only" in line for line in data.notes) == 1
    z, _, image = data.dataset.__getitem__(7, generator=torch.Generator().manual_seed(1))
    assert_image_of(image, data.dataset, 7, drawn_flip(1), encoder)


def test_a_resume_over_other_images_is_refused(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "latents"
    extract_latents.main(extract_args(world["images"], world["vae"], out, max_chunks=1))
    images = shutil.copytree(world["images"], tmp_path / "renamed")
    os.rename(images / "bee" / "2.png", images / "bee" / "2b.png")  # same count, same order, another name
    with pytest.raises(UsageError, match=r"other images: image 6 was 'bee/2.png', --data-path .* has 'bee/2b.png' "
                                         r"there: use another --out"):
        extract_latents.main(extract_args(str(images), world["vae"], out))
    # A run stopped after labels.npy and image_files.json, before meta.json, is no foreign folder: it restarts.
    start = tmp_path / "started"
    start.mkdir()
    shutil.copy(out / "labels.npy", start)
    shutil.copy(out / IMAGE_FILES, start)
    extract_latents.check_args(extract_args(world["images"], world["vae"], start))


def refusal(latents: Path, *extra: str, results: Path | None = None) -> str:
    """The one-line UsageError of train.py --repa on these latents; nothing is written."""
    args = train_args(latents, "--repa", *extra, *(["--results-dir", str(results)] if results else []))
    with pytest.raises(UsageError) as error:
        train.main(args) if results else load_data(args, CPU, seed=0)
    message = str(error.value)
    assert "\n" not in message, message
    if results is not None:
        assert not results.exists()
    return message


def test_every_mismatch_is_one_line_naming_the_fix(world: dict, tmp_path: Path) -> None:
    latents = world["latents"]
    fix = f"pass --repa-image-path with the image folder the latents in {latents} were extracted from"
    # The image folder missing: given, or the recorded one (moved).
    message = refusal(latents, "--repa-image-path", str(tmp_path / "nowhere"), results=tmp_path / "r")
    assert message == f"--repa-image-path {tmp_path / 'nowhere'} does not exist: {fix}"
    moved = shutil.copytree(latents, tmp_path / "moved")
    meta = json.loads((moved / "meta.json").read_text())
    (moved / "meta.json").write_text(json.dumps(dict(meta, image_root=str(tmp_path / "gone"))))
    assert refusal(moved).endswith("does not exist: pass --repa-image-path with the image folder the latents in "
                                   f"{moved} were extracted from (it moved?)")
    # Its file list differs from image_files.json: the first differing index, both paths, the fix.
    images = shutil.copytree(world["images"], tmp_path / "images")
    os.rename(images / "cat" / "1.png", images / "cat" / "1x.png")
    message = refusal(latents, "--repa-image-path", str(images))
    assert message == (f"--repa-image-path {images} differs from {latents / IMAGE_FILES} at image 9: the latents were "
                       f"encoded from 'cat/1.png', the folder has 'cat/1x.png': {fix}")
    shutil.copy(images / "cat" / "1x.png", images / "cat" / "9.png")  # one image more, at the end
    os.rename(images / "cat" / "1x.png", images / "cat" / "1.png")
    assert "at image 12: the latents were encoded from nothing (its 12 images end before), the folder has " \
           "'cat/9.png'" in refusal(latents, "--repa-image-path", str(images))
    # An old extraction: the count, the class folders and the labels per index.
    old = old_style(latents, tmp_path / "old")
    old_fix = f"pass --repa-image-path with the image folder the latents in {old} were extracted from"
    assert refusal(old, "--repa-image-path", str(images)) == (
        f"--repa-image-path {images} holds 13 images, the latents in {old} 12: {old_fix}")
    (images / "cat" / "9.png").unlink()
    os.rename(images / "bee" / "3.png", images / "ant" / "4.png")  # the same count: ant 5 images, bee 3
    assert refusal(old, "--repa-image-path", str(images)) == (
        f"--repa-image-path {images} gives image 4 ({images / 'ant' / '4.png'}) label 0, the latents in {old} label 1: "
        f"{old_fix}")
    os.rename(images / "ant" / "4.png", images / "bee" / "3.png")
    os.rename(images / "cat", images / "cow")
    assert refusal(old, "--repa-image-path", str(images)) == (
        f"--repa-image-path {images} has other class folders than the latents in {old} (cat, cow): {old_fix}")
    # meta.json's image_size missing: the latents are refused as they load, or at the attach.
    no_size = shutil.copytree(latents, tmp_path / "no-size")
    (no_size / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "image_size"}))
    assert refusal(no_size, results=tmp_path / "r") == (
        f"{no_size / 'meta.json'} lacks image_size: rerun extract_latents.py --out {no_size}")
    dataset = LatentDataset(str(latents))
    del dataset.meta["image_size"]
    with pytest.raises(DataError, match=r"lacks image_size, the crop the latents were encoded at: rerun "
                                        r"extract_latents.py --out "):
        attach_images(dataset, None)
    assert dataset.images is None
    # Neither a path nor a recorded root: the flag to pass.
    assert refusal(old_style(latents, tmp_path / "old2"), results=tmp_path / "r").endswith(
        "records no image_root (extracted before it was recorded): pass --repa-image-path /path/to/train, the "
        "image folder the latents were extracted from")


def test_with_data_imagenet_the_encoder_sees_the_images_before_the_vae(world: dict, tmp_path: Path,
                                                                       repa_encoder: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """--data imagenet has its images in hand: the encoder gets the batch before the VAE encodes it, and the VAE
    encodes the same tensor."""
    from modeling import vae as vae_module
    from regularizers.repa_term import RepaTerm

    seen: dict[str, list[torch.Tensor]] = {"encoder": [], "vae": []}
    targets, encode = RepaTerm.targets, vae_module.encode_images
    monkeypatch.setattr(RepaTerm, "targets", lambda self, images: seen["encoder"].append(images.clone())
                        or targets(self, images))

    def record_encode(vae, x, *args, **kwargs):
        seen["vae"].append(x.clone())
        return encode(vae, x, *args, **kwargs)

    monkeypatch.setattr(train, "encode_images", record_encode)
    args = train.parse_args(["--data", "imagenet", "--data-path", world["images"], "--vae", str(world["vae"]),
                             "--image-size", str(SIZE), "--model", "SiT-N/2", "--num-workers", "0",
                             "--global-batch-size", "4", "--eval-every", "0", "--sample-every", "0", "--max-steps",
                             "2", "--no-console-log", "--no-progress", "--results-dir", str(tmp_path), *repa_encoder])
    out = train.main(args)
    assert out["step"] == 2 and len(seen["encoder"]) == len(seen["vae"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(seen["encoder"], seen["vae"], strict=True))
    assert seen["encoder"][0].shape == (4, 3, SIZE, SIZE)
