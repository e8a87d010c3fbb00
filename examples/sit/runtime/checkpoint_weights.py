"""Whether the weights and optimizer state in a train.py checkpoint fit the model its config builds.

A renamed, missing or unknown key, a tensor of the wrong shape or a non-tensor in ``model``, ``ema`` or
``opt`` made a resume stop in ``load_state_dict`` with a traceback, or (an optimizer moment of the wrong
shape) at the first optimizer step. :func:`check_checkpoint_weights` names them in one line before the run
folder is touched. The reference shapes come from the model built on the meta device: no memory, no init.

Example:
    >>> check_checkpoint_weights(torch.load("0400000.pt"), "0400000.pt", config)  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from runtime.cli import UsageError

__all__ = ["check_checkpoint_weights", "term_parameter_shapes", "state_dict_problems", "optimizer_problems"]

MAX_NAMED = 3  # keys named per kind of problem; the rest are counted


def check_checkpoint_weights(checkpoint: Mapping[str, Any], path: str, model_config: dict) -> None:
    """UsageError naming the first problems if checkpoint's model, ema or opt do not fit SiT(**model_config)."""
    from modeling.models import SiT

    with torch.device("meta"):
        reference = SiT(**model_config)
    shapes = {name: tensor.shape for name, tensor in reference.state_dict().items()}
    problems = state_dict_problems("model", checkpoint["model"], shapes)
    problems += state_dict_problems("ema", checkpoint["ema"], shapes)
    problems += optimizer_problems(checkpoint["opt"], [p.shape for p in reference.parameters()]
                                   + term_parameter_shapes(checkpoint))
    if problems:
        raise UsageError(f"checkpoint {path} does not fit the model it was saved with ({'; '.join(problems)}): the "
                         "file is damaged or was edited; resume from another checkpoint with --resume PATH, or "
                         "start a new --exp-name")


def term_parameter_shapes(checkpoint: Mapping[str, Any]) -> list[torch.Size]:
    """The shapes of the parameters the optimizer holds after the model's: REPA's projector (regularizers/terms.py),
    in parameters() order, which is its state dict's."""
    projector = ((checkpoint.get("terms") or {}).get("repa") or {}).get("projector") or {}
    return [tensor.shape for tensor in projector.values() if isinstance(tensor, torch.Tensor)]


def state_dict_problems(name: str, state: Any, shapes: Mapping[str, torch.Size]) -> list[str]:
    """What keeps ``load_state_dict(state)`` from loading into a model with these tensor shapes."""
    if not isinstance(state, Mapping):
        return [f"{name} is a {type(state).__name__}, not a state dict"]
    problems = []
    missing = [key for key in shapes if key not in state]
    unknown = [key for key in state if key not in shapes]
    if missing:
        problems.append(f"{name} lacks {_some(missing)}")
    if unknown:
        problems.append(f"{name} has unknown {_some(unknown)}" + (" (renamed?)" if missing else ""))
    wrong = [f"{key} is {_describe(state[key])}, not {tuple(shape)}" for key, shape in shapes.items()
             if key in state and not (isinstance(state[key], torch.Tensor) and state[key].shape == shape)]
    if wrong:
        problems.append(f"{name} {_some(wrong)}")
    return problems


def optimizer_problems(state: Any, shapes: list[torch.Size]) -> list[str]:
    """What keeps an AdamW state dict from driving the parameters of these shapes (in parameters() order)."""
    if not (isinstance(state, Mapping) and isinstance(state.get("state"), Mapping)
            and isinstance(state.get("param_groups"), list)
            and all(isinstance(group, Mapping) and isinstance(group.get("params"), list)
                    for group in state["param_groups"])):
        return [f"opt is a {type(state).__name__} without AdamW's state and param_groups"]
    ids = [index for group in state["param_groups"] for index in group["params"]]
    if ids != list(range(len(shapes))):  # what Optimizer.state_dict writes for the parameters in order
        return [f"opt holds {len(ids)} parameters, the model has {len(shapes)}"]
    wrong = []
    for index, moments in state["state"].items():
        if index not in range(len(shapes)) or not isinstance(moments, Mapping):
            wrong.append(f"state {index!r} belongs to no parameter")
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            value = moments.get(key)
            if value is not None and not (isinstance(value, torch.Tensor) and value.shape == shapes[index]):
                wrong.append(f"{key} of parameter {index} is {_describe(value)}, not {tuple(shapes[index])}")
    return [f"opt {_some(wrong)}"] if wrong else []


def _describe(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def _some(items: list[str]) -> str:
    more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
    return ", ".join(items[:MAX_NAMED]) + more
