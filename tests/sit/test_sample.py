"""sample.py and sample_ddp.py on tiny checkpoints (CPU)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sample
import sample_ddp
import torch
from modeling.models import SiT
from modeling.vae import decode_to_uint8
from PIL import Image
from ports import free_port
from runtime.images import save_grid
from runtime.png_writer import save_png

SIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "sit"


def test_sample_grid_from_our_checkpoint(ckpt: str, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    sample.main(sample.parse_args(["--ckpt", ckpt, "--num-samples", "6", "--nrow", "3", "--num-steps", "2",
                                   "--out", str(out)]))
    grid = np.array(Image.open(out))
    assert grid.shape == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3)  # 2 rows x 3 columns of 8x8 images, 2px pad
    assert grid[2:10, 2:10].std() > 0  # an image, not the padding colour
    sde = tmp_path / "sde.png"
    sample.main(sample.parse_args(["--ckpt", ckpt, "--num-samples", "4", "--mode", "sde", "--method", "euler",
                                   "--num-steps", "3", "--out", str(sde)]))
    assert Image.open(sde).size == (22, 22)


def test_decode_to_uint8_and_grid_layout(tmp_path: Path) -> None:
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 2, 2)
    images = decode_to_uint8(x)  # grayscale -> RGB, clamped, [-1, 1] -> [0, 255]
    assert images.shape == (1, 2, 2, 3) and images.dtype == np.uint8
    assert images[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    cells = np.stack([np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30)])
    save_grid(cells, str(tmp_path / "g.png"), nrow=2)
    grid = np.array(Image.open(tmp_path / "g.png"))
    assert grid.shape == (14, 14, 3) and grid[2, 2, 0] == 10 and grid[2, 8, 0] == 20 and grid[8, 2, 0] == 30
    assert grid[8, 8, 0] == 255  # the missing 4th cell is padding


def test_latent_checkpoint_decodes_with_local_vae(tmp_path: Path) -> None:
    """Latent models go through the VAE given by --vae (a local diffusers directory, no download)."""
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)
    vae.save_pretrained(tmp_path / "vae")
    config = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                  num_classes=10)
    model = SiT(**config)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "model_config": config,
                "latent": True, "vae": str(tmp_path / "vae"), "step": 0}, tmp_path / "latent.pt")
    out = tmp_path / "latent.png"
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "latent.pt"), "--num-samples", "2",
                                   "--num-steps", "1",
                                   "--cfg-scale", "2.0", "--out", str(out)]))
    assert Image.open(out).size == (2 * (8 + 2) + 2, 8 + 2 + 2)  # 4x4 latents -> 8x8 pixels (2x VAE)


def ddp_args(ckpt: str, sample_dir: Path, *extra: str):
    return sample_ddp.parse_args(["--ckpt", ckpt, "--sample-dir", str(sample_dir), "--folder-name", "s",
                                  "--mode", "ode", "--method", "euler", "--num-steps", "2", *extra])


def test_sample_ddp_batch_size_independent_resumable_npz(ckpt: str, tmp_path: Path) -> None:
    npz_a = sample_ddp.main(ddp_args(ckpt, tmp_path / "a", "--num-fid-samples", "5",
                                     "--per-proc-batch-size", "2"))
    npz_b = sample_ddp.main(ddp_args(ckpt, tmp_path / "b", "--num-fid-samples", "5",
                                     "--per-proc-batch-size", "3"))
    with np.load(npz_a) as a, np.load(npz_b) as b:
        assert list(a.keys()) == ["arr_0"]
        arr_a, arr_b = a["arr_0"], b["arr_0"]
    assert arr_a.shape == (5, 8, 8, 3) and arr_a.dtype == np.uint8
    assert np.array_equal(arr_a, arr_b)  # each sample's noise and label depend only on (seed, index)
    assert len({arr_a[i].tobytes() for i in range(5)}) == 5  # but samples differ from each other
    other = sample_ddp.main(ddp_args(ckpt, tmp_path / "c", "--num-fid-samples", "2", "--global-seed", "1"))
    with np.load(other) as c:
        assert not np.array_equal(c["arr_0"], arr_a[:2])

    # Resume: existing PNGs are kept as they are, missing ones are regenerated identically.
    folder = tmp_path / "a" / "s"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "000001.png")  # marks "already done"
    os.remove(folder / "000003.png")
    os.remove(folder / "000004.png")
    sample_ddp.main(ddp_args(ckpt, tmp_path / "a", "--num-fid-samples", "5", "--per-proc-batch-size", "2"))
    with np.load(npz_a) as a:
        resumed = a["arr_0"]
    assert (resumed[1] == 0).all()  # skipped
    assert np.array_equal(resumed[[0, 2, 3, 4]], arr_b[[0, 2, 3, 4]])
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(5)] + ["manifest.json"]  # no temp files


def test_sde_samples_are_batch_size_independent_too(ckpt: str, tmp_path: Path) -> None:
    def run(folder: str, batch: str) -> np.ndarray:
        args = ddp_args(ckpt, tmp_path / folder, "--num-fid-samples", "5", "--per-proc-batch-size", batch)
        args.mode, args.num_steps, args.cfg_scale = "sde", 4, 2.0  # Brownian noise and CFG's doubled batch
        with np.load(sample_ddp.main(args)) as npz:
            return npz["arr_0"]

    assert np.array_equal(run("a", "2"), run("b", "3"))


def test_bf16_sampling_runs_under_autocast_and_stays_close_to_fp32(ckpt: str, tmp_path: Path, monkeypatch) -> None:
    from modeling import seeded_samples

    seen = []
    original = seeded_samples.generate

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return original(*args, **kwargs)

    monkeypatch.setattr(seeded_samples, "generate", spy)

    def run(folder: str, *extra: str) -> np.ndarray:
        with np.load(sample_ddp.main(ddp_args(ckpt, tmp_path / folder, "--num-fid-samples", "3", *extra))) as npz:
            return npz["arr_0"].astype(int)

    fp32 = run("fp32")
    bf16 = run("bf16", "--precision", "bf16")
    assert seen == [False, True]
    assert np.abs(fp32 - bf16).max() <= 16 and np.abs(fp32 - bf16).mean() < 2


def test_sde_sampler_rejects_a_wrong_number_of_generators() -> None:
    from modeling.samplers import Sampler
    from modeling.transport import create_transport

    fn = Sampler(create_transport()).sample_sde(num_steps=3)
    with pytest.raises(ValueError, match="one per sample"):
        fn(torch.zeros(3, 1), lambda x, t: x, generator=[torch.Generator()] * 2)


def test_sample_seed_depends_on_seed_and_index_only() -> None:
    seeds = {sample_ddp.sample_seed(s, i) for s in range(3) for i in range(100)}
    assert len(seeds) == 300
    y1, z1 = sample_ddp.sample_inputs(range(2, 5), 0, 10, (3, 4, 4))
    y2, z2 = sample_ddp.sample_inputs(range(0, 6), 0, 10, (3, 4, 4))
    assert torch.equal(z1, z2[2:5]) and torch.equal(y1, y2[2:5])


def launch_two_ranks(cli: list[str], stderr: int) -> list[subprocess.Popen]:
    """sample_ddp.py as two gloo ranks on this machine, the way torchrun starts them."""
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(SIT_DIR / "sample_ddp.py"), *cli], env=env,
                                      stdout=subprocess.PIPE, stderr=stderr, text=True))
    return procs


def test_sample_ddp_two_processes_match_one(ckpt: str, tmp_path: Path) -> None:
    one = sample_ddp.main(ddp_args(ckpt, tmp_path / "one", "--num-fid-samples", "5",
                                   "--per-proc-batch-size", "2"))
    cli = ["--ckpt", ckpt, "--sample-dir", str(tmp_path / "two"), "--folder-name", "s", "--mode", "ode",
           "--method", "euler", "--num-steps", "2", "--num-fid-samples", "5", "--per-proc-batch-size", "2"]
    procs = launch_two_ranks(cli, stderr=subprocess.STDOUT)
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outputs)
    with np.load(one) as a, np.load(tmp_path / "two" / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


# ----------------------------------------------------------------------------- stale samples, manifests


def test_resume_refuses_other_settings_and_other_weights_at_the_same_path(ckpt: str, tmp_path: Path) -> None:
    import shutil

    from runtime.cli import UsageError

    path = tmp_path / "ck.pt"
    shutil.copy(ckpt, path)
    first = sample_ddp.main(ddp_args(str(path), tmp_path, "--num-fid-samples", "3"))
    folder = tmp_path / "s"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    for extra, named in ((("--cfg-scale", "2.0"), "cfg_scale 1.0 there, 2.0 now"),
                         (("--precision", "bf16"), "precision 'fp32' there, 'bf16' now"),
                         (("--global-seed", "1"), "global_seed 0 there, 1 now"),
                         (("--no-ema",), "weights 'ema' there, 'raw' now")):
        with pytest.raises(UsageError, match="new --folder-name, or delete") as error:
            sample_ddp.main(ddp_args(str(path), tmp_path, "--num-fid-samples", "3", *extra))
        assert named in str(error.value)
    args = ddp_args(str(path), tmp_path, "--num-fid-samples", "3")
    args.mode = "sde"
    with pytest.raises(UsageError, match="mode 'ode' there, 'sde' now"):
        sample_ddp.main(args)

    # Same path, new weights: the content hash differs, so the old samples are not reused.
    state = torch.load(path, weights_only=False)
    state["ema"] = {k: v + 0.01 for k, v in state["ema"].items()}
    torch.save(state, path)
    with pytest.raises(UsageError, match="checkpoint_sha256"):
        sample_ddp.main(ddp_args(str(path), tmp_path, "--num-fid-samples", "3"))
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before  # nothing touched

    # The default folder name digests every setting: the new weights get their own folder.
    auto = sample_ddp.main(sample_ddp.parse_args(["--ckpt", str(path), "--sample-dir", str(tmp_path), "--mode",
                                                   "ode", "--method", "euler", "--num-steps", "2",
                                                   "--num-fid-samples", "3"]))
    assert os.path.dirname(auto) == str(tmp_path) and auto != first
    with np.load(first) as a, np.load(auto) as b:
        assert not np.array_equal(a["arr_0"], b["arr_0"])


def test_resume_skips_only_real_pngs_and_accepts_a_touched_checkpoint(ckpt: str, tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "ck.pt"
    shutil.copy(ckpt, path)
    with np.load(sample_ddp.main(ddp_args(str(path), tmp_path, "--num-fid-samples", "4"))) as npz:
        straight = npz["arr_0"]
    folder = tmp_path / "s"
    # A full disk or kill -9 mid-write leaves temp files, never the final name: they are not samples.
    os.remove(folder / "000001.png")
    (folder / "000001.png.tmp.png").write_bytes(b"\x89PNG partial")
    (folder / ".000002.png.tmp-999999999").write_bytes(b"\x89PNG partial")  # a dead process's temp
    os.utime(path, None)  # same bytes, new mtime: still the same checkpoint
    with np.load(sample_ddp.main(ddp_args(str(path), tmp_path, "--num-fid-samples", "4"))) as npz:
        assert np.array_equal(npz["arr_0"], straight)
    assert not (folder / ".000002.png.tmp-999999999").exists()  # stale temp cleaned up
    from data.npz import load_image_folder

    assert np.array_equal(load_image_folder(str(folder)), straight)  # evaluate.py ignores the temp too


def test_a_folder_without_manifest_is_refused(ckpt: str, tmp_path: Path) -> None:
    from runtime.cli import UsageError

    (tmp_path / "s").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "s" / "000000.png")  # an older run's sample
    with pytest.raises(UsageError, match="has no manifest.json"):
        sample_ddp.main(ddp_args(ckpt, tmp_path, "--num-fid-samples", "2"))
    assert os.listdir(tmp_path / "s") == ["000000.png"]


def test_stale_samples_refused_from_the_command_line(ckpt: str, tmp_path: Path) -> None:
    sample_ddp.main(ddp_args(ckpt, tmp_path, "--num-fid-samples", "2"))
    before = sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*"))
    cli = ["--ckpt", ckpt, "--sample-dir", str(tmp_path), "--folder-name", "s", "--mode", "ode", "--method",
           "euler", "--num-steps", "3", "--num-fid-samples", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, str(SIT_DIR / "sample_ddp.py"), *cli], capture_output=True, text=True,
                            timeout=300, env=dict(env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("sample_ddp.py: error: ") and "num_steps 2 there, 3 now" in line
    assert "--folder-name" in line
    assert sorted((p.name, p.stat().st_mtime_ns) for p in tmp_path.rglob("*")) == before


def test_png_write_on_a_full_disk_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    import errno

    from runtime.cli import UsageError

    def full_disk(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(UsageError, match="no space left"):
        save_png(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "000000.png"))
    with pytest.raises(UsageError, match="no space left"):
        save_grid(np.zeros((2, 4, 4, 3), np.uint8), str(tmp_path / "grid.png"))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- guidance interval, transport


@pytest.fixture(scope="module")
def label_ckpt(ckpt: str, tmp_path_factory) -> str:
    """The tiny checkpoint with random weights everywhere: its output depends on the label, so CFG shows."""
    state = torch.load(ckpt, weights_only=False)
    gen = torch.Generator().manual_seed(0)
    state["ema"] = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                    for k, v in state["ema"].items()}
    path = tmp_path_factory.mktemp("labels") / "random.pt"
    torch.save(state, path)
    return str(path)


def test_guidance_interval_reaches_the_model(label_ckpt: str, tmp_path: Path, monkeypatch) -> None:
    ckpt = label_ckpt
    seen = []
    original = SiT.forward_with_cfg

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("guidance_interval"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SiT, "forward_with_cfg", spy)
    sample.main(sample.parse_args(["--ckpt", ckpt, "--num-samples", "2", "--num-steps", "2", "--mode", "ode",
                                   "--method", "euler", "--cfg-scale", "3", "--guidance-interval", "0.2", "0.7",
                                   "--out", str(tmp_path / "g.png")]))
    assert seen == [(0.2, 0.7)] * 2
    seen.clear()
    npz = sample_ddp.main(ddp_args(ckpt, tmp_path, "--num-fid-samples", "2", "--cfg-scale", "3",
                                   "--guidance-interval", "0.2", "0.7"))
    assert seen == [(0.2, 0.7)] * 2
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["settings"]["guidance_interval"] == [0.2, 0.7]

    # An interval no step falls in gives the unguided samples (euler ODE, 2 steps: t = 0 and 0.5).
    monkeypatch.setattr(SiT, "forward_with_cfg", original)
    outside = sample_ddp.main(ddp_args(ckpt, tmp_path / "out", "--num-fid-samples", "2", "--cfg-scale", "3",
                                       "--guidance-interval", "0.8", "1"))
    plain = sample_ddp.main(ddp_args(ckpt, tmp_path / "plain", "--num-fid-samples", "2"))
    with np.load(outside) as a, np.load(plain) as b, np.load(npz) as c:
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"]).max() <= 1
        assert not np.array_equal(c["arr_0"], b["arr_0"])


def test_the_transport_comes_from_the_checkpoint(ckpt: str, tmp_path: Path, monkeypatch) -> None:
    state = torch.load(ckpt, weights_only=False)
    state["args"] = dict(state["args"], path_type="GVP", prediction="velocity")
    torch.save(state, tmp_path / "gvp.pt")
    made = []
    original = sample.create_transport
    monkeypatch.setattr(sample, "create_transport", lambda **kw: made.append(kw) or original(**kw))
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "gvp.pt"), "--num-samples", "1", "--num-steps", "1",
                                   "--out", str(tmp_path / "g.png")]))
    assert made == [dict(path_type="GVP", prediction="velocity")]


def test_every_flag_has_help_with_its_default() -> None:
    import build_reference
    import evaluate
    import extract_latents

    shown = " ".join(build_reference.get_parser().format_help().split())  # its HelpFormatter adds the defaults
    assert "(default: 256)" in shown and "(default: 1000)" in shown
    for parser in (sample.get_parser(), sample_ddp.get_parser(), evaluate.get_parser(), extract_latents.get_parser()):
        for action in parser._actions:
            if action.dest == "help" or not action.option_strings:
                continue
            assert action.help, f"{parser.prog}: {action.option_strings} has no help"
            assert "default" in action.help or "required" in action.help, \
                f"{parser.prog}: {action.option_strings} does not show its default"


def test_sample_refuses_an_existing_out_unless_overwrite(ckpt: str, tmp_path: Path) -> None:
    from runtime.cli import UsageError

    out = tmp_path / "grid.png"
    out.write_bytes(b"keep me")
    argv = ["--ckpt", ckpt, "--num-samples", "1", "--num-steps", "1", "--out", str(out)]
    with pytest.raises(UsageError, match="exists: choose another --out or pass --overwrite"):
        sample.main(sample.parse_args(argv))
    assert out.read_bytes() == b"keep me"
    sample.main(sample.parse_args([*argv, "--overwrite"]))
    assert Image.open(out).size == (12, 12) and os.listdir(tmp_path) == ["grid.png"]


def test_official_checkpoint_needs_a_matching_model_flag(tmp_path: Path) -> None:
    from runtime.cli import UsageError

    config = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    torch.save(SiT(**config).state_dict(), tmp_path / "official.pt")  # a raw state dict, like the releases
    argv = ["--ckpt", str(tmp_path / "official.pt"), "--num-steps", "1", "--out", str(tmp_path / "g.png")]
    with pytest.raises(UsageError, match="pass --model"):
        sample.main(sample.parse_args(argv))
    with pytest.raises(UsageError, match="do not fit the model .* check --model"):
        sample.main(sample.parse_args([*argv, "--model", "SiT-S/8", "--image-size", "32"]))
    assert os.listdir(tmp_path) == ["official.pt"]


@pytest.mark.slow
def test_two_ranks_both_stop_on_a_refused_folder(ckpt: str, tmp_path: Path) -> None:
    sample_ddp.main(ddp_args(ckpt, tmp_path, "--num-fid-samples", "2"))
    cli = ["--ckpt", ckpt, "--sample-dir", str(tmp_path), "--folder-name", "s", "--mode", "ode",
           "--method", "euler", "--num-steps", "2", "--num-fid-samples", "2", "--cfg-scale", "0.5"]
    procs = launch_two_ranks(cli, stderr=subprocess.PIPE)
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errors
    for err in errors:
        assert "Traceback" not in err and "cfg_scale 1.0 there, 0.5 now" in err.strip().splitlines()[-1]


# ----------------------------------------------------------------------------- PNG writes, packing the .npz


def test_png_threads_write_the_same_bytes_as_the_sampling_loop(ckpt: str, tmp_path: Path) -> None:
    """--png-threads 0 writes in the sampling loop, as sample_ddp.py always did; the pool's PNGs are the same."""
    folders = {}
    for threads in ("0", "3"):
        sample_ddp.main(ddp_args(ckpt, tmp_path / threads, "--num-fid-samples", "7", "--per-proc-batch-size", "2",
                                 "--png-threads", threads))
        folders[threads] = tmp_path / threads / "s"
    names = sorted(p.name for p in folders["0"].glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(7)] == sorted(p.name for p in folders["3"].glob("*.png"))
    assert all((folders["0"] / n).read_bytes() == (folders["3"] / n).read_bytes() for n in names)
    with np.load(tmp_path / "0" / "s.npz") as a, np.load(tmp_path / "3" / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_packing_reads_the_pngs_in_bounded_chunks(tmp_path: Path) -> None:
    """read_samples stacked every PNG into one array before np.savez copied it (9.8 GB twice for 50k samples at
    256 px); pack_samples holds one chunk of PNGs."""
    import tracemalloc

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (200, 48, 48, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / f"{i:06d}.png")
    tracemalloc.start()
    try:
        sample_ddp.pack_samples(str(tmp_path), 200, str(tmp_path / "s.npz"), chunk=20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < images.nbytes / 2, f"peak {peak} bytes for {images.nbytes} bytes of images"
    with np.load(tmp_path / "s.npz") as npz:
        assert np.array_equal(npz["arr_0"], images)


def test_packing_names_an_odd_png_and_leaves_no_npz(tmp_path: Path) -> None:
    from runtime.cli import UsageError

    for i in range(3):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i:06d}.png")
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "000002.png")
    with pytest.raises(UsageError, match=r"000002\.png is 8x6 pixels, sample 0 is 8x8"):
        sample_ddp.pack_samples(str(tmp_path), 3, str(tmp_path / "s.npz"), chunk=2)
    (tmp_path / "000001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UsageError, match=r"000001\.png is unreadable"):
        sample_ddp.pack_samples(str(tmp_path), 3, str(tmp_path / "s.npz"), chunk=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i:06d}.png" for i in range(3)]
