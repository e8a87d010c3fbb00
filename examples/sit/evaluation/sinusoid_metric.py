"""
A quality metric for the sinusoid dataset that needs no pretrained network.

Each image is fitted with the generating model x = c0 + (c1 - c0) (1 + sin(2 pi (fx u + fy v) / S + phi)) / 2:
the peak of the zero-padded 2-D spectrum gives a coarse wave vector, a pattern search refines it to
the least-squares optimum, and a per-channel regression on [1, sin, cos] gives phi, c0, c1. The residual
ratio rho = |x - x_hat|^2 / |x - mean|^2 says whether the image is a sinusoid at all (valid: rho < 0.05).

Sets of images are compared by a Frechet distance on standardised [f, cos 2theta, sin 2theta, cos phi,
sin phi, c0, c1] plus two fixed-scale defect coordinates (residual, distance of f to an integer), so
that noise and off-lattice frequencies count too; per-parameter Wasserstein-1 and unbiased MMD^2
complete it. The same numbers for two independent real sets of the same size are the noise floor,
and are always reported with them.
"""

import math

import numpy as np
import torch
from data.sinusoids import make_sinusoids

from evaluation.metrics import frechet_distance_from_features, mmd2_unbiased, wasserstein1

VALID_RHO = 0.05  # residual ratio under which an image counts as a valid sinusoid
MIN_FREQ = 0.5  # cycles per image; the lowest wave vector the fit considers
LATTICE_SCALE = 0.1  # cycles off the integer lattice that count like one standard deviation


#################################################################################
#                               Parameter fitting                               #
#################################################################################


def to_unit_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """
    Float64 (n, C, H, W) images in [0, 1] from uint8 (any layout, as in ADM npz files: NHWC) or from
    float tensors in [-1, 1] (NCHW, as the models and datasets produce).
    """
    is_uint8 = images.dtype in (np.uint8, torch.uint8)
    images = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
    if images.ndim == 3:  # grayscale without channel dim
        images = images[:, None]
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.permute(0, 3, 1, 2)
    images = images.double()
    return images / 255 if is_uint8 else (images + 1) / 2


def _axis_sums(freq: torch.Tensor, size: int) -> torch.Tensor:
    """
    sum_u exp(i w u) over u < S with w = 2 pi freq / S, by the Dirichlet-kernel closed form
    exp(i w (S - 1) / 2) sin(S w / 2) / sin(w / 2); its limit S at w = 0 (only |freq| < S occurs here).
    """
    half = math.pi * freq / size
    small = half.abs() < 1e-9
    ratio = torch.where(
        small, torch.full_like(half, size), torch.sin(size * half) / torch.where(small, 1.0, torch.sin(half))
    )
    phase = half * (size - 1)
    return torch.complex(ratio * torch.cos(phase), ratio * torch.sin(phase))


def _fit_at(
    x: torch.Tensor, fx: torch.Tensor, fy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Least-squares fit of each channel on [1, sin psi, cos psi], psi = 2 pi (fx u + fy v) / S, for a grid of
    candidate wave vectors per image. x: (n, C, S, S) centred per channel; fx: (n, A), fy: (n, B).
    Returns explained variance summed over channels (n, B, A), the coefficients (n, B, A, C, 2) of
    [sin, cos] and the means of [sin, cos] over the image (n, B, A, 2).
    """
    n, channels, size, _ = x.shape
    coords = torch.arange(size, dtype=torch.float64, device=x.device)
    ax = 2 * math.pi * fx[..., None] * coords / size  # (n, A, S)
    ay = 2 * math.pi * fy[..., None] * coords / size  # (n, B, S)
    # sum_{v,u} x e^{i psi} is separable: transform rows, then columns (real batched matmuls are
    # several times faster than complex einsums on CPU).
    rows = torch.bmm(x.reshape(n, channels * size, size), torch.cat([ax.cos(), ax.sin()], 1).transpose(1, 2))
    rows = rows.reshape(n, channels, size, 2, -1)  # (n, C, v, [cos, sin], A)
    cos_b, sin_b = ay.cos(), ay.sin()  # (n, B, v)
    rc = torch.einsum("ncvka,nbv->nbkac", rows, cos_b)  # (n, B, 2, A, C)
    rs = torch.einsum("ncvka,nbv->nbkac", rows, sin_b)
    # cos(a + b) = cos a cos b - sin a sin b ; sin(a + b) = sin a cos b + cos a sin b
    z = torch.complex(rc[:, :, 0] - rs[:, :, 1], rc[:, :, 1] + rs[:, :, 0])  # Re = <x, cos>, Im = <x, sin>
    # Gram matrix of the centred [sin, cos] from the closed-form sums of e^{i psi} and e^{2 i psi}.
    npix = size * size
    g1 = _axis_sums(fx, size)[:, None, :] * _axis_sums(fy, size)[:, :, None]  # (n, B, A)
    g2 = _axis_sums(2 * fx, size)[:, None, :] * _axis_sums(2 * fy, size)[:, :, None]
    mean_sin, mean_cos = g1.imag / npix, g1.real / npix
    ss = (npix - g2.real) / 2 - npix * mean_sin**2
    cc = (npix + g2.real) / 2 - npix * mean_cos**2
    sc = g2.imag / 2 - npix * mean_sin * mean_cos
    det = (ss * cc - sc**2).clamp_min(1e-12)
    ps, pc = z.imag, z.real
    coef_sin = (cc[..., None] * ps - sc[..., None] * pc) / det[..., None]
    coef_cos = (ss[..., None] * pc - sc[..., None] * ps) / det[..., None]
    explained = (coef_sin * ps + coef_cos * pc).sum(-1)
    return explained, torch.stack([coef_sin, coef_cos], -1), torch.stack([mean_sin, mean_cos], -1)


@torch.no_grad()
def fit_sinusoid_params(
    images: torch.Tensor | np.ndarray, pad: int = 2, refine_steps: int = 12, batch_size: int = 4096
) -> dict[str, torch.Tensor]:
    """
    Fit one sinusoid to each image. Returns float64 tensors f, theta (in [0, pi)), phi (in [0, 2 pi)),
    rho (n,) and c0, c1 (n, 3). The model is symmetric under (phi, c0, c1) -> (phi + pi, c1, c0); the fit
    returns the representative with sum(c1 - c0) >= 0 (see canonicalize_params for true parameters).

    >>> images, params = make_sinusoids(4, 32, torch.Generator().manual_seed(0))
    >>> fit = fit_sinusoid_params(images)
    >>> bool(torch.equal(fit["f"].round(), params["f"][:, 0]))
    True
    """
    x = to_unit_images(images)
    if len(x) > batch_size:
        parts = [
            fit_sinusoid_params(x[i : i + batch_size] * 2 - 1, pad, refine_steps, batch_size)
            for i in range(0, len(x), batch_size)
        ]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, size, _ = x.shape
    centred = x - x.mean(dim=(2, 3), keepdim=True)

    # Coarse peak: summed power over channels (a luminance can cancel when c1 - c0 is orthogonal to the
    # luminance weights), zero-padded so oblique waves between integer bins are still found.
    spectrum = torch.view_as_real(torch.fft.rfft2(centred.float(), s=(pad * size, pad * size)))
    power = spectrum.pow(2).sum((1, -1))  # (n, P, P/2+1); float32 is plenty to locate a peak
    power[:, 0, 0] = 0
    peak = power.flatten(1).argmax(1)
    ky, kx = peak // power.shape[-1], peak % power.shape[-1]
    fy = torch.where(ky > pad * size // 2, ky - pad * size, ky).double() / pad  # cycles per image
    fx = kx.double() / pad

    # Pattern search on the least-squares criterion: 3x3 neighbours, halving the step each round.
    step = 1.0 / pad
    offsets = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    for _ in range(refine_steps):
        cand_x, cand_y = fx[:, None] + step * offsets, fy[:, None] + step * offsets
        explained, _, _ = _fit_at(centred, cand_x, cand_y)
        # Near DC the centred sin/cos are nearly collinear with the constant: keep the search away
        # from there, or a flat (e.g. heavily blurred) image gets unbounded colours.
        too_low = torch.hypot(cand_x[:, None, :], cand_y[:, :, None]) < MIN_FREQ
        explained = explained.masked_fill(too_low, -torch.inf)
        best = explained.flatten(1).argmax(1)
        fy, fx = cand_y[torch.arange(n), best // 3], cand_x[torch.arange(n), best % 3]
        step /= 2

    # theta in [0, pi) means the wave vector points into the half-plane fy > 0 (or fy = 0, fx > 0).
    flip = (fy < 0) | ((fy == 0) & (fx < 0))
    fx, fy = torch.where(flip, -fx, fx), torch.where(flip, -fy, fy)
    _, coefs, means = _fit_at(centred, fx[:, None], fy[:, None])
    coefs, means = coefs[:, 0, 0], means[:, 0, 0]  # (n, C, 2), (n, 2)

    # A sin(psi + phi) = A cos(phi) sin(psi) + A sin(phi) cos(psi): the channels share phi, so take the
    # principal axis of the per-channel (sin, cos) coefficients, then each channel's signed amplitude.
    m = torch.einsum("nci,ncj->nij", coefs, coefs)
    phi = 0.5 * torch.atan2(2 * m[:, 0, 1], m[:, 0, 0] - m[:, 1, 1])
    amp = coefs[..., 0] * torch.cos(phi)[:, None] + coefs[..., 1] * torch.sin(phi)[:, None]
    negative = amp.sum(1) < 0
    amp = torch.where(negative[:, None], -amp, amp)
    phi = torch.remainder(torch.where(negative, phi + math.pi, phi), 2 * math.pi)

    # Rank-1 reconstruction and its residual ratio.
    coords = torch.arange(size, dtype=torch.float64)
    psi = (
        2
        * math.pi
        * (fx[:, None, None] * coords[None, None, :] + fy[:, None, None] * coords[None, :, None])
        / size
    )
    wave = torch.sin(psi + phi[:, None, None])  # (n, S, S)
    offset = x.mean(dim=(2, 3)) - amp * wave.mean(dim=(1, 2))[:, None]  # (n, C) = (c0 + c1) / 2
    recon = offset[..., None, None] + amp[..., None, None] * wave[:, None]
    rho = (x - recon).pow(2).sum((1, 2, 3)) / centred.pow(2).sum((1, 2, 3)).clamp_min(1e-12)
    return dict(
        f=torch.hypot(fx, fy), theta=torch.atan2(fy, fx), phi=phi, c0=offset - amp, c1=offset + amp, rho=rho
    )


def canonicalize_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """
    Map true single-component parameters (as from make_sinusoids) to the representative that
    fit_sinusoid_params returns: (phi, c0, c1) -> (phi + pi, c1, c0) when sum(c1 - c0) < 0.
    """
    # make_sinusoids keeps a component axis: f (n, K), c0 (n, K, 3); take the only component.
    f, theta, phi = (params[k] if params[k].ndim == 1 else params[k][:, 0] for k in ("f", "theta", "phi"))
    c0, c1 = (params[k] if params[k].ndim == 2 else params[k][:, 0] for k in ("c0", "c1"))
    swap = (c1 - c0).sum(-1) < 0
    return dict(
        f=f,
        theta=theta,
        phi=torch.remainder(torch.where(swap, phi + math.pi, phi), 2 * math.pi),
        c0=torch.where(swap[:, None], c1, c0),
        c1=torch.where(swap[:, None], c0, c1),
    )


def param_features(fit: dict[str, torch.Tensor]) -> np.ndarray:
    """(n, 11) features [f, cos 2theta, sin 2theta, cos phi, sin phi, c0 (3), c1 (3)]: angles as points on
    the circle (theta has period pi) so that nearby angles across the wrap-around are close."""
    theta, phi = fit["theta"], fit["phi"]
    columns = [
        fit["f"][:, None],
        torch.cos(2 * theta)[:, None],
        torch.sin(2 * theta)[:, None],
        torch.cos(phi)[:, None],
        torch.sin(phi)[:, None],
        fit["c0"],
        fit["c1"],
    ]
    return torch.cat(columns, 1).double().numpy()


def defect_features(fit: dict[str, torch.Tensor]) -> np.ndarray:
    """
    (n, 2) features that are ~0 on real data, on fixed scales (standardising by the real set's ~0 spread
    would blow them up): sqrt(rho / VALID_RHO), which is 1 at the validity threshold and sees noise and
    clutter the parameters do not, and the distance of f to the nearest integer in LATTICE_SCALE units,
    which sees off-lattice frequencies a Gaussian fit of f alone barely notices.
    """
    residual = torch.sqrt(fit["rho"] / VALID_RHO)
    off_lattice = (fit["f"] - fit["f"].round()).abs() / LATTICE_SCALE
    return torch.stack([residual, off_lattice], 1).double().numpy()


def metric_features(
    gen: dict[str, torch.Tensor], real: dict[str, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    """Features of both sets for the set distances: parameters standardised by the real set, then defects."""
    params_gen, params_real = param_features(gen), param_features(real)
    mean, std = params_real.mean(0), params_real.std(0) + 1e-8
    feats_gen = np.concatenate([(params_gen - mean) / std, defect_features(gen)], 1)
    feats_real = np.concatenate([(params_real - mean) / std, defect_features(real)], 1)
    return feats_gen, feats_real


#################################################################################
#                              Set-level comparison                             #
#################################################################################


def compare_fits(
    gen: dict[str, torch.Tensor], real: dict[str, torch.Tensor], mmd_max_samples: int = 2000
) -> dict[str, float]:
    """
    Distances between two fitted sets: Frechet and MMD^2 on metric_features, Wasserstein-1 per parameter
    (f in cycles, theta/phi in radians, c0/c1 averaged over RGB), and the validity rate of the first set.
    """
    feats_gen, feats_real = metric_features(gen, real)
    # MMD^2 is O(N^2) in memory: cap it (deterministically) on large sets.
    mmd = mmd2_unbiased(feats_gen[:mmd_max_samples], feats_real[:mmd_max_samples])
    result = dict(
        frechet=frechet_distance_from_features(feats_gen, feats_real),
        mmd2=mmd,
        validity=float((gen["rho"] < VALID_RHO).double().mean()),
    )
    for key in ("f", "theta", "phi"):
        result[f"w1_{key}"] = wasserstein1(gen[key].numpy(), real[key].numpy())
    for key in ("c0", "c1"):
        result[f"w1_{key}"] = float(
            np.mean(
                [
                    wasserstein1(gen[key][:, c].numpy(), real[key][:, c].numpy())
                    for c in range(gen[key].shape[1])
                ]
            )
        )
    return result


def sinusoid_frechet(gen: torch.Tensor | np.ndarray, real: torch.Tensor | np.ndarray) -> float:
    """
    Frechet distance between the standardised fitted parameters of two image sets.

    >>> real, _ = make_sinusoids(256, 32, torch.Generator().manual_seed(0))
    >>> gen, _ = make_sinusoids(256, 32, torch.Generator().manual_seed(1))
    >>> sinusoid_frechet(gen, real) < sinusoid_frechet(gen.clamp(-0.5, 0.5) + 0.3, real)
    True
    """
    return compare_fits(fit_sinusoid_params(gen), fit_sinusoid_params(real))["frechet"]


class SinusoidMetric:
    """
    Compare generated images with fresh draws from the true sinusoid distribution, reporting each
    distance next to its real-vs-real noise floor at the same N.

    >>> metric = SinusoidMetric(image_size=32, seed=123)
    >>> gen, _ = make_sinusoids(128, 32, torch.Generator().manual_seed(0))
    >>> result = metric(gen)
    >>> sorted(result)[:3]
    ['frechet', 'frechet_floor', 'mmd2']
    """

    def __init__(self, image_size: int = 32, components: int = 1, seed: int = 1234):
        self.image_size = image_size
        self.components = components
        self.seed = seed  # distinct from training seeds, so the reference sets are held out

    def real_fits(self, n: int, which: int) -> dict[str, torch.Tensor]:
        """Fitted parameters of reference set `which` (0 or 1) of n images; fixed given (seed, n)."""
        generator = torch.Generator().manual_seed(self.seed * 2 + which)
        images, _ = make_sinusoids(n, self.image_size, generator, self.components)
        return fit_sinusoid_params(images)

    def __call__(self, gen_images: torch.Tensor | np.ndarray) -> dict[str, float]:
        gen = fit_sinusoid_params(gen_images)
        n = len(gen["f"])
        real, real2 = self.real_fits(n, 0), self.real_fits(n, 1)
        result = compare_fits(gen, real)
        floor = compare_fits(real2, real)
        result.update({f"{k}_floor": v for k, v in floor.items() if k != "validity"})
        result["validity_real"] = floor["validity"]
        result["num_samples"] = n
        return result
