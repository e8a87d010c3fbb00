"""The warm-up's clock: optimizer steps of the model's parameters, counted as they happen.

A step is an optimizer step, not a forward or a ``loss()`` call: with gradient accumulation over k
micro-batches, k ``loss()`` calls share one step. One process-wide ``torch.optim`` step post-hook
(installed on first use) advances every live :class:`OptimizerStepCounter` whose model has a parameter
in the optimizer that stepped — so a GAN's second optimizer or an EMA never advance it, and a skipped
step (AMP ``GradScaler`` after an overflow, an accumulation micro-batch in accelerate / Lightning /
HF Trainer) is not counted. Between two ``loss()`` calls at most one step is counted, so several
optimizers sharing the model's parameters (Muon for matrices and AdamW for the rest) or an optimizer
that wraps another (ZeroRedundancyOptimizer, Lookahead) advance the clock once per training step.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["OptimizerStepCounter"]

_counters: weakref.WeakSet[OptimizerStepCounter] = weakref.WeakSet()
_hook_handle: Any = None


class OptimizerStepCounter:
    """Counts the ``optimizer.step()`` calls of any ``torch.optim`` optimizer holding ``model``'s parameters.

    Example:
        >>> import torch
        >>> from anm.steps import OptimizerStepCounter
        >>> net = torch.nn.Linear(2, 2)
        >>> counter = OptimizerStepCounter(net)
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> net(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> counter.count
        1
    """

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        # (optimizer's own step count, our count) at the first step counted: what a resume check compares.
        self.first_step_seen: tuple[int, int] | None = None
        self._look_at_first_step = True
        self._armed = True
        # A strong reference adds no lifetime (the regulariser holds the model anyway), and unlike a weak
        # one it follows copy.deepcopy / pickle to the copied model.
        self._model = model
        self._start()

    def _start(self) -> None:
        self._holds: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]] = weakref.WeakKeyDictionary()
        _counters.add(self)
        _install_hook()

    def __getstate__(self) -> dict[str, Any]:
        return {"count": self.count, "_armed": self._armed, "_model": self._model, "_counting": self in _counters}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy (deepcopy of a wrapped model, a pickled module in a spawned process) counts its own
        # model's optimizer steps from where the original was.
        self.count, self._armed, self._model = state["count"], state["_armed"], state["_model"]
        # A copy's optimizer (fresh, or the original's) says nothing about the copy's own clock.
        self.first_step_seen, self._look_at_first_step = None, False
        self._holds = weakref.WeakKeyDictionary()
        if state["_counting"]:
            self._start()

    def arm(self) -> None:
        """Count the next optimizer step (called by each ``loss()``): several optimizers stepping for the
        same loss (Muon for matrices + AdamW for the rest, an optimizer wrapping another) are one step."""
        self._armed = True

    def stop(self) -> None:
        """Stop counting (the count stays as it is)."""
        _counters.discard(self)

    def _on_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._armed and self._holds_model_parameters(optimizer):
            self.count += 1
            self._armed = False
            if self._look_at_first_step:
                self._look_at_first_step = False
                steps = self._optimizer_steps(optimizer)
                if steps is not None:
                    self.first_step_seen = (steps, self.count)

    def _optimizer_steps(self, optimizer: torch.optim.Optimizer) -> int | None:
        # Adam-style optimizers keep a per-parameter "step" that a resumed optimizer brings along. Read once,
        # and only from the host: a step tensor on an accelerator (fused / capturable) would cost a sync.
        owned = {id(p) for p in self._model.parameters()}
        for group in optimizer.param_groups:
            for p in group["params"]:
                step = optimizer.state.get(p, {}).get("step") if id(p) in owned else None
                if isinstance(step, torch.Tensor):
                    return int(step.item()) if step.device.type == "cpu" and step.numel() == 1 else None
                if isinstance(step, (int, float)):
                    return int(step)
        return None

    def _holds_model_parameters(self, optimizer: torch.optim.Optimizer) -> bool:
        # Cached per optimizer; recomputed if its parameter groups change (add_param_group).
        groups = len(optimizer.param_groups)
        cached = self._holds.get(optimizer)
        if cached is not None and cached[0] == groups:
            return cached[1]
        owned = {id(p) for p in self._model.parameters()}
        holds = any(id(p) in owned for group in optimizer.param_groups for p in group["params"])
        self._holds[optimizer] = (groups, holds)
        return holds


def _on_any_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for counter in list(_counters):
        counter._on_step(optimizer)


def _install_hook() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_on_any_optimizer_step)
