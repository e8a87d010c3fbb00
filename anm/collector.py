"""Forward hooks that record per-token activation norms of selected layers."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .compiled import classes_with_compiled_forward
from .errors import ANMError
from .layers import LayerSpec, select_layers
from .layout import block_widths, check_feature_layout
from .norms import REDUCTIONS, activation_norms, norms_unchecked, validate_feature_dim
from .outputs import Select, default_select, hidden_input, positional_names, return_positions
from .warn import warn

__all__ = ["ActivationCollector", "SITES", "default_select", "MAX_PENDING_FORWARDS"]

SITES = ("update", "output")
# Training forwards whose records (and autograd graphs) are kept while nobody calls loss()/pop():
# past this, the oldest are dropped so memory stays bounded (with one warning naming the fix).
MAX_PENDING_FORWARDS = 16


class ActivationCollector:
    """Registers forward hooks on ``layers`` of ``model`` and records per-token activation norms.

    Each hooked call appends the norms (fp32, shape ``(batch, tokens)``) of its activation: the block's
    residual update (output − input hidden state, ``site="update"``) or its output (``site="output"``).
    Several forwards (gradient accumulation, CFG double calls) are all kept, in call order, until
    :meth:`clear` / :meth:`pop`. Hooks are removed by :meth:`remove` or on leaving a ``with`` block, also
    when it raises.

    With ``training_only=True`` (what a regulariser needs) only forwards in training mode with autograd
    on are recorded; eval or ``torch.no_grad()`` forwards cost one Python check per layer. In that mode a
    block that runs without autograd on an input that requires grad (reentrant activation checkpointing,
    which would silently drop the gradient) raises ``ANMError``, and the extra forward that non-reentrant
    checkpointing replays during backward is not recorded twice.

    Norms are taken over the last dimension (``(batch, tokens, features)``); pass ``feature_dim=1`` for
    channel-first maps ``(N, C, H, W)`` (ConvNeXt-style blocks). A block whose activation looks
    channel-first while ``feature_dim=-1`` raises ``ANMError`` naming ``feature_dim=1`` instead of taking
    norms over the wrong axis. With ``training_only=True``, records of more than
    ``MAX_PENDING_FORWARDS`` forwards that nobody consumed are dropped, oldest first, with one warning.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from anm import ActivationCollector
        >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        >>> with ActivationCollector(net, layers="auto", site="output") as collector:
        ...     _ = net(torch.randn(2, 5, 8))
        ...     [tuple(n.shape) for n in collector.norms()]
        [(2, 5), (2, 5), (2, 5)]
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec = "auto",  # which modules to hook (see select_layers)
        site: str = "update",  # "update" = output − input hidden state; "output" = block output
        reduce: str = "l2",  # "l2" = ‖a‖₂, "rms" = ‖a‖₂/√D
        select: Select | None = None,  # f(output, hidden_in) -> tensor, for unusual block outputs
        keep_activations: bool = False,  # also keep the activation tensors themselves (memory!)
        training_only: bool = False,  # record only training-mode forwards with autograd on
        feature_dim: int = -1,  # -1: (..., features); 1: channel-first (N, C, H, W) maps
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ANMError(f"hooks go on an nn.Module, got {type(model).__name__}.")
        if site not in SITES:
            raise ANMError(f"unknown site {site!r}: use 'update' (output − input) or 'output'.")
        if reduce not in REDUCTIONS:
            raise ANMError(f"unknown reduce {reduce!r}: use 'l2' (‖a‖₂) or 'rms' (‖a‖₂/√D).")
        if select is not None and not callable(select):
            raise ANMError("select= must be a function f(output, hidden_in) -> tensor.")
        validate_feature_dim(feature_dim)
        for flag, value in (("keep_activations", keep_activations), ("training_only", training_only)):
            if not isinstance(value, bool):
                raise ANMError(f"{flag} must be True or False, got {value!r}.")
        self.site, self.reduce, self.training_only = site, reduce, training_only
        self.keep_activations, self.feature_dim = keep_activations, feature_dim
        self._select = select
        self.layers = select_layers(model, layers)
        self.names = [name for name, _ in self.layers]
        if training_only and not keep_activations:  # a reader of hidden states adds no ANM term
            _refuse_second_regularizer(self.layers)
        # Looked up once here so that the hook itself is plain Python that torch.compile traces.
        self._arg_names = [positional_names(type(module)) for _, module in self.layers]
        self._return_positions = [return_positions(type(module)) for _, module in self.layers]
        self._block_widths = [frozenset(block_widths(module)) for _, module in self.layers]
        # torch's own transformer layers default to (tokens, batch, D): their norms are turned to (batch, tokens).
        self._sequence_first = [_sequence_first(module) for _, module in self.layers]
        self.widths: dict[int, int] = {}  # feature width of each layer's activation, seen in eager forwards
        self.active = True  # False for a regulariser's collector copied without its regulariser
        self._pending_warned = False
        # Modules whose forward runs the hooked layers inside it: a graph compiled for one of these
        # before the hooks existed would skip them (see compiled.py).
        named = dict(model.named_modules(remove_duplicate=False))
        hooked = {id(module) for _, module in self.layers}
        hooked_paths = [path for path, module in named.items() if id(module) in hooked]
        self._ancestors = [
            module for path, module in named.items()
            if id(module) not in hooked and any(_is_inside(inner, path) for inner in hooked_paths)
        ]
        # (layer index, norms) per hooked call; owned here so torch.compile sees one outside list.
        self.records: list[tuple[int, Tensor]] = []
        self._activations: list[tuple[int, Tensor]] = []
        self._handles = [
            module.register_forward_hook(_Hook(self, index), with_kwargs=True)
            for index, (_, module) in enumerate(self.layers)
        ]

    # -- reading -------------------------------------------------------------------------------------
    def norms(self) -> list[Tensor]:
        """Norm tensors recorded since the last clear, in call order (one per hooked call)."""
        return [norms for _, norms in self.records]

    def norms_by_layer(self) -> dict[str, list[Tensor]]:
        """Recorded norm tensors grouped by layer name (a layer called twice has two entries)."""
        grouped: dict[str, list[Tensor]] = {name: [] for name in self.names}
        for index, norms in self.records:
            grouped[self.names[index]].append(norms)
        return grouped

    @property
    def activations(self) -> dict[str, list[Tensor]]:
        """Recorded activation tensors by layer name; needs ``keep_activations=True``."""
        if not self.keep_activations:
            raise ANMError("activations were not kept: create the collector with keep_activations=True.")
        grouped: dict[str, list[Tensor]] = {name: [] for name in self.names}
        for index, activation in self._activations:
            grouped[self.names[index]].append(activation)
        return grouped

    def hidden_states(self) -> list[Tensor]:
        """The kept activation tensors since the last clear, in call order (one per hooked call), with their
        autograd graphs: with ``site="output"`` each hooked block's output hidden state, for a loss on the
        representations themselves (e.g. a dispersive or alignment term). Needs ``keep_activations=True``.

        A collector that keeps activations reads hidden states and adds no ANM term of its own, so it may share
        blocks with a regulariser (``anm.ANM`` / :func:`anm.attach`) even with ``training_only=True``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from anm import ActivationCollector
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
            >>> with ActivationCollector(net, layers="1", site="output", keep_activations=True) as collector:
            ...     _ = net(torch.randn(2, 5, 8))
            ...     [tuple(h.shape) for h in collector.hidden_states()]
            [(2, 5, 8)]
        """
        if not self.keep_activations:
            raise ANMError("activations were not kept: create the collector with keep_activations=True.")
        return [activation for _, activation in self._activations]

    def pop(self) -> list[tuple[int, Tensor]]:
        """Return the ``(layer index, norms)`` records and forget them."""
        records, self.records = self.records, []
        self._activations = []
        return records

    def clear(self) -> None:
        """Forget everything recorded so far (hooks stay)."""
        self.pop()

    def compiled_without_hooks(self) -> list[str] | None:
        """Classes enclosing the hooked layers whose ``forward`` torch.compile has compiled in this process.

        When a forward in training mode recorded nothing and this is not empty, the compiled graph was
        most likely traced before the hooks were registered: Dynamo does not notice hooks added later.
        ``None`` when this torch offers no way to tell (a private Dynamo helper moved).

        Example:
            >>> import torch
            >>> from torch import nn
            >>> from anm import ActivationCollector
            >>> net = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
            >>> ActivationCollector(net, site="output").compiled_without_hooks()
            []
        """
        return classes_with_compiled_forward(self._ancestors)

    # -- lifetime ------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook and forget what was recorded. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.pop()

    close = remove

    def __enter__(self) -> ActivationCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (
            f"ActivationCollector({len(self.layers)} layers, site={self.site!r}, reduce={self.reduce!r}, "
            f"records={len(self.records)})"
        )

    # -- the hook ------------------------------------------------------------------------------------
    def _record(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self.active:
            return
        if self.training_only and not (module.training and torch.is_grad_enabled()):
            if module.training:
                self._refuse_reentrant_checkpoint(index, hidden_input(args, kwargs, self._arg_names[index])[1])
            return
        arg_name, hidden_in = hidden_input(args, kwargs, self._arg_names[index])
        if self._select is not None:
            activation = self._select(output, hidden_in)
        else:
            position = self._return_positions[index].get(arg_name) if arg_name is not None else None
            activation = default_select(output, hidden_in, position)
        if not isinstance(activation, Tensor):
            raise ANMError(
                f"select= returned {type(activation).__name__} for layer {self.names[index]!r}; "
                "it must return the hidden-state tensor."
            )
        minus = None
        if self.site == "update":
            if hidden_in is None:
                raise ANMError(
                    f"layer {self.names[index]!r} got no tensor input, so its residual update cannot be "
                    "formed: use site='output' or hook the blocks themselves."
                )
            if hidden_in.shape != activation.shape:
                raise ANMError(
                    f"layer {self.names[index]!r} maps {tuple(hidden_in.shape)} to "
                    f"{tuple(activation.shape)}, so it has no residual update: hook the blocks inside it "
                    "(layers=<their class> or a glob such as 'stages.*.blocks.*'), use site='output', or "
                    "a select= that returns the hidden state."
                )
            minus = hidden_in
        compiling = torch.compiler.is_compiling()  # asked once per call: this runs per block and forward
        if compiling:  # shapes are constants here: checked once, while tracing
            check_feature_layout(self.names[index], self._block_widths[index], activation, self.feature_dim)
        elif index not in self.widths:  # eager: once per layer (a dict written from a graph would recompile it)
            check_feature_layout(self.names[index], self._block_widths[index], activation, self.feature_dim)
            self.widths[index] = activation.shape[self.feature_dim]
        if not activation.is_floating_point() or activation.shape[self.feature_dim] == 0:
            activation_norms(activation, self.reduce, minus=minus, feature_dim=self.feature_dim)  # raises, naming why
        norms = norms_unchecked(activation, self.reduce, minus, self.feature_dim)
        if self._sequence_first[index] and norms.dim() == 2:
            norms = norms.transpose(0, 1)
        if self.training_only and not compiling and _replaying_for_backward():
            # Non-reentrant checkpointing re-runs the forward inside backward: the norm op above had
            # to run again (checkpoint checks the saved tensors match), but it is not a new sample.
            return
        self.records.append((index, norms))
        if self.keep_activations:
            self._activations.append((index, activation if minus is None else activation - minus))
        if self.training_only and not compiling:
            self._bound_pending()

    # -- copies --------------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy of a hooked model, e.g. an EMA; a pickled module) starts with nothing
        # recorded: the records hold autograd graphs, which cannot be copied and belong to the original.
        state = self.__dict__.copy()
        state["records"], state["_activations"] = [], []
        # A regulariser's hooks copied without the regulariser (only the model was copied) stay inert:
        # nothing would ever consume their records. The regulariser re-activates its own copy.
        state["active"] = self.active and not self.training_only
        return state

    def _bound_pending(self) -> None:
        # Records hold autograd graphs: a training loop that never calls loss() would keep every
        # forward's activations alive. Keep the newest MAX_PENDING_FORWARDS forwards' worth.
        limit = MAX_PENDING_FORWARDS * len(self.layers)
        if len(self.records) <= limit:
            return
        if not self._pending_warned:
            self._pending_warned = True
            warn(
                f"ANM: {MAX_PENDING_FORWARDS} training forwards were recorded without a loss() call, so their "
                "activations stay alive; older records are now dropped. Add .loss() to every training "
                "step's loss, or run forwards that should not count under torch.no_grad() / model.eval() "
                "(or call .collector.clear())."
            )
        del self.records[: len(self.records) - limit]
        if self.keep_activations:
            del self._activations[: max(0, len(self._activations) - limit)]

    def _refuse_reentrant_checkpoint(self, index: int, hidden_in: Tensor | None) -> None:
        # A block in training mode running without autograd on an input that *requires* grad is what
        # reentrant checkpointing does in its first pass: norms taken here would carry no gradient.
        if hidden_in is not None and hidden_in.requires_grad:
            raise ANMError(
                f"layer {self.names[index]!r} ran without autograd on an input that requires grad: this is "
                "reentrant activation checkpointing (use_reentrant=True), under which the ANM term would "
                "silently get no gradient. Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False), "
                "or leave layers that run under torch.no_grad() out of layers=."
            )


class _Hook:
    """The forward hook of one layer. An object rather than a closure so that ``copy.deepcopy`` of a
    hooked model copies the collector along with it, instead of leaving the copy recording into the
    original's collector."""

    def __init__(self, collector: ActivationCollector, index: int) -> None:
        self.collector, self.index = collector, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.collector._record(self.index, module, args, kwargs, output)


def _is_inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def _sequence_first(module: nn.Module) -> bool:
    # nn.TransformerEncoderLayer / DecoderLayer keep their batch_first only on their attention.
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    return isinstance(module, nn.MultiheadAttention) and not module.batch_first


def _refuse_second_regularizer(layers: list[tuple[str, nn.Module]]) -> None:
    # Two live regularisers on one block would each add a term: the ANM loss would silently double.
    for name, module in layers:
        for hook in module._forward_hooks.values():
            other = hook.collector if isinstance(hook, _Hook) else None
            if (other is not None and other.training_only and other.active and other._handles
                    and not other.keep_activations):
                raise ANMError(
                    f"layer {name!r} already carries the hooks of another ANM regulariser: call .detach() "
                    "(or .close()) on the first one before attaching again, or keep using it."
                )


def _replaying_for_backward() -> bool:
    # Eager only (the caller checks): torch.compile traces the forward once and handles recomputation
    # itself, and the private task-id query (what torch's own ModTracker uses) is not traceable.
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1
