"""DDP + torch.compile on torch < 2.6: DDPOptimizer refuses the graph ANM's update-site norm makes.

Dynamo traces a ``torch.autograd.Function`` (``norms._UpdateNorm``, the update-site norm that keeps no
difference tensor for backward) as a higher-order op. On torch < 2.6, compiling a model inside
``DistributedDataParallel`` with ``torch._dynamo.config.optimize_ddp`` on (the default) hands the graph to
DDPOptimizer, which splits it into communication buckets and raises on any higher-order op ("DDPOptimizer
backend: Found a higher order op in the graph", pytorch/pytorch#104674): the run would stop at its first
compiled step. In that combination, and only there, the norm is traced from plain differentiable ops
instead, which DDPOptimizer accepts, and a warning says once how to get the lean norm back. The check runs
at trace time (``assume_constant_result``), so it costs nothing per step. This torch (2.13 in CI) has no
such DDPOptimizer: the tests fake the version and an active DDP module.
"""

from __future__ import annotations

import warnings

import torch
from torch.torch_version import TorchVersion

__all__ = ["ddp_optimizer_refuses_autograd_functions"]

# What the check compares; a module attribute so the tests can pretend to be an older torch.
TORCH_VERSION = TorchVersion(torch.__version__)
_FIXED_IN = (2, 6)  # DDPOptimizer passes higher-order ops through from this release on
_warned = False


def _active_ddp_module() -> object | None:
    # DDP sets this while its forward runs, which is when Dynamo traces the wrapped model.
    if not torch.distributed.is_available():
        return None
    from torch.nn.parallel import DistributedDataParallel

    active = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return active() if callable(active) else None


def _optimize_ddp_on() -> bool:
    setting = getattr(torch._dynamo.config, "optimize_ddp", False)
    return setting is True or setting == "ddp_optimizer"


@torch.compiler.assume_constant_result
def ddp_optimizer_refuses_autograd_functions() -> bool:
    """Whether the graph being traced goes to a DDPOptimizer that refuses ``autograd.Function``s.

    True only on torch < 2.6, inside a DDP forward, with ``torch._dynamo.config.optimize_ddp`` on; then it
    warns once, naming ``torch._dynamo.config.optimize_ddp = False``.

    Example:
        >>> from anm.ddp_compile import ddp_optimizer_refuses_autograd_functions
        >>> ddp_optimizer_refuses_autograd_functions()   # no DDP forward running here
        False
    """
    global _warned
    if TORCH_VERSION >= _FIXED_IN or not _optimize_ddp_on() or _active_ddp_module() is None:
        return False
    if not _warned:
        _warned = True
        warnings.warn(
            f"ANM: torch {TORCH_VERSION} compiles DDP models through DDPOptimizer "
            "(torch._dynamo.config.optimize_ddp), which refuses the higher-order op an autograd.Function "
            "becomes in the graph. ANM's update-site norm is traced from plain ops instead, so the run "
            "works, but compiled it may keep one activation per hooked block for backward. For the lean "
            "norm, set torch._dynamo.config.optimize_ddp = False before compiling (DDP then syncs the whole "
            "graph's gradients as one bucket, with less overlap), or use torch >= 2.6.",
            UserWarning,
            stacklevel=2,
        )
    return True
