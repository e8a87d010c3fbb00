"""Images/s of sample_ddp.py's sampling path: our best mode against the reference configuration, one process.

One batch is what sample_ddp.py's loop does per iteration, with its own functions: per-sample labels and
noise (sample_inputs), one SDE generator per sample (sample_seed(..., stream=1)), generate() with CFG, and
decode_to_uint8() through the VAE (PNG writing is left out). Modes, timed interleaved repeat after repeat:

    reference  fp32 (TF32 on CUDA, sample_ddp.py's default), per-process batch 4, no compile
    fast       bf16 autocast (SiT and VAE decode), a large per-process batch, torch.compile optional

Default sampler: SDE Euler-Maruyama, 250 steps, CFG 1.5 on 3 channels (the paper's FID setting). The SiT
and the VAE (diffusers AutoencoderKL built from config) have random weights; the SiT's zero-initialised
adaLN/output layers are perturbed so that it predicts non-zero velocities.

Then a numerical check that both modes compute the same function: the same images (sample_ddp.py draws
labels, starting noise and Brownian increments per sample, so the batch size does not change them) are
sampled in fp32 (TF32 off) 4 at a time and all at once, and in bf16 (eager) all at once; it reports the largest
absolute differences of the final latents and of the uint8 images.

    python benchmarks/sampling.py                      # tiny SiT + tiny VAE on CPU, 10 SDE steps, ~1-2 min
    python benchmarks/sampling.py --configs XL/2       # on a GPU: XL/2 at 256 px, SD-size VAE, 250 steps
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
from device import fp32_exact, pick_device, sync  # noqa: E402
from modeling.models import SiT  # noqa: E402
from modeling.transport import create_transport  # noqa: E402
from report import ResultFile, run_metadata  # noqa: E402
from sample import decode_to_uint8, generate, make_sample_fn  # noqa: E402
from sample_ddp import sample_inputs, sample_seed  # noqa: E402
from train_step import build_vae  # noqa: E402

# name: (SiT kwargs, fast per-process batch, VAE config). Latent side = image side / 8.
CONFIGS = {
    "tiny": (dict(input_size=16, patch_size=2, hidden_size=128, depth=4, num_heads=4), 32, "tiny"),
    "B/4": (dict(input_size=32, patch_size=4, hidden_size=768, depth=12, num_heads=12), 256, "sd"),
    "XL/2": (dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16), 128, "sd"),
}
MODES = ("reference", "fast")
REFERENCE_BATCH = 4  # the reference sample_ddp.py's --per-proc-batch-size default


def make_model(model_kwargs: dict, device: torch.device) -> SiT:
    torch.manual_seed(0)
    model = SiT(**model_kwargs, in_channels=4, num_classes=1000, learn_sigma=False)
    # As trained weights would: make every block and the output layer do something (they start at zero).
    with torch.no_grad():
        for block in model.blocks:
            block.adaLN_modulation[-1].weight.normal_(std=0.02)
        model.final_layer.adaLN_modulation[-1].weight.normal_(std=0.02)
        model.final_layer.linear.weight.normal_(std=0.02)
    return model.to(device).eval().requires_grad_(False)


class Mode:
    def __init__(self, name: str, model: SiT, batch: int, precision: str, compile_model: bool) -> None:
        self.name, self.batch, self.precision = name, batch, precision
        self.model = copy.deepcopy(model)
        self.compiled = compile_model
        if compile_model:  # generate() calls model.forward_with_cfg: compile that
            self.model.forward_with_cfg = torch.compile(self.model.forward_with_cfg)


def sample_batch(model: SiT, vae, sample_fn, indices: range, precision: str, args, device: torch.device,
                 shape: tuple) -> tuple[torch.Tensor, np.ndarray]:
    """The body of sample_ddp.py's loop for these sample indices (without writing PNGs):
    (final latents, uint8 (B, H, W, 3) images)."""
    y, z = sample_inputs(indices, args.global_seed, model.num_classes, shape)
    sde_gens = [torch.Generator(device).manual_seed(sample_seed(args.global_seed, i, stream=1))
                for i in indices]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        x = generate(model, z.to(device), y.to(device), sample_fn, args.cfg_scale, args.cfg_channels,
                     sde_gens)
        return x, decode_to_uint8(x, vae)


def checked_samples(model, vae, sample_fn, n: int, batch: int, precision: str, args, device, shape):
    """(latents, uint8 images) of samples 0..n-1, computed `batch` at a time."""
    latents, images = [], []
    for start in range(0, n, batch):
        x, image = sample_batch(model, vae, sample_fn, range(start, min(start + batch, n)), precision, args,
                                device, shape)
        latents.append(x.float().cpu())
        images.append(image)
    return torch.cat(latents), np.concatenate(images)


def compare(a: tuple, b: tuple) -> dict:
    (lat_a, img_a), (lat_b, img_b) = a, b
    diff = np.abs(img_a.astype(np.int16) - img_b.astype(np.int16))
    return dict(latent_max_abs=float((lat_a - lat_b).abs().max()), latent_scale=float(lat_a.abs().max()),
                uint8_max_abs=int(diff.max()), uint8_mean_abs=float(diff.mean()))


def bench_case(name: str, args, device: torch.device, results: ResultFile | None = None
               ) -> tuple[list[dict], dict | None]:
    model_kwargs, fast_batch, vae_name = CONFIGS[name]
    fast_batch = args.batch_size or fast_batch
    image_size = model_kwargs["input_size"] * 8
    shape = (4, model_kwargs["input_size"], model_kwargs["input_size"])
    model = make_model(model_kwargs, device)
    vae = build_vae(vae_name, image_size, device)
    transport = create_transport()
    sample_fn = make_sample_fn(transport, "sde", "euler", args.num_steps)  # sample_ddp.py's, as in the paper
    settings = {"reference": (REFERENCE_BATCH, "fp32", False), "fast": (fast_batch, "bf16", args.compile)}
    modes = {m: Mode(m, model, *settings[m]) for m in args.modes}

    warm_fn = make_sample_fn(transport, "sde", "euler", 2)

    def run(mode: Mode, fn, k: int) -> None:  # batch k of this mode, as sample_ddp.py's loop
        sample_batch(mode.model, vae, fn, range(k * mode.batch, (k + 1) * mode.batch), mode.precision, args,
                     device, shape)

    for m in args.modes:  # compilation, allocator, autotuning: the shapes of the timed batches, 2 steps
        if results is not None:
            results.stage(f"{name}: warm-up {m}")
        run(modes[m], warm_fn, 0)
    times = {m: [] for m in args.modes}
    peaks = {m: [] for m in args.modes}
    rows = []
    for repeat in range(args.repeats):
        shift = repeat % len(args.modes)
        for m in args.modes[shift:] + args.modes[:shift]:  # rotate who goes first
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run(modes[m], sample_fn, repeat)  # ends with the images on the CPU: synchronised
            times[m].append(modes[m].batch / (time.perf_counter() - start))
            if device.type == "cuda":
                peaks[m].append(torch.cuda.max_memory_allocated() / 2**30)
        medians = {m: statistics.median(times[m]) for m in args.modes}
        rows = []
        for m in args.modes:
            q = statistics.quantiles(times[m], n=4) if len(times[m]) > 1 else [medians[m]] * 3
            rows.append(dict(
                config=name, mode=m, batch=modes[m].batch, precision=modes[m].precision,
                compile=modes[m].compiled,
                image_size=image_size, vae=vae_name, num_steps=args.num_steps, nfe=args.num_steps,
                cfg_scale=args.cfg_scale, img_per_s_median=medians[m], img_per_s_q1=q[0], img_per_s_q3=q[2],
                img_per_s_all=times[m], s_per_img=1 / medians[m],
                speedup_vs_reference=medians[m] / medians["reference"] if "reference" in medians else None,
                peak_gib=max(peaks[m]) if peaks[m] else None, repeats_done=len(times[m]),
            ))
        if results is not None:  # every repeat: a run stopped by a time limit keeps the batches it timed
            results.stage(f"{name}: repeat {repeat + 1}/{args.repeats}")
            for row in rows:
                results.row((name, row["mode"]), row)

    check = None
    if args.check_samples > 0:
        if results is not None:
            results.stage(f"{name}: same-function check")
        n = args.check_samples
        with fp32_exact():
            ref = checked_samples(model, vae, sample_fn, n, REFERENCE_BATCH, "fp32", args, device, shape)
            big = checked_samples(model, vae, sample_fn, n, n, "fp32", args, device, shape)
        bf16 = checked_samples(model, vae, sample_fn, n, n, "bf16", args, device, shape)
        check = dict(config=name, samples=n, num_steps=args.num_steps,
                     fp32_batch4_vs_batchN=compare(ref, big), bf16_vs_fp32=compare(ref, bf16))
    return rows, check


def print_table(rows: list[dict], checks: list[dict], meta: dict) -> None:
    print()
    header = f"{'config':<6} {'px':>4} {'mode':<10} {'bs':>4} {'prec':<5} {'compile':<7} {'SDE steps':>9} " \
             f"{'cfg':>4} {'img/s':>9} {'IQR':>19} {'s/img':>8} {'vs ref':>7} {'peak GiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        vs_ref = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
        print(
            f"{r['config']:<6} {r['image_size']:>4} {r['mode']:<10} {r['batch']:>4} {r['precision']:<5} "
            f"{str(r['compile']):<7} {r['num_steps']:>9} {r['cfg_scale']:>4} {r['img_per_s_median']:>9.3f} "
            f"{r['img_per_s_q1']:>9.3f}-{r['img_per_s_q3']:<9.3f} {r['s_per_img']:>8.3f} {vs_ref:>7} "
            f"{peak:>9}"
        )
    for c in checks:
        a, b = c["fp32_batch4_vs_batchN"], c["bf16_vs_fp32"]
        print(f"\nsame-function check {c['config']} ({c['samples']} samples, {c['num_steps']} SDE steps, "
              f"same labels, noise and Brownian increments; latents up to {a['latent_scale']:.2f} in size):\n"
              f"  fp32 batch 4 vs batch {c['samples']}: latents max |diff| {a['latent_max_abs']:.2e}, "
              f"uint8 max |diff| {a['uint8_max_abs']} (mean {a['uint8_mean_abs']:.3f})\n"
              f"  bf16 vs fp32:            latents max |diff| {b['latent_max_abs']:.2e}, "
              f"uint8 max |diff| {b['uint8_max_abs']} (mean {b['uint8_mean_abs']:.3f})")
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['threads']} threads, SDE Euler-Maruyama "
          f"{meta['num_steps']} steps (250 in the paper), CFG {meta['cfg_scale']}, VAE decode included, "
          f"PNG writing "
          f"not; {meta['repeats']} batches per mode; JSON: {meta['out']}")


def main(args: argparse.Namespace) -> dict:
    device = pick_device(args.device, args.threads)  # on CUDA with TF32: sample_ddp.py's --tf32 default
    if args.num_steps is None:
        args.num_steps = 250 if device.type == "cuda" else 10
    configs = args.configs or (["XL/2"] if device.type == "cuda" else ["tiny"])
    meta = run_metadata(device, num_steps=args.num_steps, cfg_scale=args.cfg_scale, repeats=args.repeats,
                        out=args.out)
    results = ResultFile(args.out, meta)  # on disk from the first row on (see report.py)
    rows, checks = [], []
    for name in configs:
        case_rows, check = bench_case(name, args, device, results)
        rows.extend(case_rows)
        if check is not None:
            checks.append(check)
            results.set("checks", checks)
        print(f"done {name}", flush=True)
    results.set("checks", checks)
    result = results.finish()
    print_table(rows, checks, meta)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None,
                        help="default: XL/2 on a GPU, tiny on CPU")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--batch-size", type=int, default=None, help="the fast mode's per-process batch")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast mode's SiT")
    parser.add_argument("--num-steps", type=int, default=None,
                        help="SDE steps (= NFE); default: 250 on a GPU, 10 on CPU")
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--cfg-channels", type=int, default=3)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per mode, interleaved")
    parser.add_argument("--check-samples", type=int, default=8, help="same-function check; 0 = skip")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/sampling.json")
    args = parser.parse_args(argv)
    args.modes = tuple(args.modes)
    return args


if __name__ == "__main__":
    main(parse_args())
