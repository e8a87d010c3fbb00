"""``ANM(model)``: the one-line regulariser wrapper."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .collector import ActivationCollector, Select
from .errors import ANMError
from .layers import LayerSpec
from .loss import anm_loss, validate_loss_args
from .schedule import validate_warmup, warmup_weight

__all__ = ["ANM", "NONFINITE"]

NONFINITE = ("raise", "skip", "propagate")


class ANM(nn.Module):
    """Wrap ``model`` so its transformer blocks' activation norms are pushed up to ``alpha``.

    ``ANM(model)(*args, **kwargs)`` returns exactly what ``model`` returns; every training forward with
    autograd on records per-token norms of each hooked block, and :meth:`loss` turns the forwards since
    its last call into ``lam · w(step) · mean relu(1 − ‖a‖/alpha)``, ``w`` a warm-up ramp. Eval and
    ``no_grad`` forwards record nothing. Attributes fall through to ``model`` (``wrapped.forward_with_cfg``
    works and is recorded too), and ``state_dict()`` has exactly ``model.state_dict()``'s keys.

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
        >>> model = anm.ANM(net, alpha=70.0, lam=10.0, warmup=0)
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
        warmup: int = 2000,  # steps of linear ramp of the weight from 0 (0 = none)
        site: str = "update",  # "update" = block output − block input; "output" = block output
        reduce: str = "l2",  # "l2" = ‖a‖₂; "rms" = ‖a‖₂/√D (width-independent alpha)
        objective: str = "hinge",  # "hinge" = relu(1 − ‖a‖/α); "exp" = exp(−‖a‖/α)
        granularity: str = "token",  # hinge on each "token", each "sample"'s mean norm, or the "batch" mean
        warmup_kind: str = "linear",  # "linear" or "cosine" ramp
        select: Select | None = None,  # f(output, hidden_in) -> tensor for blocks with unusual outputs
        nonfinite: str = "raise",  # NaN/inf norms: "raise" naming the layer, "skip" that layer, "propagate"
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ANMError(f"ANM wraps an nn.Module, got {type(model).__name__}.")
        validate_loss_args(alpha, lam, objective, granularity)
        validate_warmup(warmup, warmup_kind)
        if nonfinite not in NONFINITE:
            raise ANMError(f"unknown nonfinite={nonfinite!r}: use one of {', '.join(NONFINITE)}.")
        self.model = model
        self.alpha, self.lam, self.warmup, self.warmup_kind = float(alpha), float(lam), warmup, warmup_kind
        self.objective, self.granularity, self.nonfinite = objective, granularity, nonfinite
        self.collector = ActivationCollector(
            model, layers=layers, site=site, reduce=reduce, select=select, training_only=True
        )
        self.step = 0  # warm-up position: number of loss() calls so far unless step= is passed
        self._last: dict[str, Any] | None = None
        self._pending_check: tuple[Tensor, Any] | None = None  # (host flag, CUDA event) of the last loss()
        _install_state_dict_passthrough(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if modules is None or "model" not in modules:
                raise
            return getattr(modules["model"], name)

    # -- the loss ------------------------------------------------------------------------------------
    def loss(self, step: int | None = None) -> Tensor:
        """The ANM term for every training forward since the last call; add it to your loss.

        ``step`` is the optimizer step for the warm-up; by default the number of earlier ``loss()`` calls
        (pass it explicitly with gradient accumulation). Returns a 0-dim fp32 tensor, a constant 0 when
        nothing was recorded (eval / no_grad forwards), and forgets what it consumed. Raises ``ANMError``
        when a training-mode step recorded nothing while torch.compile holds graphs of an enclosing
        ``forward``: such a graph was traced before the hooks existed and skips them.

        Example:
            >>> import torch, anm
            >>> from torch import nn
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
            >>> model = anm.ANM(net, site="output", alpha=5.0, warmup=10)
            >>> _ = model(torch.randn(3, 4))
            >>> model.loss(step=5).item() > 0, model.loss().item()   # nothing new recorded
            (True, 0.0)
        """
        self._raise_on_pending_nonfinite()  # the previous step's queued check, before _last is replaced
        records = self.collector.pop()
        if not records:
            self._refuse_stale_compiled_graph()
        if step is None:
            step = self.step
        weight = warmup_weight(step, self.warmup, self.warmup_kind)
        self.step = int(step) + 1
        if records and self.nonfinite != "propagate":
            records = self._check_finite(records)
        if not records:
            self._last = {"weight": weight, "loss": None, "records": []}
            return torch.zeros((), device=self._device())
        norms = [norms for _, norms in records]
        loss = anm_loss(norms, self.alpha, self.lam, self.objective, weight, self.granularity)
        self._last = {
            "weight": weight,
            "loss": loss.detach(),
            "records": [(index, norms.detach()) for index, norms in records],
        }
        return loss

    def stats(self) -> dict[str, float]:
        """Detached numbers from the last :meth:`loss` call, for logging.

        Keys: ``anm/loss``, ``anm/weight``, ``anm/step``, ``anm/frac_below_alpha`` (share of norms under
        ``alpha``) and ``anm/norm/<layer>`` (mean norm of each hooked layer). Empty before the first call.

        Example:
            >>> import torch, anm
            >>> from torch import nn
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
            >>> model = anm.ANM(net, site="output", warmup=0)
            >>> _ = model(torch.randn(3, 4)); _ = model.loss()
            >>> model.stats()["anm/frac_below_alpha"]
            1.0
        """
        self._raise_on_pending_nonfinite()
        if self._last is None:
            return {}
        stats = {"anm/weight": float(self._last["weight"]), "anm/step": float(self.step - 1)}
        records = self._last["records"]
        if not records:
            return stats
        names = self.collector.names
        by_layer: dict[int, list[Tensor]] = {}
        for index, norms in records:
            by_layer.setdefault(index, []).append(norms.reshape(-1))
        every = torch.cat([norms.reshape(-1) for _, norms in records])
        summary = torch.stack(
            [self._last["loss"].float(), (every < self.alpha).float().mean()]
            + [torch.cat(chunks).mean() for chunks in by_layer.values()]
        )
        loss_value, below, *layer_means = summary.tolist()  # one device sync for all of them
        stats["anm/loss"] = loss_value
        stats["anm/frac_below_alpha"] = below
        for index, mean in zip(by_layer, layer_means, strict=True):
            stats[f"anm/norm/{names[index]}"] = mean
        return stats

    # -- state ---------------------------------------------------------------------------------------
    def anm_state_dict(self) -> dict[str, Any]:
        """The wrapper's own resumable state (the warm-up position); model weights are in state_dict().

        Example:
            >>> import anm
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
            >>> anm.ANM(net, site="output").anm_state_dict()
            {'step': 0}
        """
        return {"step": self.step}

    def load_anm_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`anm_state_dict` returned (resume the warm-up where it was)."""
        if "step" not in state:
            raise ANMError("ANM state has no 'step': pass what anm_state_dict() returned.")
        self.step = int(state["step"])

    def unwrap(self) -> nn.Module:
        """Remove every hook and return the original model."""
        self.close()
        return self.model

    def close(self) -> None:
        """Remove every hook (the wrapper then records nothing). Safe to call twice."""
        self.collector.remove()

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.collector.layers)}, alpha={self.alpha}, lam={self.lam}, warmup={self.warmup}, "
            f"site={self.collector.site!r}, reduce={self.collector.reduce!r}, objective={self.objective!r}, "
            f"granularity={self.granularity!r}"
        )

    # -- helpers -------------------------------------------------------------------------------------
    def _refuse_stale_compiled_graph(self) -> None:
        # Nothing recorded is normal after eval or no_grad forwards. In training mode it is what a graph
        # compiled before the hooks existed looks like: the loss would silently stay 0 for the whole run.
        if not (self.model.training and torch.is_grad_enabled()):
            return
        stale = self.collector.compiled_without_hooks()
        if stale:
            raise ANMError(
                f"no activations were recorded although the model is in training mode, and torch.compile "
                f"holds compiled graphs of {', '.join(stale)}.forward: a graph traced before ANM's hooks "
                "existed (for this model or another instance of its class) is reused without them, since "
                "Dynamo does not guard on module hooks. Call torch.compiler.reset() after creating "
                "anm.ANM(...) (compiled code then recompiles with the hooks), or wrap before compiling. "
                "(If this step's forwards all ran under torch.no_grad() on purpose, skip loss() for it.)"
            )

    def _device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")

    def _check_finite(self, records: list[tuple[int, Tensor]]) -> list[tuple[int, Tensor]]:
        all_finite = torch.isfinite(torch.cat([norms.reshape(-1) for _, norms in records]).sum())
        if all_finite.device.type == "cuda" and self.nonfinite == "raise":
            # No device sync on the training step's hot path: the flag is copied to the host in the
            # background and read by the next loss() or stats() call, which then names the layers.
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(all_finite, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending_check = (host, done)
            return records
        if bool(all_finite):  # free on the CPU; "skip" needs the answer now on any device
            return records
        finite = self._finite_per_record(records)
        if self.nonfinite == "raise":
            raise self._nonfinite_error(records, finite, when="")
        bad = self._bad_layers(records, finite)
        warnings.warn(f"ANM: skipping non-finite norms of layer(s) {bad} this step.", stacklevel=3)
        return [record for record, ok in zip(records, finite, strict=True) if ok]

    def _raise_on_pending_nonfinite(self) -> None:
        if self._pending_check is None:
            return
        (host, done), self._pending_check = self._pending_check, None
        done.synchronize()  # waits for the previous step's flag only, not for work queued since
        if not bool(host):
            records = self._last["records"]
            raise self._nonfinite_error(records, self._finite_per_record(records), when=f" at step {self.step - 1}")

    @staticmethod
    def _finite_per_record(records: list[tuple[int, Tensor]]) -> list[bool]:
        return torch.stack([torch.isfinite(norms).all() for _, norms in records]).tolist()

    def _bad_layers(self, records: list[tuple[int, Tensor]], finite: list[bool]) -> list[str]:
        return sorted({self.collector.names[index] for (index, _), ok in zip(records, finite, strict=True) if not ok})

    def _nonfinite_error(self, records: list[tuple[int, Tensor]], finite: list[bool], when: str) -> ANMError:
        return ANMError(
            f"non-finite activation norms (NaN/inf){when} in layer(s) {self._bad_layers(records, finite)}: the "
            "model itself diverged there (lower the learning rate, check inputs / mixed precision), or pass "
            "nonfinite='skip' to leave such layers out of the ANM term for that step."
        )


def _install_state_dict_passthrough(wrapper: nn.Module) -> None:
    """Make ``wrapper.state_dict()`` read and load exactly the wrapped model's keys (no ``model.``)."""

    def strip(module, state_dict, prefix, local_metadata):
        inner = prefix + "model."
        for key in [key for key in state_dict if key.startswith(inner)]:
            state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:
            for key in [key for key in metadata if key == inner[:-1] or key.startswith(inner)]:
                metadata[prefix + key[len(inner) :]] = metadata.pop(key)

    def add(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        inner = prefix + "model."
        for key in [key for key in state_dict if key.startswith(prefix) and not key.startswith(inner)]:
            state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)

    if hasattr(wrapper, "register_state_dict_post_hook"):
        wrapper.register_state_dict_post_hook(strip)
    else:  # torch < 2.5
        wrapper._register_state_dict_hook(strip)
    wrapper.register_load_state_dict_pre_hook(add)
