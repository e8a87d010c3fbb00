"""The SiT example's training step at its fastest against a faithful reference-style step, in one process.

Modes (each its own copy of the same SiT, the same images, labels and seeds; timed interleaved, repeat
after repeat, so drift in the machine's speed hits them all alike):

    reference  the reference recipe: fp32 (TF32 on CUDA), the VAE encodes the images every step
               (posterior sample x 0.18215, as train.py with --data imagenet), AdamW as the reference
               builds it (default implementation: foreach on CUDA, not fused), no compile
    ref-bf16   the reference code's step in bf16: the same but bf16 autocast and latents already in
               memory (no VAE)
    fast       train.py's best configuration: latents pre-extracted (posterior moments of both flips, as
               extract_latents.py writes them, sampled each step the way data.LatentDataset does), bf16
               autocast, fused AdamW on CUDA, torch.compile, SDPA (flash) attention

Every step is train.py's: transport.training_losses(...)["loss"].mean() under autocast, zero_grad,
backward, AdamW step, train.update_ema. The VAE is a diffusers AutoencoderKL built from config with random
weights (SD architecture on GPU, a tiny one on CPU): only its cost matters here.

After the timing, a loss-curve check trains the fast path and a plain fp32 eager path (TF32 off) from the
same initial weights on the same data and random draws for --check-steps steps and reports the largest
relative difference between the two FM-loss curves.

    python benchmarks/train_step.py                      # tiny SiT + tiny VAE on CPU (no compile), ~1-2 min
    python benchmarks/train_step.py --configs XL/2       # on a GPU: XL/2 bs32 at 256 px, SD-size VAE, compile
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
from data.latents import LATENT_SCALE  # noqa: E402
from device import fp32_exact, pick_device, sync  # noqa: E402
from extract_latents import encode_moments  # noqa: E402
from modeling.models import SiT  # noqa: E402
from modeling.transport import create_transport  # noqa: E402
from report import ResultFile, run_metadata  # noqa: E402
from train import update_ema  # noqa: E402

# diffusers AutoencoderKL configs: "sd" is the architecture of stabilityai/sd-vae-ft-ema (84M parameters,
# 8x downsampling); "tiny" keeps the layout (4 blocks, 8x) with few channels, for CPU runs.
VAE_CONFIGS = {
    "sd": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
    "tiny": dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
}

# name: (SiT kwargs, batch size, VAE config). Latent side = image side / 8.
CONFIGS = {
    "tiny": (dict(input_size=16, patch_size=2, hidden_size=128, depth=4, num_heads=4), 8, "tiny"),
    "small": (dict(input_size=16, patch_size=2, hidden_size=384, depth=12, num_heads=6), 16, "tiny"),
    "B/4": (dict(input_size=32, patch_size=4, hidden_size=768, depth=12, num_heads=12), 256, "sd"),
    "XL/2": (dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16), 32, "sd"),
}
MODES = ("reference", "ref-bf16", "fast")
# mode: (precision, VAE encode every step, fused AdamW on CUDA, torch.compile if --compile)
SETTINGS = {
    "reference": ("fp32", True, False, False),
    "ref-bf16": ("bf16", False, False, False),
    "fast": ("bf16", False, True, True),
    "fp32-check": ("fp32", False, False, False),  # the loss-curve check's exact path
}


def build_vae(name: str, image_size: int, device: torch.device) -> torch.nn.Module:
    """A randomly initialised diffusers AutoencoderKL with the SD-VAE layout (weights do not matter here)."""
    from diffusers.models import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=image_size, scaling_factor=LATENT_SCALE,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        **VAE_CONFIGS[name],
    )
    return vae.to(device).eval().requires_grad_(False)


def sample_latents(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """data.LatentDataset.__getitem__ for a whole batch, on the device: (B, 2, 2, C, h, w) float16 moments
    ([no flip, flip] x [mean, std]) -> a random flip of each, mean + std * eps, x 0.18215."""
    batch = len(moments)
    flip = torch.randint(2, (batch,), generator=generator, device=generator.device).to(moments.device)
    mean, std = moments[torch.arange(batch, device=moments.device), flip].float().unbind(1)
    noise = torch.randn(mean.shape, generator=generator, device=generator.device).to(mean.device)
    return (mean + std * noise) * LATENT_SCALE


class Mode:
    """One training configuration: its own model, EMA and optimizer, and train.py's step."""

    def __init__(self, name: str, template: SiT, device: torch.device, compile_model: bool,
                 ema: bool = True) -> None:
        self.name = name
        self.raw = copy.deepcopy(template)
        self.ema = copy.deepcopy(template).requires_grad_(False).eval() if ema else None
        self.precision, self.online_vae, fused, compiled = SETTINGS[name]
        # fast: as train.py, fused=device.type == "cuda"; the others: AdamW's default as the reference calls
        # it (foreach on CUDA; passing fused=False would pick the slower per-tensor loop instead).
        self.fused = fused and device.type == "cuda"
        self.adamw_kwargs = dict(fused=device.type == "cuda") if fused else {}
        self.compiled = compiled and compile_model
        self.runner = torch.compile(self.raw) if self.compiled else self.raw
        self.raw.train()
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        self.opt = torch.optim.AdamW(self.raw.parameters(), lr=1e-4, weight_decay=0, **self.adamw_kwargs)

    def step(self, transport, data: dict, generator: torch.Generator) -> torch.Tensor:
        if self.online_vae:  # train.py with a VAE: posterior *sample* of the images, every step
            with torch.no_grad():
                x = data["vae"].encode(data["images"]).latent_dist.sample(generator=generator) * LATENT_SCALE
        else:
            x = sample_latents(data["moments"], generator)
        autocast = dict(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")
        with torch.autocast(**autocast):
            loss = transport.training_losses(self.runner, x, dict(y=data["labels"]), generator=generator)
            loss = loss["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if data["ema"] and self.ema is not None:
            update_ema(self.ema, self.raw)
        return loss.detach()


def make_template(model_kwargs: dict, device: torch.device) -> SiT:
    torch.manual_seed(0)
    template = SiT(**model_kwargs, in_channels=4, num_classes=1000, learn_sigma=False).to(device)
    # Leave adaLN-Zero's identity start so that every block does work and gradients flow, as mid-training.
    for block in template.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(template.final_layer.linear.weight, std=0.02)
    return template


def loss_curve(mode: Mode, initial: dict, transport, data: dict, steps: int,
               device: torch.device) -> list[float]:
    """FM losses of `steps` training steps from `initial` weights, fixed seeds (data draws, label drops)."""
    mode.raw.load_state_dict(initial)  # in place: a compiled runner keeps its graph
    mode.reset_optimizer()
    torch.manual_seed(1)  # label dropout draws from the global RNG
    generator = torch.Generator(device).manual_seed(1)
    data = dict(data, ema=False)
    return [float(mode.step(transport, data, generator)) for _ in range(steps)]


def bench_case(name: str, args, device: torch.device, results: ResultFile | None = None
               ) -> tuple[list[dict], dict]:
    model_kwargs, batch_size, vae_name = CONFIGS[name]
    batch_size = args.batch_size or batch_size
    image_size = model_kwargs["input_size"] * 8
    template = make_template(model_kwargs, device)
    vae = build_vae(vae_name, image_size, device)
    gen = torch.Generator(device).manual_seed(0)
    images = torch.rand(batch_size, 3, image_size, image_size, device=device, generator=gen) * 2 - 1
    labels = torch.randint(0, 1000, (batch_size,), device=device, generator=gen)
    # extract_latents.py's moments of these very images (float16 on disk, as it writes them).
    moments = torch.cat([encode_moments(vae, part) for part in images.split(8)]).half()
    data = dict(images=images, labels=labels, moments=moments, vae=vae, ema=not args.no_ema)
    transport = create_transport()
    modes = {m: Mode(m, template, device, args.compile, ema=not args.no_ema) for m in args.modes}
    generators = {m: torch.Generator(device).manual_seed(0) for m in args.modes}

    for m in args.modes:  # warm-up: compilation, allocator, autotuning
        if results is not None:
            results.stage(f"{name}: warm-up {m}")
        for _ in range(args.warmup):
            modes[m].step(transport, data, generators[m])
    sync(device)
    times = {m: [] for m in args.modes}
    peaks = {m: [] for m in args.modes}
    rows = []
    for repeat in range(args.repeats):
        shift = repeat % len(args.modes)
        for m in args.modes[shift:] + args.modes[:shift]:  # rotate who goes first
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                modes[m].step(transport, data, generators[m])
            sync(device)
            times[m].append((time.perf_counter() - start) / args.steps * 1e3)
            if device.type == "cuda":
                peaks[m].append(torch.cuda.max_memory_allocated() / 2**30)
        medians = {m: statistics.median(times[m]) for m in args.modes}
        rows = []
        for m in args.modes:
            q = statistics.quantiles(times[m], n=4) if len(times[m]) > 1 else [medians[m]] * 3
            rows.append(dict(
                config=name, batch=batch_size, image_size=image_size, vae=vae_name, mode=m,
                precision=modes[m].precision, online_vae=modes[m].online_vae, fused_adamw=modes[m].fused,
                compile=modes[m].compiled, ema=not args.no_ema,
                ms_median=medians[m], ms_q1=q[0], ms_q3=q[2], ms_all=times[m],
                img_per_s=batch_size / medians[m] * 1e3,
                speedup_vs_reference=medians["reference"] / medians[m] if "reference" in medians else None,
                speedup_vs_ref_bf16=medians["ref-bf16"] / medians[m] if "ref-bf16" in medians else None,
                peak_gib=max(peaks[m]) if peaks[m] else None, repeats_done=len(times[m]),
            ))
        if results is not None:  # every repeat: a run stopped by a time limit keeps the repeats it finished
            results.stage(f"{name}: repeat {repeat + 1}/{args.repeats}")
            for row in rows:
                results.row((name, row["mode"]), row)

    check = None
    if args.check_steps > 0:
        if results is not None:
            results.stage(f"{name}: loss-curve check")
        fast = modes.get("fast") or Mode("fast", template, device, args.compile, ema=False)
        for m in [m for m in modes if m != "fast"]:  # free memory: XL/2 modes hold ~13 GiB each
            del modes[m]
        fast.ema = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # fp32, eager, AdamW's default, on the same pre-extracted latents: only the precision path differs.
        exact = Mode("fp32-check", template, device, compile_model=False, ema=False)
        initial = copy.deepcopy(template.state_dict())
        fast_losses = loss_curve(fast, initial, transport, data, args.check_steps, device)
        with fp32_exact():
            fp32_losses = loss_curve(exact, initial, transport, data, args.check_steps, device)
        rel = [abs(a - b) / abs(b) for a, b in zip(fast_losses, fp32_losses, strict=True)]
        check = dict(config=name, steps=args.check_steps, fast_compile=fast.compiled,
                     fast_losses=fast_losses, fp32_losses=fp32_losses,
                     max_rel_diff=max(rel), mean_rel_diff=statistics.fmean(rel),
                     first_loss=fp32_losses[0], last_loss=fp32_losses[-1])
    return rows, check


def print_table(rows: list[dict], checks: list[dict], meta: dict) -> None:
    print()
    header = (f"{'config':<6} {'bs':>4} {'px':>4} {'mode':<10} {'prec':<5} {'VAE/step':<8} {'fused':<5} "
              f"{'compile':<7} {'ms/step':>9} {'IQR':>17} {'img/s':>8} {'vs ref':>7} {'vs bf16':>8} "
              f"{'peak GiB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        vs_ref = f"{r['speedup_vs_reference']:.2f}x" if r["speedup_vs_reference"] else "-"
        vs_bf16 = f"{r['speedup_vs_ref_bf16']:.2f}x" if r["speedup_vs_ref_bf16"] else "-"
        print(
            f"{r['config']:<6} {r['batch']:>4} {r['image_size']:>4} {r['mode']:<10} {r['precision']:<5} "
            f"{str(r['online_vae']):<8} {str(r['fused_adamw']):<5} {str(r['compile']):<7} "
            f"{r['ms_median']:>9.2f} "
            f"{r['ms_q1']:>8.2f}-{r['ms_q3']:<8.2f} {r['img_per_s']:>8.1f} {vs_ref:>7} {vs_bf16:>8} {peak:>9}"
        )
    for c in checks:
        print(f"\nloss-curve check {c['config']}: fast (bf16, compile={c['fast_compile']}) vs fp32 eager, "
              f"{c['steps']} steps, same init/data/draws: max rel. diff {c['max_rel_diff']:.2e} "
              f"(mean {c['mean_rel_diff']:.2e}; fp32 loss {c['first_loss']:.4f} -> {c['last_loss']:.4f})")
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['threads']} threads, "
          f"EMA {'off' if meta['no_ema'] else 'on'}, "
          f"{meta['steps']} steps x {meta['repeats']} repeats per mode; JSON: {meta['out']}")


def main(args: argparse.Namespace) -> dict:
    device = pick_device(args.device, args.threads)  # on CUDA with TF32, as the reference runs "fp32"
    if args.compile is None:
        args.compile = device.type == "cuda"
    configs = args.configs or (["XL/2"] if device.type == "cuda" else ["tiny"])
    meta = run_metadata(device, steps=args.steps, repeats=args.repeats, warmup=args.warmup, no_ema=args.no_ema,
                        out=args.out)
    results = ResultFile(args.out, meta)  # on disk from the first row on (see report.py)
    rows, checks = [], []
    for name in configs:
        # Compiled code draws random numbers (the label dropout) as eager code does, so that the loss-curve
        # check sees the same label drops on both paths; the only random op is one rand(batch): no cost.
        with inductor_config.patch(fallback_random=True):
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
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the fast path (default: on for CUDA, off on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved timed blocks per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--check-steps", type=int, default=30, help="loss-curve check length; 0 = skip")
    parser.add_argument("--no-ema", action="store_true", help="leave train.py's EMA update out of the step")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    args = parser.parse_args(argv)
    args.modes = tuple(args.modes)
    return args


if __name__ == "__main__":
    main(parse_args())
