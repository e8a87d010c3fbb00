"""Tolerances for tests that compare two orders of the same float32 computation (micro-batches against one
batch, two ranks against one, a checkpointed backward against a plain one, compiled against eager).

Which order a CPU's kernels sum in depends on its vector width (AVX2, AVX-512) and the library build, so a
tolerance fitted to one machine fails on another. These follow from the computation instead:

- A float32 sum of n terms computed in two orders differs by at most about n * 2**-24 * sum(|terms|) (the
  classical bound; in practice far less). A tensor of such sums is compared against its own scale,
  ``max |expected|``, not elementwise: an element that is itself rounding noise (a near-zero gradient) has no
  meaningful relative error.
- Adam divides every gradient element by its own running RMS. An element whose gradient is within rounding
  of zero takes a step whose sign and size are rounding noise too: up to ``lr * (1 - beta1) / sqrt(1 - beta2)``
  per step with bias correction (about 3.2 * lr at the default betas; exactly lr at step 1) in either
  direction. Weights after ``steps`` Adam steps from one initialisation therefore agree to rounding almost
  everywhere, while a few elements may differ by up to twice that bound per step. A real difference (a
  micro-batch left out, a wrong scale) moves most elements, which is what the check catches.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

FLOAT32_EPS = 2.0**-24  # unit roundoff of float32
ADAM_BETAS = (0.9, 0.999)


def assert_same_sums(actual: torch.Tensor, expected: torch.Tensor, *, terms: int = 1024, msg: str = "") -> None:
    """``actual`` and ``expected`` are float32 results of the same sums of at most ``terms`` terms each, taken
    in different orders: every element agrees to ``terms * eps * max |expected|`` (at least 1e-6 relative).

    >>> assert_same_sums(torch.ones(3), torch.ones(3) + 1e-7)
    """
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    atol = max(terms * FLOAT32_EPS, 1e-6) * max(scale, 1e-12)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol, msg=msg or None)


def adam_step_bound(lr: float, betas: tuple[float, float] = ADAM_BETAS) -> float:
    """The largest move of one weight in one bias-corrected Adam(W) step (weight decay aside).

    >>> round(adam_step_bound(1e-4) / 1e-4, 2)
    3.16
    """
    return lr * max(1.0, (1 - betas[0]) / math.sqrt(1 - betas[1]))


def assert_same_adam_training(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], *,
                              lr: float, steps: int, outlier_fraction: float = 1e-3, rtol: float = 1e-5,
                              atol: float = 1e-6) -> None:
    """Two state dicts after ``steps`` Adam(W) steps (lr ``lr``) from the same initialisation, with gradients
    summed in different orders: every element within Adam's step bound (2 * bound per step), and all but
    ``outlier_fraction`` of the elements (at least one) within float32 rounding (``rtol``, ``atol``).

    >>> w = {"w": torch.zeros(1000)}
    >>> assert_same_adam_training(w, {"w": torch.zeros(1000).index_fill(0, torch.tensor([3]), 1e-4)},
    ...                           lr=1e-4, steps=1)
    """
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    bound = 2 * steps * adam_step_bound(lr) * (1 + 1e-3)
    total = outliers = 0
    worst = ("", 0.0)
    for key, want in expected.items():
        got = actual[key]
        assert got.shape == want.shape and got.dtype == want.dtype, key
        if not want.is_floating_point():
            assert torch.equal(got, want), key
            continue
        diff = (got.double() - want.double()).abs()
        outside = diff > atol + rtol * want.double().abs()
        total += want.numel()
        outliers += int(outside.sum())
        if diff.numel() and diff.max().item() > worst[1]:
            worst = (key, diff.max().item())
    assert worst[1] <= bound, f"{worst[0]} moved {worst[1]:.3g} apart, more than {steps} Adam steps can ({bound:.3g})"
    allowed = max(1, int(outlier_fraction * total))
    assert outliers <= allowed, (f"{outliers} of {total} weights differ beyond float32 rounding (at most {allowed} "
                                 f"may: those whose gradient is rounding noise); the largest: {worst}")
