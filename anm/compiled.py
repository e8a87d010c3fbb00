"""Does torch.compile hold graphs of a model traced before ANM's hooks existed?

Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by
default): a graph compiled for a model class before the hooks were registered — for this instance,
or for any other instance of the class — is reused as is, and the hooks never run. Compiled code lives
on the code object of the outermost compiled ``forward`` (hooks of the compiled module itself run
outside the graph; those of its submodules are traced into it), so the classes to check are the
ancestors of the hooked layers.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["classes_with_compiled_forward"]


def classes_with_compiled_forward(modules: Iterable[nn.Module]) -> list[str]:
    """Names of the classes among ``modules`` whose ``forward`` has compiled graphs in this process.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from anm.compiled import classes_with_compiled_forward
        >>> class Net(nn.Module):
        ...     def forward(self, x):
        ...         return x * 2
        >>> classes_with_compiled_forward([Net()])
        []
    """
    try:  # a private helper of Dynamo; without it there is nothing to check
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:
        return []
    names = []
    for cls in dict.fromkeys(type(module) for module in modules):
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        try:
            compiled = code is not None and len(_debug_get_cache_entry_list(code)) > 0
        except Exception:  # noqa: BLE001 — a changed private API must never break training
            compiled = False
        if compiled:
            names.append(cls.__qualname__)
    return names
