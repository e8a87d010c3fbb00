"""The ANM objective on per-token norms: function form ``anm_loss`` and module form ``ANMLoss``."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .errors import ANMError
from .schedule import validate_warmup, warmup_weight

__all__ = ["anm_loss", "ANMLoss", "OBJECTIVES", "GRANULARITIES"]

OBJECTIVES = ("hinge", "exp")
GRANULARITIES = ("token", "sample", "batch")


def anm_loss(
    norms: Tensor | Sequence[Tensor],
    alpha: float = 70.0,
    lam: float = 10.0,
    objective: str = "hinge",
    weight: float | Tensor = 1.0,
    granularity: str = "token",
) -> Tensor:
    """ANM term ``lam · weight · mean(φ(n / alpha))`` over every norm ``n`` given.

    ``objective="hinge"``: φ(r) = relu(1 − r), zero once a norm reaches ``alpha``.
    ``objective="exp"``: φ(r) = exp(−r), never exactly zero.
    ``norms`` is one tensor or a sequence of per-layer tensors whose first dim is the batch (as returned
    by :func:`activation_norms`). ``granularity`` says what the hinge looks at: each ``"token"``'s norm,
    each sample's mean norm over its tokens (``"sample"``), or each tensor's mean norm (``"batch"``).
    The mean runs over all of those values together (layers × samples × tokens for ``"token"``).

    Example:
        >>> import torch
        >>> from anm import anm_loss
        >>> norms = torch.tensor([[35.0, 70.0, 140.0]])       # one sample, three tokens
        >>> anm_loss(norms, alpha=70.0, lam=10.0)              # 10 · mean(0.5, 0, 0)
        tensor(1.6667)
        >>> anm_loss([norms, norms], alpha=70.0, lam=10.0, weight=0.5)
        tensor(0.8333)
    """
    validate_loss_args(alpha, lam, objective, granularity)
    _validate_weight(weight)
    if norms is None or isinstance(norms, (str, bytes, Mapping)) or not isinstance(norms, (Tensor, Iterable)):
        raise ANMError(
            f"norms must be a tensor or a list of tensors, got {type(norms).__name__}: pass "
            "activation_norms(...) / collector.norms() / hidden_state_norms(...) output."
        )
    tensors = [norms] if isinstance(norms, Tensor) else list(norms)
    for tensor in tensors:
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            kind = f"a {tensor.dtype} tensor" if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ANMError(f"norms must be floating-point tensors, got {kind}: pass activation_norms(...) output.")
    tensors = [tensor for tensor in tensors if tensor.numel() > 0]  # an empty batch adds no term
    if not tensors:
        return torch.zeros(())
    return anm_term(granular_values(tensors, granularity), alpha, objective, lam * weight)


def granular_values(norms: Sequence[Tensor], granularity: str) -> Tensor:
    """The values the hinge looks at, one flat tensor: every token's norm, each sample's or each tensor's mean."""
    return torch.cat([_granular(n, granularity) for n in norms])


def anm_term(values: Tensor, alpha: float, objective: str, scale: float | Tensor) -> Tensor:
    """``scale · mean φ(values / alpha)``: :func:`anm_loss` on checked arguments (``scale`` = λ · weight)."""
    ratio = values.to(torch.promote_types(values.dtype, torch.float32)) / alpha
    per_value = torch.relu(1.0 - ratio) if objective == "hinge" else torch.exp(-ratio)
    return scale * per_value.mean()


def _validate_weight(weight: object) -> None:
    if isinstance(weight, Tensor):
        if weight.numel() != 1 or not weight.is_floating_point():
            raise ANMError(
                f"weight must be a number or a one-element float tensor, got a {weight.dtype} tensor of shape "
                f"{tuple(weight.shape)} (use warmup_weight())."
            )
        # Its value is checked where reading it is free: on the CPU, in eager code (a traced check would
        # break the graph on a data-dependent branch).
        if weight.device.type == "cpu" and not torch.compiler.is_compiling():
            if not (torch.isfinite(weight).all() and (weight >= 0).all()):
                raise ANMError(f"weight must be finite and >= 0, got {weight.item()} (use warmup_weight()).")
        return
    if torch.compiler.is_compiling():
        # In traced code a number may be a SymFloat (the warm-up weight of a step made dynamic), whose
        # value exists at run time only: checking it would add a guard or break the graph.
        return
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight) or weight < 0:
        raise ANMError(f"weight must be a finite number >= 0, got {weight!r} (use warmup_weight()).")


def _granular(norms: Tensor, granularity: str) -> Tensor:
    if granularity == "token" or norms.dim() == 0:
        return norms.reshape(-1)
    if granularity == "sample":
        return norms.reshape(norms.shape[0], -1).mean(dim=1)
    return norms.mean().reshape(1)


def validate_loss_args(alpha: float, lam: float, objective: str, granularity: str = "token") -> None:
    """Raise ``ANMError`` naming the fix for an invalid α, λ, objective or granularity."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ANMError(
            f"alpha must be a finite number > 0: it is the norm the hinge pushes up to (paper: 70 for "
            f"SiT-XL/2 with reduce='l2'), got {alpha!r}."
        )
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ANMError(f"lam must be a finite number >= 0 (paper: 10; 0 switches ANM off), got {lam!r}.")
    if objective not in OBJECTIVES:
        raise ANMError(f"unknown objective {objective!r}: use one of {', '.join(OBJECTIVES)}.")
    if granularity not in GRANULARITIES:
        raise ANMError(f"unknown granularity {granularity!r}: use one of {', '.join(GRANULARITIES)}.")


class ANMLoss(nn.Module):
    """Module form of :func:`anm_loss` that also owns the warm-up: ``ANMLoss(...)(norms, step)``.

    Use it in your own loop with norms you collect yourself (e.g. from an :class:`ActivationCollector`).
    ``step`` is the optimizer step (the same for every micro-batch of an accumulated step); without it
    the term is at full weight.

    Example:
        >>> import torch
        >>> from anm import ANMLoss
        >>> criterion = ANMLoss(alpha=70.0, lam=10.0, warmup=100)
        >>> norms = torch.full((4, 16), 35.0)
        >>> criterion(norms, step=50)                      # weight 0.5 · 10 · relu(1 − 0.5)
        tensor(2.5000)
    """

    def __init__(
        self,
        alpha: float = 70.0,  # norm the hinge pushes each activation up to
        lam: float = 10.0,  # weight of the term once warmed up
        warmup: int = 2000,  # optimizer steps of linear ramp from 0 to lam (0 = none)
        objective: str = "hinge",  # "hinge" or "exp"
        granularity: str = "token",  # "token", "sample" or "batch"
        warmup_kind: str = "linear",  # "linear" or "cosine"
    ) -> None:
        super().__init__()
        validate_loss_args(alpha, lam, objective, granularity)
        validate_warmup(warmup, warmup_kind)
        self.alpha, self.lam, self.warmup = float(alpha), float(lam), warmup
        self.objective, self.granularity, self.warmup_kind = objective, granularity, warmup_kind

    def forward(self, norms: Tensor | Sequence[Tensor], step: int | None = None) -> Tensor:
        weight = 1.0 if step is None else warmup_weight(step, self.warmup, self.warmup_kind)
        return anm_loss(norms, self.alpha, self.lam, self.objective, weight, self.granularity)

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, lam={self.lam}, warmup={self.warmup}, objective={self.objective!r}, "
            f"granularity={self.granularity!r}"
        )
