"""What each representation term adds to a training step of SiT: ANM, Dispersive Loss, REPA, all three, and REPA's
encoder alone, side by side in one process.

Modes, each a forward and backward of the FM loss (velocity MSE) on the same batch, gradients kept:

    step        SiT alone
    anm         + ANM (anm.ANM, the paper's alpha scaled to the width, lambda 10; hooks on every block)
    dispersive  + Dispersive Loss (InfoNCE-L2, lambda 0.5, tau 0.5, the middle block)
    repa        + REPA (regularizers/repa_term.py): the encoder's forward on the batch's images, the projector on
                the aligned block, the cosine loss
    all         + all three
    encoder     REPA's encoder forward alone (no gradient)

Configs: ``ablation`` (ablate.py's CPU model: D=64, depth 3, 16x16 pixels, patch 4; REPA's encoder is
ablation/stand_in.py's shape at 16 pixels, its projector the ablation's width-matched one), ``B/4`` and
``XL/2`` (SiT on 32x32x4 latents of 256-pixel images; DINOv2-B at 224 pixels and a 2048-wide projector, REPA's
defaults). Encoders are built from their configurations with random weights (no download: the time does not
depend on the values). Timed interleaved, the order rotating every repeat; each row is printed and the JSON
rewritten when measured.

    python benchmarks/term_cost.py --configs ablation --batch 32 --threads 1 --repeats 15    # CPU
    python benchmarks/term_cost.py --configs B/4 XL/2 --batch 64 --precision bf16           # one GPU
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
from ablation.arms import repa_projector_dim  # noqa: E402
from ablation.stand_in import STAND_IN_CONFIG  # noqa: E402
from device import sync  # noqa: E402
from modeling.alpha_scaling import matched_alpha  # noqa: E402
from modeling.models import SiT  # noqa: E402
from regularizers.dispersive import DispersiveTerm, dispersive_layers  # noqa: E402
from regularizers.repa_term import RepaTerm, repa_depth  # noqa: E402
from report import ResultFile, run_metadata  # noqa: E402

import anm  # noqa: E402

# SiT, its input channels, the images' pixels, REPA's encoder, its input size and the projector's width (REPA's
# 2048; the ablation's, scaled to its width)
CONFIGS = {
    "tiny": dict(sit=dict(input_size=8, patch_size=2, hidden_size=64, depth=3, num_heads=4), channels=4, pixels=64,
                 encoder=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                              patch_size=8), resolution=32, projector=64),
    "ablation": dict(sit=dict(input_size=16, patch_size=4, hidden_size=64, depth=3, num_heads=4), channels=1,
                     pixels=16, encoder=dict(STAND_IN_CONFIG), resolution=16, projector=repa_projector_dim(64)),
    "B/4": dict(sit=dict(input_size=32, patch_size=4, hidden_size=768, depth=12, num_heads=12), channels=4,
                pixels=256, encoder=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                         intermediate_size=3072, patch_size=14), resolution=224, projector=2048),
    "XL/2": dict(sit=dict(input_size=32, patch_size=2, hidden_size=1152, depth=28, num_heads=16), channels=4,
                 pixels=256, encoder=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                          intermediate_size=3072, patch_size=14), resolution=224, projector=2048),
}
MODES = ("step", "anm", "dispersive", "repa", "all", "encoder")


class Setup:
    """One config's SiT with every term attached, each switched on per mode, and fixed inputs."""

    def __init__(self, name: str, batch: int, device: torch.device) -> None:
        import transformers

        config = CONFIGS[name]
        sit_config = config["sit"]
        self.sit = SiT(**sit_config, in_channels=config["channels"], num_classes=1000, learn_sigma=False).to(device)
        self.anm = anm.ANM(self.sit, alpha=matched_alpha(70.0, sit_config["hidden_size"]), lam=10.0, warmup=0)
        self.disp = DispersiveTerm(self.sit, dispersive_layers(self.sit, None))
        encoder = transformers.Dinov2Model(transformers.Dinov2Config(**config["encoder"], image_size=518))
        encoder = encoder.to(device).eval().requires_grad_(False)
        block = f"blocks.{repa_depth(sit_config['depth']) - 1}"
        grid = sit_config["input_size"] // sit_config["patch_size"]
        self.repa = RepaTerm(self.sit, block, encoder, grid, sit_config["hidden_size"],
                             projector_dim=config["projector"], resolution=config["resolution"])
        self.repa.projector.to(device)
        gen = torch.Generator(device).manual_seed(0)
        size = sit_config["input_size"]
        self.x = torch.randn(batch, config["channels"], size, size, device=device, generator=gen)
        self.t = torch.rand(batch, device=device, generator=gen)
        self.y = torch.randint(0, 1000, (batch,), device=device, generator=gen)
        channels = 3 if config["channels"] == 4 else config["channels"]  # latents stand for RGB images
        self.images = torch.rand(batch, channels, config["pixels"], config["pixels"], device=device,
                                 generator=gen) * 2 - 1

    def step(self, terms: set[str], autocast: dict) -> None:
        """One forward and backward with ``terms``; the hooks of the others return at once (inactive)."""
        for name, collector in (("anm", self.anm.collector), ("dispersive", self.disp.collector),
                                ("repa", self.repa.collector)):
            collector.active = name in terms
        with torch.autocast(**autocast):
            model = self.anm if "anm" in terms else self.sit
            loss = (model(self.x, self.t, self.y).float() - self.x).pow(2).mean()
            if "anm" in terms:
                loss = loss + self.anm.loss()
            if "dispersive" in terms:
                loss = loss + self.disp.loss()
            if "repa" in terms:
                loss = loss + self.repa.loss(self.images)
        loss.backward()
        self.sit.zero_grad(set_to_none=True)
        self.repa.projector.zero_grad(set_to_none=True)

    def functions(self, precision: str) -> dict:
        autocast = dict(device_type=self.x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

        def encode() -> None:
            with torch.autocast(**autocast):
                self.repa.targets(self.images)

        sets = {"step": set(), "anm": {"anm"}, "dispersive": {"dispersive"}, "repa": {"repa"},
                "all": {"anm", "dispersive", "repa"}}
        return {**{mode: (lambda terms=terms: self.step(terms, autocast)) for mode, terms in sets.items()},
                "encoder": encode}

    def close(self) -> None:
        self.anm.close()
        self.disp.close()
        self.repa.close()


def bench_case(name: str, device: torch.device, args: argparse.Namespace) -> list[dict]:
    setup = Setup(name, args.batch, device)
    functions = setup.functions(args.precision)
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
    setup.close()
    base = statistics.median(times["step"])
    return [dict(device=device.type, config=name, batch=args.batch, precision=args.precision, mode=mode,
                 ms_median=statistics.median(times[mode]), ms_all=times[mode],
                 vs_step=statistics.median(times[mode]) / base) for mode in MODES]


HEADER = f"{'device':<6} {'config':<9} {'batch':>5} {'prec':<5} {'mode':<11} {'ms':>10} {'x step':>7}"


def row_line(r: dict) -> str:
    return (f"{r['device']:<6} {r['config']:<9} {r['batch']:>5} {r['precision']:<5} {r['mode']:<11} "
            f"{r['ms_median']:>10.2f} {r['vs_step']:>7.2f}")


def main(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = ResultFile(args.out, run_metadata(device, repeats=args.repeats, batch=args.batch,
                                            precision=args.precision))
    rows: list[dict] = []
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    for name in args.configs:
        out.stage(name)
        for row in bench_case(name, device, args):
            print(row_line(row), flush=True)
            out.row((name, row["mode"]), row)
            rows.append(row)
    out.finish()
    print(f"\nms per call (median of {args.repeats} interleaved repeats); x step: against SiT's step alone; "
          f"JSON: {out.path}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["B/4", "XL/2"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: CUDA when there is one")
    parser.add_argument("--batch", type=int, default=8, help="images per step (per GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/term_cost.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
