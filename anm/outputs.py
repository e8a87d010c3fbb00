"""Which tensor of a block's output is the hidden state that continues the block's input stream.

Most blocks return one tensor. HF blocks return tuples or ``ModelOutput`` dicts with caches beside the
hidden state; two-stream blocks (diffusers SD3 / Flux / HunyuanVideo / CogVideoX ...) return the text
and the image stream together, in an order that differs between classes. When both streams have the
input's shape, shape alone cannot tell them apart; the block's own ``forward`` can: the stream it
received as ``hidden_states`` leaves as the returned name ``hidden_states``. :func:`return_positions`
reads that from the source once per class, so the hook picks by position, never by a guess.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from .errors import ANMError

__all__ = ["default_select", "return_positions", "HIDDEN_KWARGS", "Select"]

Select = Callable[[Any, "Tensor | None"], Tensor]

# Keyword names under which blocks (diffusers, HF, timm, SiT) receive their hidden state, in priority order.
HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x", "inputs_embeds", "input", "inputs")
# Keys of dict-like outputs (HF ModelOutput) that hold the hidden state.
_HIDDEN_KEYS = ("hidden_states", "last_hidden_state", "hidden_state")


def default_select(output: Any, hidden_in: Tensor | None, position: int | None = None) -> Tensor:
    """Pick the hidden-state tensor from a block's output.

    A tensor is returned as is. From a dict (HF ``ModelOutput`` included) the ``hidden_states`` /
    ``last_hidden_state`` entry is taken. From a tuple or list: the one floating tensor with the shape of
    the block's input hidden state, else the only floating tensor. When several have the input's shape
    (a two-stream block whose streams have equal length), ``position`` (from :func:`return_positions`)
    decides; without it the output is ambiguous and ``ANMError`` names ``select=``.

    Example:
        >>> import torch
        >>> from anm.outputs import default_select
        >>> h, cache = torch.zeros(2, 4, 8), torch.zeros(2, 1)
        >>> default_select((cache, h), hidden_in=torch.ones(2, 4, 8)) is h
        True
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in _HIDDEN_KEYS:
            if isinstance(output.get(key), Tensor):
                return output[key]
        output = tuple(output.values())
    if isinstance(output, (tuple, list)):
        tensors = [v for v in output if isinstance(v, Tensor) and v.is_floating_point()]
        same_shape = [v for v in tensors if hidden_in is not None and v.shape == hidden_in.shape]
        if len(same_shape) == 1:
            return same_shape[0]
        if len(same_shape) > 1:
            if position is not None and position < len(output) and isinstance(output[position], Tensor):
                return output[position]
            raise ANMError(
                f"a block returned {len(same_shape)} tensors of its input's shape {tuple(hidden_in.shape)} "
                "(two streams of equal length, e.g. text and image), and its source does not say which one "
                "continues the input: pass select=lambda output, hidden_in: output[i] with the index of "
                "the stream to regularise (e.g. the image stream)."
            )
        if len(tensors) == 1:
            return tensors[0]
    raise ANMError(
        f"cannot tell which part of a {type(output).__name__} output is the hidden state: pass "
        "select=lambda output, hidden_in: output[...] to pick it."
    )


@functools.cache
def return_positions(cls: type[nn.Module]) -> dict[str, int]:
    """``{argument name: position}`` of the arguments ``cls.forward`` returns unchanged in name, in a tuple.

    Only names every tuple-returning ``return`` of ``forward`` agrees on are kept; an empty dict when the
    source is unavailable or the returns disagree.

    Example:
        >>> import torch
        >>> from anm.outputs import return_positions
        >>> class Joint(torch.nn.Module):
        ...     def forward(self, hidden_states, encoder_hidden_states):
        ...         return encoder_hidden_states, hidden_states
        >>> return_positions(Joint)
        {'hidden_states': 1, 'encoder_hidden_states': 0}
    """
    forward = getattr(cls, "forward", None)
    try:
        source = textwrap.dedent(inspect.getsource(forward))
        tree = ast.parse(source)
        parameters = list(inspect.signature(forward).parameters)
    except (OSError, TypeError, SyntaxError, ValueError):
        return {}
    function = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if function is None:
        return {}
    agreed: dict[str, int] | None = None
    for node in _own_returns(function):
        if not isinstance(node.value, ast.Tuple):
            continue
        names = {elt.id: i for i, elt in enumerate(node.value.elts) if isinstance(elt, ast.Name)}
        positions = {name: names[name] for name in parameters if name in names}
        agreed = positions if agreed is None else {k: v for k, v in agreed.items() if positions.get(k) == v}
    return agreed or {}


def _own_returns(function: ast.AST) -> list[ast.Return]:
    # Returns of nested functions / classes belong to them, not to forward.
    found, stack = [], list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, ast.Return) and node.value is not None:
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def hidden_input(args: tuple, kwargs: dict, arg_names: list[str]) -> tuple[str | None, Tensor | None]:
    """The block's input hidden state and the name of the ``forward`` argument that carried it.

    ``arg_names`` are the positional parameter names of the block's ``forward`` (:func:`positional_names`),
    looked up once when the hooks are made, so the hook itself stays plain Python that compiles.
    """
    if kwargs:  # most blocks get their hidden state positionally: no lookups then
        for key in HIDDEN_KWARGS:
            value = kwargs.get(key)
            if isinstance(value, Tensor) and value.is_floating_point():
                return key, value
    for index, value in enumerate(args):
        if isinstance(value, Tensor) and value.is_floating_point():
            return (arg_names[index] if index < len(arg_names) else None), value
    return None, None


@functools.cache
def positional_names(cls: type[nn.Module]) -> list[str]:
    """Names of ``cls.forward``'s positional parameters, without ``self``."""
    try:
        names = [
            name for name, p in inspect.signature(cls.forward).parameters.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return []
    return names[1:] if names and names[0] == "self" else names
