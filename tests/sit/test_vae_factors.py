"""Any diffusers VAE: its scaling / shift factors where latents are made (extract_latents.py, --data imagenet)
and decoded (train.py's grids, sample.py, sample_ddp.py), recorded in meta.json and checkpoints, and a VAE
that disagrees with the latents refused in one line. Tiny random VAEs, 8x8 images, CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import extract_latents  # noqa: E402
import sample  # noqa: E402
import sample_ddp  # noqa: E402
import train  # noqa: E402
from data.datasets import LatentDataset  # noqa: E402
from image_folders import write_image_folder  # noqa: E402
from modeling.latent_scaling import SD_SCALING, LatentScaling  # noqa: E402
from modeling.vae import decode_to_uint8, load_vae  # noqa: E402
from runtime.cli import UsageError  # noqa: E402
from vaes import save_tiny_vae  # noqa: E402

ODD = LatentScaling(0.887, 0.1, 4)
WIDE = LatentScaling(1.5305, 0.0609, 16)  # SD3-like: 16 channels and a shift
QUIET = ["--model", "SiT-N/2", "--num-workers", "0", "--global-batch-size", "4", "--eval-every", "0",
         "--sample-every", "0", "--max-steps", "1", "--no-console-log", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae-world")
    images = write_image_folder(root / "images", sizes=((8, 8), (12, 10), (9, 16), (8, 8)))
    w = dict(root=root, images=Path(images),
             odd=save_tiny_vae(root / "odd", scaling_factor=ODD.scaling_factor, shift_factor=ODD.shift_factor),
             wide=save_tiny_vae(root / "wide", latent_channels=16, scaling_factor=WIDE.scaling_factor,
                                shift_factor=WIDE.shift_factor),
             sd=save_tiny_vae(root / "sd"))
    extract_latents.main(extract_latents.parse_args([
        "--data-path", images, "--vae", str(w["odd"]), "--out", str(root / "latents"), "--image-size", "8",
        "--chunk-size", "4", "--batch-size", "4", "--num-workers", "0"]))
    w["latents"] = root / "latents"
    return w


def train_latents(world, results: Path, *extra: str) -> dict:
    return train.main(train.parse_args(["--data", "latents", "--data-path", str(world["latents"]), *QUIET,
                                        "--results-dir", str(results), *extra]))


def train_images(world, results: Path, vae: str, *extra: str) -> dict:
    return train.main(train.parse_args(["--data", "imagenet", "--data-path", str(world["images"]), "--image-size",
                                        "8", "--vae", str(world[vae]), *QUIET, "--results-dir", str(results),
                                        *extra]))


def test_meta_json_records_the_factors_and_training_latents_decode_right(world) -> None:
    meta = json.loads((world["latents"] / "meta.json").read_text())
    assert (meta["scaling_factor"], meta["shift_factor"]) == (0.887, 0.1)
    dataset = LatentDataset(str(world["latents"]))
    z, _ = dataset.__getitem__(5, generator=torch.Generator().manual_seed(7))
    # The same draw by hand: the raw posterior sample the VAE decodes.
    gen = torch.Generator().manual_seed(7)
    moments = torch.from_numpy(np.array(dataset.moments(5), dtype=np.float32))
    mean, std = moments[int(torch.randint(2, (), generator=gen))]
    raw = mean + std * torch.randn(mean.shape, generator=gen)
    torch.testing.assert_close(z, (raw - 0.1) * 0.887)
    vae = load_vae(str(world["odd"]))
    with torch.no_grad():
        want = ((vae.decode(raw[None]).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    got = decode_to_uint8(z[None], vae, scaling=ODD)
    assert np.abs(got.astype(int) - want.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1


def test_latent_training_records_the_factors_and_decodes_grids_with_them(world, tmp_path, monkeypatch) -> None:
    seen = []
    original = train.decode_to_uint8
    monkeypatch.setattr(train, "decode_to_uint8", lambda x, vae, **kw: seen.append(kw) or original(x, vae, **kw))
    out = train_latents(world, tmp_path / "r", "--vae", str(world["odd"]), "--sample-every", "1", "--sample-grid",
                        "2", "--sample-num-steps", "1")
    assert seen == [dict(scaling=ODD)]
    state = torch.load(out["checkpoint"], weights_only=True)
    assert state["latent_scaling"] == ODD.record()

    grid = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--ckpt", out["checkpoint"], "--vae", str(world["odd"]), "--num-samples", "2",
                                   "--num-steps", "1", "--cfg-scale", "1", "--out", str(grid)]))
    assert grid.exists()
    with pytest.raises(UsageError, match=r"scaling 0.887 vs 0.18215.*pass the VAE the model was trained with"):
        sample.main(sample.parse_args(["--ckpt", out["checkpoint"], "--vae", str(world["sd"]), "--num-samples",
                                       "2", "--num-steps", "1", "--cfg-scale", "1", "--out", str(tmp_path / "x.png")]))
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(UsageError, match="scaling 0.887 vs 0.18215"):
        sample_ddp.main(sample_ddp.parse_args(["--ckpt", out["checkpoint"], "--vae", str(world["sd"]),
                                               "--num-fid-samples", "2", "--num-steps", "2", "--sample-dir",
                                               str(tmp_path / "s")]))
    assert not (tmp_path / "s").exists()


def test_latents_and_another_vae_are_refused_before_the_run_starts(world, tmp_path) -> None:
    with pytest.raises(UsageError, match=r"latents in .*latents.*--vae .*sd disagree \(scaling 0.887 vs 0.18215; "
                                         r"shift 0.1 vs None\)"):
        train_latents(world, tmp_path / "r", "--vae", str(world["sd"]), "--sample-every", "1")
    assert not (tmp_path / "r").exists()


def test_old_meta_json_without_the_shift_says_what_it_assumed(world, tmp_path) -> None:
    import shutil

    old = tmp_path / "old-latents"
    shutil.copytree(world["latents"], old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["shift_factor"]
    (old / "meta.json").write_text(json.dumps(meta))
    argv = ["--data", "latents", "--data-path", str(old), *QUIET, "--results-dir", str(tmp_path / "r")]
    with pytest.raises(UsageError, match=r'add "shift_factor": 0.1 to its meta.json'):
        train.main(train.parse_args([*argv, "--vae", str(world["odd"]), "--sample-every", "1"]))
    out = train.main(train.parse_args(argv))  # no VAE to check against: trains, and says what it assumed
    log = (Path(out["experiment_dir"]) / "log.txt").read_text()
    assert "predates the record of the VAE's shift_factor" in log and "scaling 0.887, no shift" in log


def test_imagenet_training_encodes_with_the_vae_factors_and_refuses_another_on_resume(world, tmp_path,
                                                                                      monkeypatch) -> None:
    seen = []
    original = train.encode_images
    monkeypatch.setattr(train, "encode_images", lambda *a, **kw: seen.append(a[2]) or original(*a, **kw))
    out = train_images(world, tmp_path / "r", "odd", "--exp-name", "run", "--max-steps", "2")
    assert seen == [ODD, ODD]
    assert torch.load(out["checkpoint"], weights_only=True)["latent_scaling"] == ODD.record()
    before = {p: p.read_bytes() for p in sorted((tmp_path / "r").rglob("*")) if p.is_file()}
    with pytest.raises(UsageError, match=r"checkpoint .*0000002.pt and this run's data disagree \(scaling 0.887 vs "
                                         r"0.18215; shift 0.1 vs None\)"):
        train_images(world, tmp_path / "r", "sd", "--exp-name", "run", "--max-steps", "4", "--resume", "auto")
    assert {p: p.read_bytes() for p in sorted((tmp_path / "r").rglob("*")) if p.is_file()} == before


def test_sixteen_channel_vae_trains_and_samples(world, tmp_path) -> None:
    out = train_images(world, tmp_path / "r", "wide")
    assert out["model_config"]["in_channels"] == 16
    assert torch.load(out["checkpoint"], weights_only=True)["latent_scaling"] == WIDE.record()
    grid = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--ckpt", out["checkpoint"], "--num-samples", "1", "--num-steps", "1",
                                   "--cfg-scale", "1", "--out", str(grid)]))  # the checkpoint's own --vae
    from PIL import Image

    assert Image.open(grid).size == (8 + 4, 8 + 4)
    with pytest.raises(UsageError, match="16 vs 4 latent channels"):
        sample.main(sample.parse_args(["--ckpt", out["checkpoint"], "--vae", str(world["odd"]), "--num-samples", "1",
                                       "--num-steps", "1", "--cfg-scale", "1", "--out", str(tmp_path / "x.png")]))


def test_checkpoints_from_before_the_record_decode_as_they_were_trained(world, tmp_path, capsys,
                                                                       monkeypatch) -> None:
    seen = []
    original = sample.decode_to_uint8

    def spy(x, vae, **kwargs):
        seen.append(kwargs["scaling"])
        return original(x, vae, **kwargs)

    monkeypatch.setattr(sample, "decode_to_uint8", spy)
    old = {}
    for data, out in (("imagenet", train_images(world, tmp_path / "r1", "sd")),
                      ("latents", train_latents(world, tmp_path / "r2"))):
        state = torch.load(out["checkpoint"], weights_only=True)
        del state["latent_scaling"]
        torch.save(state, tmp_path / f"{data}.pt")
        old[data] = ["--ckpt", str(tmp_path / f"{data}.pt"), "--num-samples", "1", "--num-steps", "1", "--cfg-scale",
                     "1", "--out", str(tmp_path / f"{data}.png"), "--overwrite"]
    sample.main(sample.parse_args(old["imagenet"]))
    note = "predates the record of its VAE's factors: decoding with scaling 0.18215, no shift"
    assert note in capsys.readouterr().err
    sample.main(sample.parse_args([*old["imagenet"], "--vae", str(world["odd"])]))  # encoded by x 0.18215 then
    sample.main(sample.parse_args(old["latents"]))  # meta.json's scaling_factor, never shifted then
    assert seen == [SD_SCALING, SD_SCALING, LatentScaling(0.887, None, 4)]
    with pytest.raises(UsageError, match=r"saved before checkpoints recorded the VAE's factors\) and --vae .*wide "
                                         r"disagree \(4 vs 16 latent channels\)"):
        sample.main(sample.parse_args([*old["imagenet"], "--vae", str(world["wide"])]))


def test_official_checkpoints_want_an_sd_vae(world, tmp_path) -> None:
    from modeling.models import SiT_models

    model = SiT_models["SiT-S/8"](input_size=8, num_classes=2, learn_sigma=False)
    torch.save(model.state_dict(), tmp_path / "official.pt")
    common = ["--ckpt", str(tmp_path / "official.pt"), "--model", "SiT-S/8", "--image-size", "64", "--num-classes",
              "2", "--num-samples", "1", "--num-steps", "1", "--cfg-scale", "1"]
    with pytest.raises(UsageError, match=r"trained on SD-VAE latents\) and --vae .*odd disagree"):
        sample.main(sample.parse_args([*common, "--vae", str(world["odd"]), "--out", str(tmp_path / "x.png")]))
    assert SD_SCALING.scaling_factor == 0.18215


def test_imagenet_heldout_is_encoded_with_the_factors_and_left_out_of_training(world, tmp_path) -> None:
    from data.datasets import ImageFolderDataset, to_tensor
    from data.heldout_split import spread_indices
    from data.train_data import load_data
    from runtime.distributed import DistContext

    args = train.parse_args(["--data", "imagenet", "--data-path", str(world["images"]), "--image-size", "8", "--vae",
                             str(world["odd"]), *QUIET, "--eval-every", "1", "--eval-samples", "2",
                             "--results-dir", str(tmp_path)])
    data = load_data(args, DistContext(0, 0, 1, torch.device("cpu"), False), seed=0)
    assert len(data.dataset) == 6 and sorted(set(data.heldout.y.tolist())) == [0, 1]
    images = ImageFolderDataset(str(world["images"]), image_size=8)
    picked = spread_indices(images.labels, 2)
    assert data.dataset.excluded == sorted(picked)
    vae = load_vae(str(world["odd"]))
    x = torch.stack([to_tensor(images.load_array(i)) for i in picked])  # unflipped, in the order of selection
    with torch.no_grad():
        torch.testing.assert_close(data.heldout.x, (vae.encode(x).latent_dist.mean - 0.1) * 0.887)
    out = train.main(args)
    log = (Path(out["experiment_dir"]) / "log.txt").read_text()
    assert "Held-out set: 2 items of --data-path over 2 classes, excluded from training; latents: scaling 0.887" in log


def test_latent_training_defaults_to_the_vae_of_meta_json(world, tmp_path) -> None:
    out = train_latents(world, tmp_path / "r", "--sample-every", "1", "--sample-grid", "1", "--sample-num-steps", "1")
    assert torch.load(out["checkpoint"], weights_only=True)["vae"] == str(world["odd"])  # not SD's hub id
    sample.main(sample.parse_args(["--ckpt", out["checkpoint"], "--num-samples", "1", "--num-steps", "1",
                                   "--cfg-scale", "1", "--out", str(tmp_path / "grid.png")]))
    assert (tmp_path / "grid.png").exists()


def test_resuming_an_imagenet_run_from_before_the_record_with_its_own_non_sd_vae_names_the_only_fix(world,
                                                                                                      tmp_path) -> None:
    """train.py used to scale --data imagenet latents by 0.18215 whatever the VAE: such a run, resumed with the
    very VAE it was trained with (here one declaring 0.887), cannot be continued, and the refusal must not send
    the user back to that VAE."""
    out = train_images(world, tmp_path / "r", "odd")
    state = torch.load(out["checkpoint"], weights_only=True)
    del state["latent_scaling"]
    torch.save(state, out["checkpoint"])
    with pytest.raises(UsageError) as refused:
        train_images(world, tmp_path / "r", "odd", "--resume", out["checkpoint"], "--max-steps", "2")
    message = str(refused.value)
    assert "from before the record: scaling 0.18215" in message and "scaling 0.18215 vs 0.887" in message
    assert "was trained with scaling 0.18215" in message and "start a new --exp-name" in message
    assert "resume with the --vae" not in message
