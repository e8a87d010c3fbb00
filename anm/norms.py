"""Per-token activation norms, accumulated in fp32 without keeping an fp32 (or difference) copy."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ddp_compile import ddp_optimizer_refuses_autograd_functions
from .errors import ANMError

__all__ = ["activation_norms", "validate_feature_dim", "REDUCTIONS"]

REDUCTIONS = ("l2", "rms")


class _UpdateNorm(torch.autograd.Function):
    """‖x − minus‖₂ over ``dim``, times ``scale``; backward recomputes the difference.

    Autograd's own ``vector_norm(x - minus)`` would save the difference tensor until backward: one extra
    activation per hooked layer. Here only references to ``x`` and ``minus`` (already alive for the
    network's own backward) and the tiny norm tensor are kept.
    """

    # forward(ctx, ...) rather than a separate setup_context: with setup_context, Function.apply binds
    # the arguments through inspect.signature on every call, which costs more than the norm itself at
    # small sizes (docs/benchmarks.md).
    @staticmethod
    def forward(ctx, x: Tensor, minus: Tensor, scale: float, dim: int) -> Tensor:
        diff = x - minus
        # dtype= upcasts inside the reduction: no fp32 copy, and fp16 squares cannot overflow.
        norm = torch.linalg.vector_norm(diff, dim=dim, dtype=torch.promote_types(diff.dtype, torch.float32))
        if scale != 1.0:
            norm = norm * scale
        ctx.save_for_backward(x, minus, norm)
        ctx.scale, ctx.dim = scale, dim
        return norm

    @staticmethod
    def backward(ctx, grad_norm: Tensor):
        if grad_norm.device.type == "cpu" and not torch.compiler.is_compiling() and not grad_norm.any():
            # Every norm is past the hinge (the usual state once warmed up): a zero gradient costs a
            # recompute, a scale and two accumulations of the full activation; None costs nothing. Only
            # on the CPU, where asking is free; on an accelerator the answer would be a device sync.
            return None, None, None, None
        x, minus, norm = ctx.saved_tensors
        # d(s·‖a‖)/da = s·a/‖a‖ = s²·a/norm; 0 at a = 0 like vector_norm's subgradient (adaLN-Zero blocks
        # start with an update of exactly 0, where a naive a/‖a‖ would be NaN).
        scale2 = ctx.scale * ctx.scale
        coeff = (grad_norm if scale2 == 1.0 else grad_norm * scale2) / norm
        coeff = coeff.masked_fill(norm == 0, 0.0).unsqueeze(ctx.dim)
        if torch.compiler.is_compiling():
            # Written without x − minus: AOTAutograd's partitioner would otherwise save that difference
            # (one activation per block) rather than keep x and minus around for backward. In fp32 at
            # least, so that the cancellation costs ~1e-7·‖x‖/‖x − minus‖ relative, not bf16's 4e-3.
            dtype = torch.promote_types(torch.promote_types(x.dtype, minus.dtype), torch.float32)
            c = coeff.to(dtype)
            grad = x.to(dtype) * c - minus.to(dtype) * c
        else:
            # The difference is a fresh tensor: scale it in place rather than allocate the gradient anew.
            grad = (x - minus).mul_(coeff.to(torch.promote_types(x.dtype, minus.dtype)))
        grad_x = grad.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_minus = grad.neg().to(minus.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_minus, None, None


def activation_norms(x: Tensor, reduce: str = "l2", *, minus: Tensor | None = None, feature_dim: int = -1) -> Tensor:
    """Per-token norm of ``x`` (or of ``x - minus``) over the feature dimension, in fp32 (or fp64).

    The feature dimension is the last one (``(batch, tokens, features)``) unless ``feature_dim`` says
    otherwise: ``feature_dim=1`` for channel-first maps ``(N, C, H, W)``, whose norms are then ``(N, H, W)``.

    ``reduce="l2"`` gives ‖a‖₂; ``reduce="rms"`` gives ‖a‖₂/√D, which is width-independent. The sum of
    squares is accumulated in fp32 even for bf16/fp16 inputs, without materialising an fp32 copy, and
    backward needs no saved copy of ``x - minus`` (it is recomputed), so the memory cost is one fp32
    number per token. The gradient at a zero vector is 0.

    Example:
        >>> import torch
        >>> from anm import activation_norms
        >>> h = torch.full((2, 5, 16), 3.0)           # (batch, tokens, features)
        >>> activation_norms(h).shape, activation_norms(h)[0, 0].item()
        (torch.Size([2, 5]), 12.0)
        >>> activation_norms(h, "rms")[0, 0].item()
        3.0
        >>> activation_norms(h, minus=h).abs().max().item()   # residual update of an identity block
        0.0
        >>> activation_norms(torch.ones(2, 4, 3, 3), feature_dim=1).shape   # channel-first (N, C, H, W)
        torch.Size([2, 3, 3])
    """
    if reduce not in REDUCTIONS:
        raise ANMError(f"unknown reduce {reduce!r}: use 'l2' (‖a‖₂) or 'rms' (‖a‖₂/√D).")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ANMError(
            f"activation_norms needs a floating-point tensor with a feature dim, got {_describe(x)}: "
            "pass the (..., features) activation, or a select= function that returns it."
        )
    validate_feature_dim(feature_dim)
    if not -x.dim() <= feature_dim < x.dim():
        raise ANMError(
            f"feature_dim={feature_dim} is out of range for an activation of shape {tuple(x.shape)}: use -1 "
            "for (..., features) tensors or 1 for channel-first (N, C, ...) maps."
        )
    if x.shape[feature_dim] == 0:
        raise ANMError(f"the activation has no features (shape {tuple(x.shape)}, feature_dim={feature_dim}).")
    if minus is not None and (not isinstance(minus, Tensor) or not minus.is_floating_point()):
        raise ANMError(f"minus= must be a floating-point tensor like x, got {_describe(minus)}.")
    if minus is not None and minus.device != x.device:
        raise ANMError(f"minus= is on {minus.device}, x on {x.device}: pass both on the same device.")
    if minus is not None and minus.shape != x.shape:
        raise ANMError(
            f"cannot take the residual update: output shape {tuple(x.shape)} != input shape "
            f"{tuple(minus.shape)}. Use site='output' for blocks that change the shape."
        )
    return norms_unchecked(x, reduce, minus, feature_dim)


def norms_unchecked(x: Tensor, reduce: str, minus: Tensor | None, feature_dim: int) -> Tensor:
    """:func:`activation_norms` without its argument checks, for the forward hook, whose arguments were
    checked once when the hooks were made (and whose shapes it checks itself)."""
    scale = 1.0 if reduce == "l2" else 1.0 / math.sqrt(x.shape[feature_dim])
    if minus is None:
        # The built-in norm keeps only references to x and the result for backward, and its C++
        # autograd node costs less than a Python Function's (which matters at small sizes).
        norm = torch.linalg.vector_norm(x, dim=feature_dim, dtype=torch.promote_types(x.dtype, torch.float32))
        return norm if scale == 1.0 else norm * scale
    if torch.compiler.is_compiling() and ddp_optimizer_refuses_autograd_functions():
        # torch < 2.6 with DDP: no autograd.Function in the graph (see ddp_compile.py).
        norm = torch.linalg.vector_norm(x - minus, dim=feature_dim, dtype=torch.promote_types(x.dtype, torch.float32))
        return norm if scale == 1.0 else norm * scale
    return _UpdateNorm.apply(x, minus, scale, feature_dim)


def validate_feature_dim(feature_dim: int) -> None:
    """Raise ``ANMError`` unless ``feature_dim`` is an int (-1: features last; 1: channel-first)."""
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int):
        raise ANMError(
            f"feature_dim must be an int (-1 for (..., features) tensors, 1 for channel-first (N, C, H, W) "
            f"maps), got {feature_dim!r}."
        )


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
