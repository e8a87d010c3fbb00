"""Why ``anm.ANM(model)`` refuses to be handed to ``transformers.Trainer`` when the model ties weights.

Trainer saves a model that is not a ``PreTrainedModel`` (the wrapper is not one, and no unwrapping of
Trainer's or accelerate's reaches through it) with ``safetensors.torch.save_file(model.state_dict())``,
which refuses tensors that share memory: tied input / output embeddings (GPT-2, Llama with
``tie_word_embeddings``). The run would train until its first checkpoint and crash there. Trainer touches
the wrapper's attributes while it is constructed, before any step: that is where the wrapper notices it,
and where it refuses, naming :func:`anm.attach` (the hooks go on the model itself, and Trainer saves it
with its own ``save_pretrained``, which handles tied weights). Nothing here imports ``transformers``.
"""

from __future__ import annotations

from types import FrameType

from torch import Tensor, nn

from .errors import ANMError

__all__ = ["called_from_hf_trainer", "shared_weight_names", "refuse_tied_weights_under_hf_trainer"]

# The module that defines transformers.Trainer: every subclass (Seq2SeqTrainer, TRL's trainers) runs its
# __init__ and its checkpointing there.
_TRAINER_MODULE = "transformers.trainer"


def called_from_hf_trainer(frame: FrameType | None) -> bool:
    """Whether ``frame`` (the caller of an attribute lookup) is code of ``transformers.Trainer``.

    Example:
        >>> import sys
        >>> from anm.hf_trainer import called_from_hf_trainer
        >>> called_from_hf_trainer(sys._getframe())
        False
    """
    return frame is not None and frame.f_globals.get("__name__") == _TRAINER_MODULE


def shared_weight_names(model: nn.Module) -> list[list[str]]:
    """Groups of ``state_dict`` keys whose tensors share memory (tied weights), as safetensors sees them.

    Example:
        >>> from torch import nn
        >>> from anm.hf_trainer import shared_weight_names
        >>> embed, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = embed.weight
        >>> shared_weight_names(nn.ModuleDict(dict(embed=embed, head=head)))
        [['embed.weight', 'head.weight']]
    """
    groups: dict[tuple[str, int], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not isinstance(tensor, Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage (DTensor shards)
            continue
        groups.setdefault((str(tensor.device), storage.data_ptr()), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def refuse_tied_weights_under_hf_trainer(model: nn.Module) -> None:
    """Raise ``ANMError`` naming :func:`anm.attach` when ``model`` has weights Trainer could not save."""
    tied = shared_weight_names(model)
    if not tied:
        return
    raise ANMError(
        f"transformers.Trainer was given anm.ANM({type(model).__name__}), whose weights {tied[0]} are tied. "
        "Trainer saves a model that is not a PreTrainedModel with safetensors.save_file, which refuses "
        "tied weights: the run would crash at its first checkpoint. Give Trainer the model itself and "
        "attach the hooks to it: reg = anm.attach(model, ...), and add reg.loss(step=self.state.global_step) "
        "in compute_loss (recipe: docs/integrations.md); Trainer then saves it with save_pretrained."
    )
