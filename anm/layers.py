"""Which modules to hook: the transformer blocks, found automatically or named by the user."""

from __future__ import annotations

import inspect
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
# Words that name a text / conditioning stream in a block list's path: Lumina2's and Z-Image's
# `context_refiner`, HunyuanVideo's `context_embedder.token_refiner.refiner_blocks` refine the caption
# tokens on their own before they meet the image stream. Their depth relative to the main list says
# nothing (2 refiner layers against 2 main layers in a small config), their names do.
_TEXT_STREAM_WORDS = frozenset({"context", "text", "txt", "caption", "cap", "prompt"})


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
    ``transformer.h``, Llama ``model.layers``, diffusers ``transformer_blocks``); a model without one
    (a depth-1 config) has its one-block lists taken instead. Lists whose path names a text stream
    (``context``, ``text``, ``txt``, ``caption``, ``cap``, ``prompt``: Lumina2 / Z-Image
    ``context_refiner``, HunyuanVideo ``context_embedder.token_refiner``) are left out whenever the model
    has other block lists, whatever their depths: ANM regularises the image / main stream. Of the rest,
    the largest list by parameter count is taken, plus any list outside it holding at least a quarter as
    many parameters (e.g. Flux's ``single_transformer_blocks``). Lists inside a chosen list (MoE experts)
    are skipped, except in hierarchical models: when every element of the list is a stage whose own
    block list holds most of its parameters (Swin, ConvNeXt), the blocks inside the stages are taken.

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
    _require_module(model)
    stacks = _main_stream_stacks(model)
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
            blocks.extend(_blocks_of(name, module))
    return [(clean_name(name), block) for name, block in blocks]


def _blocks_of(name: str, stack: nn.Module) -> list[tuple[str, nn.Module]]:
    """The children of a block list, or — for a hierarchical model whose list holds stages (Swin,
    ConvNeXt: downsampling plus a block list) — the blocks inside every stage."""
    children = [(_join(name, child_name), child) for child_name, child in stack.named_children()]
    inner = [_inner_stack(child) for _, child in children]
    if all(found is not None for found in inner):
        return [
            (_join(_join(child_name, inner_name), block_name), block)
            for (child_name, _), (inner_name, inner_stack) in zip(children, inner, strict=True)
            for block_name, block in inner_stack.named_children()
        ]
    return children


def _inner_stack(stage: nn.Module) -> tuple[str, nn.Module] | None:
    # A direct child that is itself a block list holding most of the stage's parameters. Experts of a
    # mixture-of-experts layer can look like that too; they run side by side, not one after the other,
    # and every MoE implementation calls them experts.
    total = sum(p.numel() for p in stage.parameters())
    for child_name, child in stage.named_children():
        if "expert" in child_name.lower():
            continue
        if _is_block_list(child) and 2 * sum(p.numel() for p in child.parameters()) >= total:
            return child_name, child
    return None


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
    _require_module(model)
    if isinstance(layers, str) and layers == "auto":
        return find_blocks(model)
    if isinstance(layers, (str, type, nn.Module)) or callable(layers) or not isinstance(layers, Iterable):
        specs = [layers]
    else:
        specs = list(layers)  # a list, tuple, set or generator of selections
    if not specs:
        raise ANMError("layers= is an empty list: pass 'auto', a glob, a module class, modules or a predicate.")
    matchers = [_matcher(spec) for spec in specs]
    selected = []
    for name, module in model.named_modules():
        name = clean_name(name)
        if name and any(match(name, module) for match in matchers):
            selected.append((name, module))
    selected = _expand_containers(selected)
    if not selected:
        try:
            hint = f"blocks found by layers='auto': {[name for name, _ in find_blocks(model)][:8]}"
        except ANMError:
            hint = f"top-level modules: {_top_level(model)}"
        raise ANMError(f"layers={layers!r} matched no module of {type(model).__name__}; {hint}.")
    return selected


def _expand_containers(selected: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    # A ModuleList / ModuleDict is never called itself, so a hook on it would never fire and the ANM
    # term would silently stay 0: what the user means is the blocks it holds.
    expanded, seen = [], set()
    for name, module in selected:
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # lists of lists too
            children = _expand_containers([(_join(name, n), child) for n, child in module.named_children()])
        else:
            children = [(name, module)]
        for child_name, child in children:
            if id(child) not in seen:
                seen.add(id(child))
                expanded.append((child_name, child))
    return expanded


def _require_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise ANMError(f"expected an nn.Module (the model whose blocks to hook), got {type(model).__name__}.")


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
        try:
            inspect.signature(spec).bind("name", nn.Module())
        except TypeError:
            raise ANMError(
                "a layers= predicate is called as f(name, module) -> bool: give it those two arguments, "
                "e.g. lambda name, module: name.startswith('blocks.')."
            ) from None
        except ValueError:  # no signature to inspect (a builtin): trust it
            pass
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


def _block_stacks(model: nn.Module, min_blocks: int = 2) -> list[tuple[str, nn.Module, int]]:
    return [
        (name, module, sum(p.numel() for p in module.parameters()))
        for name, module in model.named_modules()
        if _is_block_list(module, min_blocks)
    ]


def _main_stream_stacks(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    # Lists of two or more blocks, else (a depth-1 config) of one; text-stream lists only when nothing
    # else is there (a text model's own layers).
    for min_blocks in (2, 1):
        main = [stack for stack in _block_stacks(model, min_blocks) if not _names_text_stream(stack[0])]
        if main:
            return main
    return _block_stacks(model)


def _names_text_stream(path: str) -> bool:
    return any(word in _TEXT_STREAM_WORDS for part in path.lower().split(".") for word in part.split("_"))


def _is_block_list(module: nn.Module, min_blocks: int = 2) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)):
        return False
    children = list(module.children())
    if len(children) < min_blocks or any(type(child) is not type(children[0]) for child in children):
        return False
    # A block has parameters and structure of its own: this skips lists of bare Linear heads.
    return all(_has_params(child) and any(True for _ in child.children()) for child in children)


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_within(name: str, ancestor: str) -> bool:
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def _top_level(model: nn.Module) -> str:
    names = [f"{name} ({type(child).__name__})" for name, child in model.named_children()]
    return ", ".join(names[:12]) or "none"
