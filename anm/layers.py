"""Which modules to hook: the transformer blocks, found automatically or named by the user."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from torch import nn

from .errors import ANMError

__all__ = ["find_blocks", "select_layers", "LayerSpec", "clean_name"]

# A selection: "auto", a glob, a module class, a module, a predicate(name, module) -> bool, or a list of these.
LayerSpec = str | type | nn.Module | Callable[[str, nn.Module], bool] | Iterable

# Wrappers that insert a path component of their own; names are matched with these removed so that
# "blocks.*" selects the same blocks under DDP, torch.compile, FSDP or checkpoint wrappers.
_WRAPPER_PARTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
# A block list must hold at least this share of the largest one's parameters to be hooked too
# (Flux-style double + single block stacks, encoder + decoder stacks).
_SECOND_STACK_SHARE = 0.25


def clean_name(name: str) -> str:
    """``name`` without the path components that DDP / compile / FSDP / checkpoint wrappers add.

    Example:
        >>> from anm.layers import clean_name
        >>> clean_name("module._orig_mod.blocks.3")
        'blocks.3'
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks of ``model``: the children of its block list(s), with their names.

    A block list is an ``nn.ModuleList``/``nn.Sequential`` of at least two children of one class, each with
    parameters and submodules of its own (SiT/DiT ``blocks``, timm ViT ``blocks``, GPT-2
    ``transformer.h``, Llama ``model.layers``, diffusers ``transformer_blocks``). The largest list by
    parameter count is taken, plus any list outside it holding at least a quarter as many parameters
    (e.g. Flux's ``single_transformer_blocks``). Lists inside a chosen list (MoE experts) are skipped.

    Example:
        >>> from torch import nn
        >>> from anm import find_blocks
        >>> class Block(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
        >>> net = nn.Module(); net.embed = nn.Linear(8, 8); net.blocks = nn.ModuleList(Block() for _ in range(3))
        >>> [name for name, _ in find_blocks(net)]
        ['blocks.0', 'blocks.1', 'blocks.2']
    """
    stacks = _block_stacks(model)
    if not stacks:
        raise ANMError(
            "layers='auto' found no transformer block list (an nn.ModuleList/nn.Sequential of >= 2 "
            "same-class submodules with parameters). Pass layers= a glob such as 'blocks.*', a block "
            f"class, a list of modules or a predicate(name, module). Top-level modules seen: "
            f"{_top_level(model)}."
        )
    stacks.sort(key=lambda stack: -stack[2])
    chosen = [stacks[0]]
    for name, container, size in stacks[1:]:
        nested = any(_is_within(name, other) or _is_within(other, name) for other, _, _ in chosen)
        if not nested and size >= _SECOND_STACK_SHARE * stacks[0][2]:
            chosen.append((name, container, size))
    wanted = {id(container) for _, container, _ in chosen}
    blocks = []
    for name, module in model.named_modules():
        if id(module) in wanted:
            blocks.extend((_join(name, child_name), child) for child_name, child in module.named_children())
    return [(clean_name(name), block) for name, block in blocks]


def select_layers(model: nn.Module, layers: LayerSpec = "auto") -> list[tuple[str, nn.Module]]:
    """Resolve a layer selection to ``[(name, module), ...]`` in model order.

    ``layers`` may be ``"auto"`` (see :func:`find_blocks`); a name glob (``*`` matches within one dotted
    component, ``**`` across components, wrapper prefixes such as ``module.`` / ``_orig_mod.`` are
    ignored); a module class; a module; a predicate ``f(name, module) -> bool``; or a list mixing these.
    A selection that matches nothing raises ``ANMError`` listing the candidates seen.

    Example:
        >>> from torch import nn
        >>> from anm import select_layers
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        >>> [name for name, _ in select_layers(net, nn.Linear)]
        ['0', '2']
        >>> [name for name, _ in select_layers(net, "[02]")]
        ['0', '2']
    """
    if isinstance(layers, str) and layers == "auto":
        return find_blocks(model)
    specs = list(layers) if isinstance(layers, (list, tuple, set)) and not isinstance(layers, str) else [layers]
    if not specs:
        raise ANMError("layers= is an empty list: pass 'auto', a glob, a module class, modules or a predicate.")
    matchers = [_matcher(spec) for spec in specs]
    selected = []
    for name, module in model.named_modules():
        name = clean_name(name)
        if name and any(match(name, module) for match in matchers):
            selected.append((name, module))
    if not selected:
        try:
            hint = f"blocks found by layers='auto': {[name for name, _ in find_blocks(model)][:8]}"
        except ANMError:
            hint = f"top-level modules: {_top_level(model)}"
        raise ANMError(f"layers={layers!r} matched no module of {type(model).__name__}; {hint}.")
    return selected


def _matcher(spec: object) -> Callable[[str, nn.Module], bool]:
    if isinstance(spec, str):
        if spec == "auto":
            raise ANMError("'auto' cannot be mixed with other selections: pass it alone.")
        pattern = _glob_to_regex(spec)
        return lambda name, module: pattern.fullmatch(name) is not None
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise ANMError(f"layers= got the class {spec.__name__}, which is not an nn.Module subclass.")
        return lambda name, module: isinstance(module, spec)
    if isinstance(spec, nn.Module):
        return lambda name, module: module is spec
    if callable(spec):
        return lambda name, module: bool(spec(name, module))
    raise ANMError(
        f"layers= got {type(spec).__name__}: use 'auto', a glob string, a module class, a module, "
        "a predicate(name, module) or a list of these."
    )


def _glob_to_regex(glob: str) -> re.Pattern:
    glob = clean_name(glob)
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif glob[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif glob[i] == "[":
            end = glob.find("]", i)
            if end < 0:
                raise ANMError(f"unclosed '[' in layer glob {glob!r}.")
            out.append(glob[i : end + 1])
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return re.compile("".join(out))


def _block_stacks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or any(type(child) is not type(children[0]) for child in children):
            continue
        # A block has parameters and structure of its own: this skips lists of bare Linear heads.
        if not all(_has_params(child) and any(True for _ in child.children()) for child in children):
            continue
        stacks.append((name, module, sum(p.numel() for p in module.parameters())))
    return stacks


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_within(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _top_level(model: nn.Module) -> str:
    names = [f"{name} ({type(child).__name__})" for name, child in model.named_children()]
    return ", ".join(names[:12]) or "none"
