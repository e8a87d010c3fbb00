"""What REPA adds to a training step: SiT's forward + backward alone, with REPA's term, and the encoder alone, in
one process.

Modes, each on the same batch (latents for the SiT, the 256-pixel images they stand for, for the encoder):

    step      the FM loss's forward and backward of SiT (velocity MSE), gradients kept
    repa      the same plus REPA's term (regularizers/repa_term.py): a frozen DINOv2 forward on the images at 224
              pixels, the projector on the hidden state after the aligned block, the cosine loss, one backward
    encoder   the DINOv2 forward alone (no gradient): the part of ``repa`` that does not scale with the SiT

The encoders are built from their public configurations with random weights (no download; the time does not
depend on the values): ``dinov2-b`` (ViT-B/14, 86M parameters, REPA's default) and ``dinov2-s``. Timed
interleaved, the order rotating every repeat; each row is printed and the JSON rewritten when measured.

    python benchmarks/repa_cost.py --configs B/4 XL/2 --batch 8 --threads 2         # CPU
    python benchmarks/repa_cost.py --configs B/4 XL/2 --batch 64 --precision bf16   # one GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "sit"))
from device import sync  # noqa: E402
from modeling.models import SiT  # noqa: E402
from regularizers.repa_term import RepaTerm, repa_depth  # noqa: E402
from report import ResultFile, run_metadata  # noqa: E402

CONFIGS = {
    "tiny": dict(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4),
    "B/4": dict(input_size=32, patch_size=4, hidden_size=768, depth=12, num_heads=12),
    "XL/2": dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16),
}
ENCODERS = {  # DINOv2's published sizes; image_size 518 as the released checkpoints
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "dinov2-s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536),
    "dinov2-b": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
MODES = ("step", "repa", "encoder")


def build(config: str, encoder_name: str, device: torch.device):
    """(SiT, its REPA term, DINOv2) on the device, random weights."""
    import transformers

    sit = SiT(**CONFIGS[config], in_channels=4, num_classes=1000, learn_sigma=False).to(device)
    encoder_config = transformers.Dinov2Config(**ENCODERS[encoder_name], patch_size=14, image_size=518)
    encoder = transformers.Dinov2Model(encoder_config).to(device).eval().requires_grad_(False)
    grid = CONFIGS[config]["input_size"] // CONFIGS[config]["patch_size"]
    block = f"blocks.{repa_depth(CONFIGS[config]['depth']) - 1}"
    term = RepaTerm(sit, block, encoder, grid, CONFIGS[config]["hidden_size"], resolution=224)
    term.projector.to(device)
    return sit, term, encoder


def mode_functions(sit, term, config: str, batch: int, precision: str, device: torch.device) -> dict:
    """One call each of the three modes, on fixed inputs."""
    size = CONFIGS[config]["input_size"]
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 4, size, size, device=device, generator=gen)
    t = torch.rand(batch, device=device, generator=gen)
    y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
    images = torch.rand(batch, 3, 256, 256, device=device, generator=gen) * 2 - 1
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step(with_repa: bool) -> None:
        with torch.autocast(**autocast):
            loss = (sit(x, t, y).float() - x).pow(2).mean()
            if with_repa:
                loss = loss + term.loss(images)
        loss.backward()
        sit.zero_grad(set_to_none=True)
        term.projector.zero_grad(set_to_none=True)
        term.collector.clear()

    def encode() -> None:
        with torch.autocast(**autocast):
            term.targets(images)

    return {"step": lambda: step(False), "repa": lambda: step(True), "encoder": encode}


def bench_case(config: str, encoder_name: str, device: torch.device, args: argparse.Namespace) -> list[dict]:
    sit, term, _ = build(config, encoder_name, device)
    functions = mode_functions(sit, term, config, args.batch, args.precision, device)
    for mode in MODES:  # warm-up
        functions[mode]()
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for repeat in range(args.repeats):
        for mode in MODES[repeat % len(MODES):] + MODES[:repeat % len(MODES)]:
            sync(device)
            start = time.perf_counter()
            functions[mode]()
            sync(device)
            times[mode].append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times["step"])
    term.close()
    return [dict(device=device.type, config=config, encoder=encoder_name, batch=args.batch, precision=args.precision,
                 mode=mode, ms_median=statistics.median(times[mode]), ms_all=times[mode],
                 vs_step=statistics.median(times[mode]) / base) for mode in MODES]


HEADER = f"{'device':<6} {'config':<6} {'encoder':<9} {'batch':>5} {'prec':<5} {'mode':<8} {'ms':>10} {'x step':>7}"


def row_line(r: dict) -> str:
    return (f"{r['device']:<6} {r['config']:<6} {r['encoder']:<9} {r['batch']:>5} {r['precision']:<5} "
            f"{r['mode']:<8} {r['ms_median']:>10.2f} {r['vs_step']:>7.2f}")


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = ResultFile(args.out, run_metadata(device, repeats=args.repeats, batch=args.batch,
                                            precision=args.precision))
    rows: list[dict] = []
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    for config in args.configs:
        for encoder_name in args.encoders:
            out.stage(f"{config} {encoder_name}")
            for row in bench_case(config, encoder_name, device, args):
                print(row_line(row), flush=True)
                out.row((config, encoder_name, row["mode"]), row)
                rows.append(row)
    out.finish()
    print(f"\nms per call (median of {args.repeats} interleaved repeats); x step: against the SiT step alone; "
          f"JSON: {out.path}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["B/4", "XL/2"])
    parser.add_argument("--encoders", nargs="+", choices=sorted(ENCODERS), default=["dinov2-b"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: CUDA when there is one")
    parser.add_argument("--batch", type=int, default=8, help="images per step (per GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/repa_cost.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
