"""``anm.attach(model)``: ANM's hooks on the user's own model object, and the loss they feed."""

from __future__ import annotations

import math
import weakref
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from .collector import ActivationCollector
from .errors import ANMError
from .host_flag import HostFlag
from .layers import LayerSpec
from .loss import anm_term, granular_values, validate_loss_args
from .outputs import Select
from .schedule import validate_step, validate_warmup, warmup_weight
from .steps import OptimizerStepCounter
from .warn import warn

__all__ = ["Regularizer", "attach", "NONFINITE"]

NONFINITE = ("raise", "skip", "propagate")
# The paper's α is an L2 norm at SiT widths (SiT-S 384 ... SiT-XL 1152): far outside, it asks for a very
# different per-feature RMS, and our own small-width runs found it harmful (docs/results.md).
PAPER_ALPHA, PAPER_WIDTH = 70.0, 1152
_PAPER_WIDTH_RANGE = (192, 2304)  # half the narrowest to twice the widest SiT
# step-less loss() calls without an optimizer step of the model before we say the clock may not run.
_CALLS_WITHOUT_STEP_WARNING = 64
# training-mode loss() calls in a row that found nothing recorded before we say the hooks never run.
_EMPTY_TRAINING_CALLS_WARNING = 3


class Regularizer:
    """ANM hooks on ``model``'s blocks and the loss they feed; ``model`` itself stays as it was.

    Made by :func:`attach`. ``loss(step)`` turns the training forwards since its last call into
    ``lam · w(step) · mean relu(1 − ‖a‖/alpha)``, ``w`` the warm-up ramp over optimizer steps. The model
    object, its class, ``state_dict()`` and ``save_pretrained`` are untouched, which is what trainers
    that own the model (HF ``Trainer``, Lightning, accelerate) need.

    Example:
        >>> import torch, anm
        >>> from torch import nn
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.GELU()) for _ in range(3)])
        >>> reg = anm.attach(net, site="output", reduce="rms", alpha=2.0, warmup=0)
        >>> out = net(torch.randn(4, 10, 16))            # the model is called as before
        >>> (out.pow(2).mean() + reg.loss()).backward()
        >>> reg.stats()["anm/weight"], type(net).__name__
        (1.0, 'Sequential')
        >>> reg.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "auto",
        alpha: float = 70.0,
        lam: float = 10.0,
        warmup: int = 2000,
        site: str = "update",
        reduce: str = "l2",
        objective: str = "hinge",
        granularity: str = "token",
        warmup_kind: str = "linear",
        select: Select | None = None,
        nonfinite: str = "raise",
        feature_dim: int = -1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ANMError(f"ANM attaches to an nn.Module, got {type(model).__name__}.")
        validate_loss_args(alpha, lam, objective, granularity)
        validate_warmup(warmup, warmup_kind)
        if nonfinite not in NONFINITE:
            raise ANMError(f"unknown nonfinite={nonfinite!r}: use one of {', '.join(NONFINITE)}.")
        self.model = model
        self.alpha, self.lam, self.warmup, self.warmup_kind = float(alpha), float(lam), warmup, warmup_kind
        self.objective, self.granularity, self.nonfinite = objective, granularity, nonfinite
        self.collector = ActivationCollector(
            model, layers=layers, site=site, reduce=reduce, select=select, training_only=True,
            feature_dim=feature_dim,
        )
        self._steps = OptimizerStepCounter(model)
        self._release_when_dropped()
        self._offset = 0  # step = optimizer steps counted + offset (set by an explicit step or a resume)
        self._clock_set = False  # the user gave the step (loss(step=...) or load_state_dict): trust it
        self._resume_checked = False
        self._last_step: int | None = None
        self._calls_without_step = 0
        self._count_at_last_call = 0
        self._empty_training_calls = 0
        self._ever_recorded = False
        self._stale_check_warned = False
        self._width_checked = False
        self._last: dict[str, Any] | None = None
        self._last_loss: Tensor | None = None
        self._host_flag: HostFlag | None = None  # the last loss()'s all-finite flag, on its way to the host

    def _release_when_dropped(self) -> None:
        # A regulariser nobody holds any more must not leave hooks behind that record forever and make
        # the next attach() refuse the model: its hooks go with it.
        self._finalizer = weakref.finalize(self, _release, self.collector, self._steps)
        self._finalizer.atexit = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_finalizer"]
        # The original's last step; its CUDA event and pinned buffer.
        state["_last"], state["_last_loss"], state["_host_flag"] = None, None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy of a wrapped model (copy.deepcopy, pickle) gets its own live hooks and step clock.
        self.__dict__.update(state)
        self.collector.active = bool(self.collector._handles)
        self._release_when_dropped()

    @property
    def names(self) -> list[str]:
        """Names of the hooked layers."""
        return self.collector.names

    @property
    def step(self) -> int:
        """The optimizer step the next step-less :meth:`loss` uses for the warm-up."""
        return self._steps.count + self._offset

    # -- the loss ------------------------------------------------------------------------------------
    def loss(self, step: int | None = None) -> Tensor:
        """The ANM term for every training forward since the last call; add it to your loss.

        ``step`` is the optimizer step for the warm-up (HF ``state.global_step``, Lightning
        ``global_step``). Without it, the optimizer steps of any ``torch.optim`` optimizer holding the
        model's parameters are counted, so gradient accumulation needs nothing special. Returns a 0-dim
        fp32 tensor, a constant 0 when nothing was recorded (eval / no_grad forwards), and forgets what it
        consumed.

        Example:
            >>> import torch, anm
            >>> from torch import nn
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
            >>> reg = anm.attach(net, site="output", alpha=5.0, warmup=10)
            >>> _ = net(torch.randn(3, 4))
            >>> reg.loss(step=5).item() > 0, reg.loss().item()   # nothing new recorded
            (True, 0.0)
        """
        if torch.compiler.is_compiling():
            # Called inside a compiled function: the bookkeeping is Python whose values change every step
            # (the step, the warm-up weight, counters); traced, each new value would specialise a new graph
            # (a float weight does on torch < 2.6) until Dynamo's recompile limit sends the frame back to
            # eager. It runs eagerly instead (one graph break), and the weight enters the graph as a tensor.
            records, flat, scale = _consume_eagerly(self, step)
        else:
            records, flat, weight = self._consume(step)
            scale = self.lam * weight
        if flat is None:
            return torch.zeros((), device=self._device())
        values = flat if self.granularity == "token" else granular_values([n for _, n in records], self.granularity)
        loss = anm_term(values, self.alpha, self.objective, scale)
        # An attribute of its own, not an entry of _last: compiled code that wrote into that dict would
        # guard on everything in it, the weight included, and recompile every step.
        self._last_loss = loss.detach()
        return loss

    def _consume(self, step: int | None) -> tuple[list[tuple[int, Tensor]], Tensor | None, float]:
        """Everything loss() does besides the arithmetic: take the records, move the clock, check them.

        Returns the records, all their norms in one flat tensor (``None`` when there are none) and the
        warm-up weight. The flat tensor serves the finite check, the hinge (``granularity="token"``) and
        ``stats()`` alike: one concatenation per step.
        """
        self._raise_on_pending_nonfinite()  # the previous step's queued check, before _last is replaced
        records = self.collector.pop()
        if not records:
            self._refuse_stale_compiled_graph()
            self._warn_once_if_hooks_never_run()
        else:
            self._empty_training_calls, self._ever_recorded = 0, True
        step = self._resolve_step(step, recorded=bool(records))
        weight = warmup_weight(step, self.warmup, self.warmup_kind)
        self._last_step = step
        flat = torch.cat([norms.reshape(-1) for _, norms in records]) if records else None
        if flat is not None and self.nonfinite != "propagate":
            records, flat = self._check_finite(records, flat)
        if records:
            self._warn_once_if_alpha_misfits_width()
        # Detached once, as a whole: stats() splits it per record when asked (on logging steps only).
        self._last = {
            "weight": weight,
            "flat": None if flat is None else flat.detach(),
            "layout": [(index, norms.numel()) for index, norms in records],
        }
        self._last_loss = None
        return records, flat, weight

    def _last_records(self) -> list[tuple[int, Tensor]]:
        """The last loss()'s records, detached: views of its flat tensor."""
        if self._last is None or self._last["flat"] is None:
            return []
        layout = self._last["layout"]
        parts = self._last["flat"].split([size for _, size in layout])
        return [(index, part) for (index, _), part in zip(layout, parts, strict=True)]

    def stats(self) -> dict[str, float]:
        """Detached numbers from the last :meth:`loss` call, for logging.

        Keys: ``anm/loss``, ``anm/weight``, ``anm/step``, ``anm/frac_below_alpha`` (share of norms under
        ``alpha``) and ``anm/norm/<layer>`` (mean norm of each hooked layer). Empty before the first call.

        Example:
            >>> import torch, anm
            >>> from torch import nn
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.Tanh()) for _ in range(2)])
            >>> reg = anm.attach(net, site="output", reduce="rms", alpha=2.0, warmup=0)
            >>> _ = net(torch.randn(3, 4)); _ = reg.loss()
            >>> reg.stats()["anm/frac_below_alpha"]
            1.0
        """
        self._raise_on_pending_nonfinite()
        if self._last is None:
            return {}
        stats = {"anm/weight": float(self._last["weight"]), "anm/step": float(self._last_step)}
        records = self._last_records()
        if not records:
            return stats
        by_layer: dict[int, list[Tensor]] = {}
        for index, norms in records:
            by_layer.setdefault(index, []).append(norms)
        summary = torch.stack(
            [self._last_loss.float(), (self._last["flat"] < self.alpha).float().mean()]
            + [torch.cat(chunks).mean() for chunks in by_layer.values()]
        )
        loss_value, below, *layer_means = summary.tolist()  # one device sync for all of them
        stats["anm/loss"] = loss_value
        stats["anm/frac_below_alpha"] = below
        for index, mean in zip(by_layer, layer_means, strict=True):
            stats[f"anm/norm/{self.names[index]}"] = mean
        return stats

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The resumable state: the warm-up position (optimizer steps so far). Model weights are not here.

        Example:
            >>> import anm
            >>> from torch import nn
            >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)))
            >>> anm.attach(net, site="output").state_dict()
            {'step': 0}
        """
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (resume the warm-up where it was)."""
        if not isinstance(state, dict) or "step" not in state:
            raise ANMError("ANM state has no 'step': pass what state_dict() / anm_state_dict() returned.")
        self._offset = validate_step(state["step"]) - self._steps.count
        self._clock_set = True

    def detach(self) -> None:
        """Remove every hook and stop counting steps (the model then trains without ANM). Safe to call twice."""
        self.collector.remove()
        self._steps.stop()

    close = detach

    def __enter__(self) -> Regularizer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"Regularizer({self.describe()})"

    def describe(self) -> str:
        """The settings in one line (what ``repr`` shows)."""
        return (
            f"layers={len(self.collector.layers)}, alpha={self.alpha}, lam={self.lam}, warmup={self.warmup}, "
            f"site={self.collector.site!r}, reduce={self.collector.reduce!r}, objective={self.objective!r}, "
            f"granularity={self.granularity!r}"
        )

    # -- helpers -------------------------------------------------------------------------------------
    def _resolve_step(self, step: int | None, recorded: bool) -> int:
        self._steps.arm()  # the next optimizer step of the model's parameters is one more step
        if step is not None:
            step = validate_step(step)
            self._offset = step - self._steps.count  # later step-less calls go on counting from here
            self._clock_set = True
            self._calls_without_step = 0
            return step
        if recorded:  # an eval loop calling loss() on nothing is no training step
            self._count_calls_without_optimizer_steps()
        self._warn_once_if_optimizer_says_resumed()
        return self.step

    def _warn_once_if_optimizer_says_resumed(self) -> None:
        # A resumed run that restores model and optimizer but not this state restarts the warm-up at 0;
        # the optimizer's own step count (Adam's state[p]["step"]) shows it. Checked once, at the first
        # optimizer step counted; an explicit step or load_state_dict() is the user's word and is trusted.
        seen = self._steps.first_step_seen
        if self._resume_checked or self._clock_set or seen is None:
            return
        self._resume_checked = True
        optimizer_steps, ours = seen  # without _clock_set the offset is 0: our clock is the count
        if optimizer_steps == ours:
            return
        warn(
            f"ANM: the optimizer of the model's parameters has taken {optimizer_steps} steps (its state says so), "
            f"but ANM's warm-up clock counted {ours}: the run was resumed without ANM's own state, so the "
            f"warm-up restarted from 0. Restore it with reg.load_state_dict(saved) / "
            f"wrapped.load_anm_state_dict(saved) (what state_dict() / anm_state_dict() returned when the "
            f"checkpoint was saved), or pass loss(step=<optimizer step>). If ANM starts mid-training on "
            f"purpose, say so with reg.load_state_dict({{'step': 0}}) right after attaching."
        )

    def _count_calls_without_optimizer_steps(self) -> None:
        # A clock that never moves keeps the weight at w(0) = 0: ANM would be silently off.
        if self._steps.count != self._count_at_last_call:
            self._count_at_last_call, self._calls_without_step = self._steps.count, 0
        self._calls_without_step += 1
        if self._calls_without_step == _CALLS_WITHOUT_STEP_WARNING and self.warmup > 0:
            warn(
                f"ANM: {_CALLS_WITHOUT_STEP_WARNING} loss() calls saw no torch.optim step of the model's "
                "parameters, so the warm-up has not moved. Its clock is the optimizer step: pass it as "
                "loss(step=...) when the optimizer is not a torch.optim one holding these parameters "
                "(DeepSpeed, a custom update rule)."
            )

    def _warn_once_if_alpha_misfits_width(self) -> None:
        if self._width_checked or not self.collector.widths:
            return
        self._width_checked = True
        if self.collector.reduce != "l2" or self.alpha != PAPER_ALPHA:
            return
        width = Counter(self.collector.widths.values()).most_common(1)[0][0]
        low, high = _PAPER_WIDTH_RANGE
        if low <= width <= high:
            return
        warn(
            f"ANM: alpha=70 with reduce='l2' is the paper's value for SiT widths (SiT-XL/2: {PAPER_WIDTH}), "
            f"but the hooked activations are {width} wide, where it asks for a per-feature RMS of "
            f"{PAPER_ALPHA / math.sqrt(width):.2f} instead of {PAPER_ALPHA / math.sqrt(PAPER_WIDTH):.2f}. "
            f"Scale it to the width: alpha={PAPER_ALPHA * math.sqrt(width / PAPER_WIDTH):.1f} "
            f"(70·√({width}/{PAPER_WIDTH})), or use reduce='rms', alpha={PAPER_ALPHA / math.sqrt(PAPER_WIDTH):.2f}."
        )

    def _warn_once_if_hooks_never_run(self) -> None:
        # Training-mode steps that record nothing: the hooked modules are not on the forward path.
        if not (self.model.training and torch.is_grad_enabled()):
            return
        self._empty_training_calls += 1
        if self._empty_training_calls == _EMPTY_TRAINING_CALLS_WARNING:
            warn(
                f"ANM: {_EMPTY_TRAINING_CALLS_WARNING} training-mode loss() calls in a row found nothing "
                f"recorded: the hooked layers {self.names[:4]} did not run with autograd on. Hook modules "
                "the forward calls (anm.find_blocks(model) shows what layers='auto' picks), and call loss() "
                "after the forward."
            )

    def _refuse_stale_compiled_graph(self) -> None:
        # Nothing recorded is normal after eval or no_grad forwards, or on a second loss() call in a step.
        # In training mode, before anything was ever recorded, it is what a graph compiled before the
        # hooks existed looks like: the loss would silently stay 0 for the whole run.
        if self._ever_recorded or not (self.model.training and torch.is_grad_enabled()):
            return
        stale = self.collector.compiled_without_hooks()
        if stale is None:
            self._warn_once_stale_check_unavailable()
        elif stale:
            raise ANMError(
                f"no activations were recorded although the model is in training mode, and torch.compile "
                f"holds compiled graphs of {', '.join(stale)}.forward: a graph traced before ANM's hooks "
                "existed (for this model or another instance of its class) is reused without them, since "
                "Dynamo does not guard on module hooks. Call torch.compiler.reset() after attaching ANM "
                "(compiled code then recompiles with the hooks), or attach before compiling. "
                "(If this step's forwards all ran under torch.no_grad() on purpose, skip loss() for it.)"
            )

    def _warn_once_stale_check_unavailable(self) -> None:
        # Not knowing must not look like "no stale graph": say so once, with both fixes.
        if self._stale_check_warned:
            return
        self._stale_check_warned = True
        warn(
            f"ANM: a training-mode loss() found nothing recorded, and torch {torch.__version__} offers no "
            "way to check whether torch.compile holds a graph traced before ANM's hooks existed (which "
            "would skip them, leaving the ANM term at 0 for the whole run). If you compiled before "
            "attaching ANM, call torch.compiler.reset() after attaching; otherwise make sure the forward "
            "runs in training mode with autograd on before loss()."
        )

    def _device(self) -> torch.device:
        for tensor in self.model.parameters():
            return tensor.device
        return torch.device("cpu")

    def _check_finite(
        self, records: list[tuple[int, Tensor]], flat: Tensor
    ) -> tuple[list[tuple[int, Tensor]], Tensor | None]:
        all_finite = torch.isfinite(flat.sum())
        if all_finite.device.type == "cuda" and self.nonfinite == "raise":
            # No device sync on the training step's hot path: the flag is copied to the host in the
            # background and read by the next loss() or stats() call, which then names the layers.
            if self._host_flag is None or self._host_flag.device != all_finite.device:
                self._host_flag = HostFlag(all_finite.device)
            self._host_flag.copy_from(all_finite)
            return records, flat
        if bool(all_finite):  # free on the CPU; "skip" needs the answer now on any device
            return records, flat
        finite = self._finite_per_record(records)
        if self.nonfinite == "raise":
            raise self._nonfinite_error(records, finite, when=f" at step {self._last_step}")
        bad = self._bad_layers(records, finite)
        warn(f"ANM: skipping non-finite norms of layer(s) {bad} this step.")
        kept = [record for record, ok in zip(records, finite, strict=True) if ok]
        return kept, torch.cat([norms.reshape(-1) for _, norms in kept]) if kept else None

    def _raise_on_pending_nonfinite(self) -> None:
        if self._host_flag is None or not self._host_flag.pending:
            return
        if not self._host_flag.read():  # waits for the previous step's flag only, not for work queued since
            records = self._last_records()
            raise self._nonfinite_error(records, self._finite_per_record(records), when=f" at step {self._last_step}")

    @staticmethod
    def _finite_per_record(records: list[tuple[int, Tensor]]) -> list[bool]:
        return torch.stack([torch.isfinite(norms).all() for _, norms in records]).tolist()

    def _bad_layers(self, records: list[tuple[int, Tensor]], finite: list[bool]) -> list[str]:
        return sorted({self.names[index] for (index, _), ok in zip(records, finite, strict=True) if not ok})

    def _nonfinite_error(self, records: list[tuple[int, Tensor]], finite: list[bool], when: str) -> ANMError:
        return ANMError(
            f"non-finite activation norms (NaN/inf){when} in layer(s) {self._bad_layers(records, finite)}: the "
            "model itself diverged there (lower the learning rate, check inputs / mixed precision), or pass "
            "nonfinite='skip' to leave such layers out of the ANM term for that step."
        )


@torch.compiler.disable
def _consume_eagerly(
    regularizer: Regularizer, step: int | None
) -> tuple[list[tuple[int, Tensor]], Tensor | None, Tensor]:
    # λ · w(step) as a 0-dim CPU tensor: a graph input, never a constant baked into the graph. On the CPU
    # because a CPU scalar tensor mixes with accelerator tensors and needs no host-to-device copy.
    records, flat, weight = regularizer._consume(step)
    return records, flat, torch.tensor(regularizer.lam * weight, dtype=torch.float32)


def _release(collector: ActivationCollector, steps: OptimizerStepCounter) -> None:
    collector.remove()
    steps.stop()


def attach(
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
) -> Regularizer:
    """Attach ANM to ``model`` in place and return the :class:`Regularizer` whose ``loss()`` you add.

    The model object stays the user's own (same class, ``state_dict``, ``save_pretrained``), so trainers
    that own it — HF ``Trainer``, Lightning, accelerate — keep working; see docs/integrations.md. For a
    loop of your own, ``anm.ANM(model)`` wraps instead. ``reg.detach()`` (or leaving a ``with`` block)
    removes the hooks.

    Example:
        >>> import torch, anm
        >>> from torch import nn
        >>> blocks = nn.Sequential(*[nn.TransformerEncoderLayer(64, 4, batch_first=True) for _ in range(2)])
        >>> opt = torch.optim.AdamW(blocks.parameters(), lr=1e-4)
        >>> with anm.attach(blocks, reduce="rms", alpha=2.06, warmup=100) as reg:
        ...     for micro_batch in range(4):                  # accumulation: 2 micro-batches per step
        ...         loss = blocks(torch.randn(2, 8, 64)).pow(2).mean() + reg.loss()
        ...         loss.backward()
        ...         if micro_batch % 2 == 1:
        ...             opt.step(); opt.zero_grad()
        >>> reg.step                                           # optimizer steps, not loss() calls
        2
    """
    return Regularizer(
        model, layers=layers, alpha=alpha, lam=lam, warmup=warmup, site=site, reduce=reduce,
        objective=objective, granularity=granularity, warmup_kind=warmup_kind, select=select,
        nonfinite=nonfinite, feature_dim=feature_dim,
    )
