"""``ANM(model)``: the one-line regulariser wrapper."""

from __future__ import annotations

import inspect
import sys
from typing import Any

from torch import Tensor, nn

from .errors import ANMError
from .hf_trainer import called_from_hf_trainer, refuse_tied_weights_under_hf_trainer
from .layers import LayerSpec
from .outputs import Select
from .regularizer import NONFINITE, Regularizer

__all__ = ["ANM", "NONFINITE"]


class ANM(nn.Module):
    """Wrap ``model`` so its transformer blocks' activation norms are pushed up to ``alpha``.

    ``ANM(model)(*args, **kwargs)`` returns exactly what ``model`` returns; every training forward with
    autograd on records per-token norms of each hooked block, and :meth:`loss` turns the forwards since
    its last call into ``lam · w(step) · mean relu(1 − ‖a‖/alpha)``, ``w`` a warm-up ramp over optimizer
    steps. Eval and ``no_grad`` forwards record nothing. Attributes fall through to ``model``
    (``wrapped.forward_with_cfg`` works and is recorded too), and ``state_dict()`` / ``load_state_dict()``
    are exactly ``model``'s, whatever its key layout. For trainers that must see the user's own model
    object (HF ``Trainer``, Lightning, accelerate) use :func:`anm.attach` instead: handed to
    ``transformers.Trainer``, a wrapper of a model with tied weights raises ``ANMError`` while Trainer is
    built, since Trainer's checkpoints of it would fail.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import anm
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.mlp = nn.Sequential(nn.Linear(16, 16), nn.GELU())
        ...     def forward(self, x):
        ...         return x + self.mlp(x)
        >>> net = nn.Sequential(*[Block() for _ in range(4)])
        >>> model = anm.ANM(net, reduce="rms", alpha=2.06, lam=10.0, warmup=0)
        >>> out = model(torch.randn(8, 10, 16))
        >>> loss = out.pow(2).mean() + model.loss()
        >>> loss.backward()
        >>> sorted(model.stats())[:3]
        ['anm/frac_below_alpha', 'anm/loss', 'anm/norm/0']
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "auto",  # "auto" = the transformer block list(s); or a glob / class / predicate
        alpha: float = 70.0,  # norm each activation is pushed up to (paper: 70 at D=1152, reduce="l2")
        lam: float = 10.0,  # weight of the term once warmed up (paper: 10)
        warmup: int = 2000,  # optimizer steps of linear ramp of the weight from 0 (0 = none)
        site: str = "update",  # "update" = block output − block input; "output" = block output
        reduce: str = "l2",  # "l2" = ‖a‖₂; "rms" = ‖a‖₂/√D (width-independent alpha)
        objective: str = "hinge",  # "hinge" = relu(1 − ‖a‖/α); "exp" = exp(−‖a‖/α)
        granularity: str = "token",  # hinge on each "token", each "sample"'s mean norm, or the "batch" mean
        warmup_kind: str = "linear",  # "linear" or "cosine" ramp
        select: Select | None = None,  # f(output, hidden_in) -> tensor for blocks with unusual outputs
        nonfinite: str = "raise",  # NaN/inf norms: "raise" naming the layer, "skip" that layer, "propagate"
        feature_dim: int = -1,  # -1: (..., features) activations; 1: channel-first (N, C, H, W) maps
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ANMError(f"ANM wraps an nn.Module, got {type(model).__name__}.")
        regularizer = Regularizer(
            model, layers=layers, alpha=alpha, lam=lam, warmup=warmup, site=site, reduce=reduce,
            objective=objective, granularity=granularity, warmup_kind=warmup_kind, select=select,
            nonfinite=nonfinite, feature_dim=feature_dim,
        )
        self.model = model
        self.regularizer = regularizer
        if type(self).forward is ANM.forward:  # a subclass's own forward keeps its own signature
            # An instance attribute shadows the method: what inspect.signature(wrapped.forward) reads.
            self.forward = _ForwardWithModelSignature(self)
        _register_load_pre_hook(self, _route_keys_to_model)
        self.register_load_state_dict_post_hook(_report_keys_as_model)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped model; ``inspect.signature(wrapped.forward)`` is the model's own ``forward``'s.

        Trainers that keep only the inputs ``forward`` names (HF ``Trainer`` drops every dataset column
        that is not a parameter of it) therefore see the model's parameters, not ``*args, **kwargs``.

        Example:
            >>> import inspect, torch, anm
            >>> class Net(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(2))
            ...     def forward(self, input_ids, labels=None):
            ...         return input_ids
            >>> list(inspect.signature(anm.ANM(Net(), site="output").forward).parameters)
            ['input_ids', 'labels']
        """
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "model" not in modules:
                raise
            if not self.__dict__.get("_trainer_checked") and called_from_hf_trainer(sys._getframe(1)):
                # transformers.Trainer reads the model's attributes while it is built, before any step:
                # refuse there what it could not checkpoint (see hf_trainer.py).
                refuse_tied_weights_under_hf_trainer(modules["model"])
                self.__dict__["_trainer_checked"] = True
            return getattr(modules["model"], name)

    # -- the loss (see Regularizer) ------------------------------------------------------------------
    def loss(self, step: int | None = None) -> Tensor:
        """The ANM term for every training forward since the last call; add it to your loss.

        ``step`` is the optimizer step for the warm-up; without it, the optimizer steps of any
        ``torch.optim`` optimizer holding the model's parameters are counted (gradient accumulation
        included). Returns a 0-dim fp32 tensor, a constant 0 when nothing was recorded (eval / no_grad
        forwards), and forgets what it consumed. Raises ``ANMError`` when a training-mode step recorded
        nothing while torch.compile holds graphs of an enclosing ``forward`` traced before the hooks.

        Example:
            >>> import torch, anm
            >>> from torch import nn
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
            >>> model = anm.ANM(net, site="output", alpha=5.0, warmup=10)
            >>> _ = model(torch.randn(3, 4))
            >>> model.loss(step=5).item() > 0, model.loss().item()   # nothing new recorded
            (True, 0.0)
        """
        return self.regularizer.loss(step)

    def stats(self) -> dict[str, float]:
        """Detached numbers from the last :meth:`loss` call, for logging (see ``Regularizer.stats``).

        Example:
            >>> import torch, anm
            >>> from torch import nn
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
            >>> model = anm.ANM(net, site="output", reduce="rms", alpha=2.0, warmup=0)
            >>> _ = model(torch.randn(3, 4)); _ = model.loss()
            >>> model.stats()["anm/frac_below_alpha"]
            1.0
        """
        return self.regularizer.stats()

    @property
    def step(self) -> int:
        """The optimizer step the next step-less :meth:`loss` uses for the warm-up."""
        return self.regularizer.step

    @property
    def collector(self):  # noqa: ANN201 — ActivationCollector; a property so it never enters state_dict
        """The :class:`ActivationCollector` in use (``.collector.names``: hooked layers)."""
        return self.regularizer.collector

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Exactly ``model.state_dict()``: the wrapper adds no key and no prefix (nested ones included)."""
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Exactly ``model.load_state_dict()``: same keys, same missing / unexpected report."""
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def anm_state_dict(self) -> dict[str, Any]:
        """The wrapper's own resumable state (the warm-up position); model weights are in state_dict().

        Example:
            >>> import anm
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
            >>> anm.ANM(net, site="output").anm_state_dict()
            {'step': 0}
        """
        return self.regularizer.state_dict()

    def load_anm_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`anm_state_dict` returned (resume the warm-up where it was)."""
        self.regularizer.load_state_dict(state)

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the original model."""
        self.close()
        return self.model

    def close(self) -> None:
        """Remove every hook (the wrapper then records nothing). Safe to call twice."""
        self.regularizer.detach()

    def extra_repr(self) -> str:
        return self.regularizer.describe()


class _ForwardWithModelSignature:
    """``ANM.forward`` bound to one wrapper, whose ``__signature__`` is the wrapped model's ``forward``'s.

    ``inspect.signature`` of a bound method reads the class's function, shared by every wrapper; an
    object per wrapper can carry the signature of its own model. An object, not a closure, so that
    ``copy.deepcopy`` / pickle of the wrapper point the copy's forward at the copied wrapper.
    """

    def __init__(self, wrapper: ANM) -> None:
        self.wrapper = wrapper

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return ANM.forward(self.wrapper, *args, **kwargs)

    # Like a bound method's: code that re-binds `module.forward.__func__` to the module (accelerate's
    # mixed-precision wrapper and its unwrap_model) binds the plain ANM.forward, not this object.
    @property
    def __func__(self) -> Any:
        return ANM.forward

    @property
    def __self__(self) -> ANM:
        return self.wrapper

    @property
    def __signature__(self) -> inspect.Signature:
        try:
            return inspect.signature(self.wrapper.model.forward)
        except (TypeError, ValueError):  # a forward without an inspectable signature (a builtin)
            return inspect.signature(ANM.forward).replace(parameters=_VAR_PARAMETERS)


_VAR_PARAMETERS = [
    inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
    inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
]


def _register_load_pre_hook(module: nn.Module, hook: Any) -> Any:
    # Public from torch 2.5 on. Torch 2.4 (the floor) has the same hook under a private name; with
    # with_module=True it is called with the same arguments, the module first.
    if hasattr(nn.Module, "register_load_state_dict_pre_hook"):
        return module.register_load_state_dict_pre_hook(hook)
    return module._register_load_state_dict_pre_hook(hook, with_module=True)


# A wrapper nested in another module is saved through ANM.state_dict (torch recurses by calling it) but
# loaded through torch's own recursion into _modules, where the model sits under "model.". The wrapper has
# no state of its own, so every key under its prefix is the model's: route them all there, and report
# missing / unexpected keys under the names the caller used. No key is judged by what it looks like.
def _route_keys_to_model(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    for key in [key for key in state_dict if key.startswith(prefix)]:
        state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)
    module.__dict__["_loading_prefix"] = prefix


def _report_keys_as_model(module: nn.Module, incompatible_keys: Any) -> None:
    prefix = module.__dict__.pop("_loading_prefix", None)
    if prefix is None:
        return
    inner = prefix + "model."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [prefix + key[len(inner):] if key.startswith(inner) else key for key in keys]
