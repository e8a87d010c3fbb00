"""ANM's norms from hidden states a model already returns, without hooks.

HF models return them with ``output_hidden_states=True``, timm's ViTs with ``forward_intermediates``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .collector import SITES
from .errors import ANMError
from .norms import REDUCTIONS, activation_norms

__all__ = ["hidden_state_norms"]


def hidden_state_norms(
    hidden_states: Sequence[Tensor],
    site: str = "update",
    reduce: str = "l2",
    feature_dim: int = -1,
) -> list[Tensor]:
    """Per-token norms of each block from the residual stream ``h_0, h_1, ..., h_L`` it passed through.

    ``hidden_states[0]`` is the input of the first block and ``hidden_states[i]`` the output of block i.
    ``site="update"`` gives ‖h_i − h_{i−1}‖ (block i's residual update), ``site="output"`` ‖h_i‖; both
    return L tensors of shape ``(batch, tokens)`` in fp32, the same numbers the hooks of
    :func:`anm.attach` record, ready for :func:`anm.anm_loss`.

    HF's ``outputs.hidden_states`` is ``(embeddings, block 1, ..., block L)``, but in GPT-2, Llama and most
    decoders its last entry has the final norm applied: drop it (``hidden_states[:-1]``) to regularise
    blocks 1 … L−1 exactly, or hook the blocks to include the last one. timm's
    ``forward_intermediates(x, norm=False)`` returns the block outputs only: put the first block's input
    in front.

    Example:
        >>> import torch, anm
        >>> h0 = torch.zeros(2, 5, 8)
        >>> h1 = h0 + 3.0                       # block 1 added 3 to every feature
        >>> [n[0, 0].item() for n in anm.hidden_state_norms([h0, h1])]   # ‖3·1‖ over 8 features
        [8.485280990600586]
        >>> reg = anm.anm_loss(anm.hidden_state_norms([h0, h1], reduce="rms"), alpha=2.0)
    """
    if site not in SITES:
        raise ANMError(f"unknown site {site!r}: use 'update' (h_i − h_(i−1)) or 'output' (h_i).")
    if reduce not in REDUCTIONS:
        raise ANMError(f"unknown reduce {reduce!r}: use 'l2' (‖a‖₂) or 'rms' (‖a‖₂/√D).")
    if isinstance(hidden_states, Tensor) or not isinstance(hidden_states, Sequence):
        raise ANMError(
            f"hidden_states must be a sequence of tensors h_0 … h_L, got {type(hidden_states).__name__}: pass "
            "outputs.hidden_states (HF, output_hidden_states=True) or [x] + intermediates (timm)."
        )
    states = list(hidden_states)
    if len(states) < 2:
        raise ANMError(
            f"hidden_states needs the first block's input and at least one block output (h_0, h_1, ...), "
            f"got {len(states)} tensor(s)."
        )
    for i, state in enumerate(states):
        if not isinstance(state, Tensor) or not state.is_floating_point():
            raise ANMError(f"hidden_states[{i}] is not a floating-point tensor ({type(state).__name__}).")
        if state.shape != states[0].shape:
            raise ANMError(
                f"hidden_states[{i}] has shape {tuple(state.shape)}, hidden_states[0] {tuple(states[0].shape)}: "
                "every entry must be the same residual stream (same batch, tokens and width)."
            )
    if site == "output":
        return [activation_norms(state, reduce, feature_dim=feature_dim) for state in states[1:]]
    return [
        activation_norms(after, reduce, minus=before, feature_dim=feature_dim)
        for before, after in zip(states[:-1], states[1:], strict=True)
    ]
