"""Does torch.compile hold graphs of a model traced before ANM's hooks existed?

Dynamo does not guard on module hooks (``torch._dynamo.config.skip_nnmodule_hook_guards``, on by
default): a graph compiled for a model class before the hooks were registered — for this instance,
or for any other instance of the class — is reused as is, and the hooks never run. Compiled code lives
on the code object of the outermost compiled ``forward`` (hooks of the compiled module itself run
outside the graph; those of its submodules are traced into it), so the classes to check are the
ancestors of the hooked layers.

Dynamo lists the compiled entries of a code object only through a private helper. It is reached by
attribute (``torch._C._dynamo.eval_frame`` is a module object on torch 2.4, not an importable
package), and when a torch release moves it the answer is ``None`` — "cannot tell" — never "nothing
compiled", so the caller can say so instead of letting a stale graph train with a zero ANM term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["classes_with_compiled_forward", "cache_entry_lister"]


def cache_entry_lister() -> Callable[[Any], list] | None:
    """Dynamo's ``code -> compiled cache entries`` helper of this torch, or ``None`` if it has none.

    Example:
        >>> from anm.compiled import cache_entry_lister
        >>> cache_entry_lister() is not None   # present on every torch the library is tested on
        True
    """
    dynamo = getattr(torch._C, "_dynamo", None)
    eval_frame = getattr(dynamo, "eval_frame", None)
    lister = getattr(eval_frame, "_debug_get_cache_entry_list", None)
    return lister if callable(lister) else None


def classes_with_compiled_forward(modules: Iterable[nn.Module]) -> list[str] | None:
    """Names of the classes among ``modules`` whose ``forward`` has compiled graphs in this process.

    ``None`` when this torch offers no way to tell (see the module docstring).

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
    lister = cache_entry_lister()
    if lister is None:
        return None
    names = []
    for cls in dict.fromkeys(type(module) for module in modules):
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        if code is None:
            continue
        try:
            entries = lister(code)
        except Exception:  # noqa: BLE001 — a private helper whose signature changed: we cannot tell
            return None
        if len(entries) > 0:
            names.append(cls.__qualname__)
    return names
